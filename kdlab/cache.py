"""Entries of kdlab's on-disk cache: one manifest format, one verified load, one atomic write.

Every cached artefact (a trained default teacher or warm start, a model converted from GGUF, the
teacher's top-k signals) is a folder under ``paths.cache_dir`` written the same way: into a
temporary sibling folder that is renamed when complete, with a manifest written last that holds
the entry's settings and a SHA-256 of every payload file. A load checks the manifest, the settings
and the checksums; an entry that fails any of them (an interrupted write, a corrupted file, another
format version) is removed with a warning saying why, and the caller builds it again, so a stale
or broken entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

MANIFEST = "kdlab-cache.json"


def cache_key(*parts) -> str:
    """A short stable hash of config nodes and plain values."""
    plain = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_fingerprint(datamodule) -> str:
    """A hash of the tokenised training split itself (ids, targets, domains), so that a change of the
    data behind an unchanged config (a new generator, edited files) is a new cache entry."""
    digest = hashlib.sha256()
    for r in datamodule.records["train"]:
        digest.update(json.dumps([r.domain, r.input_ids, r.targets]).encode())
        if r.teacher_ids:  # across tokenizers: the teacher's own tokenisation and the alignment
            digest.update(json.dumps([r.teacher_ids, r.aligned]).encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, patterns: Iterable[str]) -> dict[str, str]:
    """SHA-256 of every file in ``folder`` matching one of ``patterns`` (e.g. ``*/*.jsonl``), by its path in ``folder``."""
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file() and p.name != MANIFEST})
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def load(path: Path, expected: dict, patterns: Iterable[str], what: str) -> dict | None:
    """The manifest of the verified entry at ``path``, or None if there is none or it cannot be trusted.

    ``expected``: settings the manifest must record with these values (a format version, k, ...).
    ``patterns``: the payload files whose checksums are verified. An untrusted entry is removed
    (and the reason logged), so the caller rebuilds it.
    """
    if not path.exists():
        return None
    manifest = path / MANIFEST
    reason, recorded = None, {}
    if not manifest.is_file():
        reason = "it has no manifest (an interrupted write or an older kdlab)"
    else:
        try:
            recorded = json.loads(manifest.read_text())
        except (ValueError, OSError):
            recorded = {}
        differing = {key: recorded.get(key) for key, value in expected.items() if recorded.get(key) != value}
        if differing:
            reason = f"it records {differing}, this run needs {({key: expected[key] for key in differing})}"
        elif not recorded.get("checksums") or recorded["checksums"] != checksums(path, patterns):
            reason = "its files do not match the checksums recorded when it was written (a missing or corrupted file)"
    if reason:
        log.warning("The cached %s at %s is not used: %s; building it again", what, path, reason)
        shutil.rmtree(path, ignore_errors=True)
        return None
    log.info("Loading the cached %s from %s", what, path)
    return recorded


def write(path: Path, fill: Callable[[Path], dict | None], settings: dict, patterns: Iterable[str], replace: bool = False) -> Path:
    """Write an entry atomically: ``fill(tmp)`` writes the payload into a temporary folder (and may
    return facts for the manifest, e.g. counts), the manifest (``settings``, those facts, checksums of
    the ``patterns`` files) is written last, then the folder is renamed to ``path``. If ``path``
    exists (another process wrote it meanwhile), theirs is kept, unless ``replace`` (a rebuild asked for)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        facts = fill(tmp) or {}
        manifest = {**settings, **facts, "checksums": checksums(tmp, patterns)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (full disk, Ctrl-C) leaves nothing behind
        raise
    if path.exists() and replace:  # moved aside first: a rename cannot replace a non-empty folder
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        path.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(path)
    return path
