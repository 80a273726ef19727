"""An offline, deterministic real-text corpus: the Python standard library, as ``data=files`` JSONL.

    python -m kdlab.data.corpus /tmp/corpus                                  # 2000 train / 64 val / 64 test per domain
    python -m kdlab.data.corpus /tmp/corpus --seed 1 --records-per-domain 500 --chars-per-record 400
    python -m kdlab.train model=hf ... data=python_corpus                     # built on first use under paths.cache_dir

Every Python installation holds the same real text, so a run on it needs no download and no data
of one's own, and runs on one Python version are comparable between machines. Three domains:

- ``code``: the standard library's own ``.py`` source, cut at line boundaries;
- ``docstrings``: the docstrings of its modules, classes and functions (prose, 200+ characters);
- ``reference``: the language reference's topics shipped in ``pydoc_data.topics`` (prose);

each cut into records of about ``chars_per_record`` characters (600: about 150-200 tokens of a
49k BPE), written as ``OUT_DIR/<domain>/{train,val,test}.jsonl`` records ``{"text", "domain",
"source"}``. A source file (a reference topic) belongs to one split only, so held-out text is held
out for real, and a text found in two files is kept once. ``OUT_DIR/chat/prompts.jsonl`` holds user
prompts made from the library's names, for a teacher to answer (``python -m kdlab.generate``; the
answers are ``data.chat``, a fourth domain). ``OUT_DIR/kdlab-cache.json`` (kdlab/cache.py: the
manifest of every kdlab cache entry, verified on reuse) records the Python version, the settings,
the record counts and the SHA-256 of every file. One Python version and one set of
settings give byte-identical files: every choice is drawn from ``random.Random(seed)`` over sorted
lists, never from ``hash()``, set order or the file system's order.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import logging
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdlab import cache
from kdlab.data.files import FilesDataModule

log = logging.getLogger(__name__)

CORPUS_VERSION = 3  # bump when what is built changes: ensure_corpus then rebuilds older corpora
DOMAINS = ("code", "docstrings", "reference")
SPLITS = ("train", "val", "test")
FILES = ("*/*.jsonl",)  # the corpus's payload, checksummed in its manifest
# Not library code (tests, the IDLE and 2to3 tools), third-party packages, generated tables
# (encodings' codec maps) and pydoc_data (its text is the reference domain already).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "encodings", "pydoc_data", "__pycache__"})
# _sysconfigdata_*: this installation's build settings (paths, flags), which differ between machines.
SKIP_PREFIXES = ("_sysconfigdata_",)
MIN_DOCSTRING = 200  # characters: shorter docstrings are one-liners, not prose


@dataclass(frozen=True)
class Settings:
    """What a corpus is built from (its manifest records them; ``ensure_corpus`` compares them)."""

    seed: int = 0
    records_per_domain: int = 2000  # training records per domain
    val_records: int = 64
    test_records: int = 64
    chars_per_record: int = 600
    prompts: int = 256  # chat prompts in chat/prompts.jsonl

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"corpus setting {f.name} must be an integer, got {value!r}")
        if min(self.records_per_domain, self.val_records, self.test_records, self.prompts) < 1:
            raise ValueError(f"corpus record counts must be >= 1, got {self}")
        if self.chars_per_record < 100:
            raise ValueError(f"chars_per_record={self.chars_per_record} is too small for a record of text; use 100 or more (600: ~150-200 tokens)")

    @classmethod
    def of(cls, settings: Mapping) -> Settings:
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown corpus setting(s) {unknown}; the settings are {[f.name for f in fields(cls)]}")
        return cls(**settings)


@dataclass(frozen=True)
class Chunk:
    """A candidate record: its text and the source it came from (a file, or a reference topic)."""

    source: str
    text: str


# --- cutting text into records ------------------------------------------------------------------


def pack(pieces: Iterable[str], size: int, sep: str = "") -> list[str]:
    """``pieces`` joined (with ``sep``) into chunks of at most about ``size`` characters.

    A piece is never cut here (the callers cut too-long pieces first). A chunk under a quarter of
    ``size`` takes the next piece even past ``size``, and a short last chunk joins the one before
    it: a 40-character fragment is not worth a record.
    """
    chunks, current, length = [], [], 0
    for piece in pieces:
        extra = len(piece) + (len(sep) if current else 0)
        if current and length + extra > size and length >= size // 4:
            chunks.append(sep.join(current))
            current, length = [], 0
            extra = len(piece)
        current.append(piece)
        length += extra
    if current:
        tail = sep.join(current)
        if chunks and len(tail) < size // 4:
            chunks[-1] += sep + tail
        else:
            chunks.append(tail)
    return [c for c in chunks if c.strip()]


def code_chunks(source: str, size: int) -> list[str]:
    """Source cut at line boundaries; a line longer than ``size`` (a data table) is cut at ``size``."""
    lines = []
    for line in source.splitlines(keepends=True):
        lines += [line[i : i + size] for i in range(0, len(line), size)] if len(line) > size else [line]
    return [c.strip("\n") for c in pack(lines, size)]


_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


def prose_chunks(text: str, size: int) -> list[str]:
    """Prose cut at paragraph boundaries; a paragraph longer than ``size`` at sentence ends, a
    sentence longer than that at spaces."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= size:
            pieces.append(paragraph)
            continue
        sentences = []
        for sentence in _SENTENCE_END.split(paragraph):
            sentences += pack(sentence.split(" "), size, " ") if len(sentence) > size else [sentence]
        pieces += pack(sentences, size, " ")
    return pack(pieces, size, "\n\n")


# --- the three domains ----------------------------------------------------------------------------


def stdlib_files() -> list[tuple[str, str]]:
    """(path relative to the standard library, text) of every library ``.py`` file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # pruned, not walked: site-packages can be large
        paths += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith(SKIP_PREFIXES)]
    out = []
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a Latin-1 file: not the text a UTF-8 tokenizer expects
        out.append((path.relative_to(root).as_posix(), text))
    if not out:
        raise FileNotFoundError(f"no standard-library .py files under {root}: this Python installation ships none (a stripped build?)")
    return out


@dataclass(frozen=True)
class Library:
    """What the corpus is drawn from: each domain's candidate records, and the names for prompts."""

    candidates: Mapping[str, tuple[Chunk, ...]]
    names: Mapping[str, tuple[str, ...]]


@functools.lru_cache(maxsize=2)
def read_library(size: int) -> Library:
    """The standard library read and parsed once (parsing is most of a build; a second build in
    the same process, another seed, reuses it). Every file's syntax tree is dropped once read."""
    code, docstrings, names = [], [], {"function": set(), "class": set(), "module": set()}
    for rel, text in stdlib_files():
        code += [Chunk(rel, chunk) for chunk in code_chunks(text, size)]
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a library file written for another version's grammar
            continue
        docstrings += docstring_chunks(rel, tree, size)
        add_prompt_names(rel, tree, names)
    candidates = {"code": code, "docstrings": docstrings, "reference": reference_candidates(size)}
    # a whole file or topic under a quarter of a record ("# This directory is a Python package.") is not worth one
    candidates = {domain: [c for c in chunks if len(c.text) >= size // 4] for domain, chunks in candidates.items()}
    return Library(
        {domain: tuple(deduplicate(chunks)) for domain, chunks in candidates.items()},
        {kind: tuple(found) for kind, found in prompt_names(names).items()},
    )


def docstring_chunks(rel: str, tree: ast.Module, size: int) -> list[Chunk]:
    """Docstrings (dedented by ``ast.get_docstring``, i.e. ``inspect.cleandoc``) of 200+ characters."""
    out = []
    for node in _definitions(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_DOCSTRING:
            out += [Chunk(rel, chunk) for chunk in prose_chunks(doc, size)]
    return out


def _definitions(node: ast.AST):
    """The module and every class and function in it, in source order (statements only are
    searched: a docstring is never inside an expression, and expressions are most of a tree)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _definitions(child)


_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


def reference_candidates(size: int) -> list[Chunk]:
    """The language reference's topics (``pydoc_data.topics``), without their reST heading underlines."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = "\n".join(line for line in topics[key].splitlines() if not _UNDERLINE.match(line.strip()))
        out += [Chunk(f"pydoc_data.topics:{key}", chunk) for chunk in prose_chunks(text, size)]
    return out


def deduplicate(chunks: list[Chunk]) -> list[Chunk]:
    """The first occurrence of every text: a license header or a docstring copied between modules
    (``_pyio`` and ``io``, ``_pydecimal``) must not be in train and test at once."""
    seen, out = set(), []
    for chunk in chunks:
        key = " ".join(chunk.text.split())
        if key not in seen:
            seen.add(key)
            out.append(chunk)
    return out


def split_by_source(chunks: list[Chunk], sizes: Mapping[str, int], rng: random.Random, domain: str) -> dict[str, list[Chunk]]:
    """Whole sources assigned to test, val, then train, and each split's records sampled from its sources.

    Sources are taken in a shuffled order; a held-out split takes a source while it needs records
    and the source is no larger than the split (one long module must not be the whole test set).
    """
    by_source: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        by_source.setdefault(chunk.source, []).append(chunk)
    order = sorted(by_source)
    rng.shuffle(order)
    pools: dict[str, list[Chunk]] = {split: [] for split in SPLITS}
    for source in order:
        items = by_source[source]
        split = next(
            (s for s in ("test", "val") if len(pools[s]) < sizes[s] and len(items) <= sizes[s]),
            "train",
        )
        pools[split] += items
    out = {}
    for split in SPLITS:
        pool, wanted = pools[split], sizes[split]
        if not pool:
            raise ValueError(f"corpus domain {domain!r}: no source is small enough to hold out as {split} data; ask for more {split} records")
        if len(pool) < wanted:
            log.warning(
                "corpus domain %r has %d %s records, fewer than the %d asked for: the standard library holds no more "
                "(with whole sources kept to one split); lower chars_per_record for more, shorter records",
                domain, len(pool), split, wanted,
            )
        out[split] = rng.sample(pool, min(wanted, len(pool)))
    return out


# --- chat prompts ---------------------------------------------------------------------------------

# Each asks for a short answer: a chat record must fit data.max_length (128-256 tokens) with its
# prompt, and kdlab.generate leaves out answers that have not ended within max_new_tokens.
FUNCTION_TEMPLATES = (
    "In Python, what does `{name}` do? Answer in two sentences.",
    "In one short paragraph, explain when you would use `{name}` in Python.",
    "Give a one-line Python example that calls `{name}`, then explain it in one sentence.",
    "What does `{name}` return in Python? Answer briefly.",
)
CLASS_TEMPLATES = (
    "In two sentences, what is the `{name}` class in Python's standard library for?",
    "Briefly explain how to create and use a `{name}` object in Python.",
)
MODULE_TEMPLATES = (
    "What is Python's `{name}` module used for? Answer in two sentences.",
    "Name two functions of Python's `{name}` module and say in one sentence each what they do.",
)
KEYWORD_TEMPLATES = (
    "Explain Python's `{name}` keyword in two sentences.",
    "Give a one-line Python example that uses `{name}`, and explain it in one sentence.",
)
TOPIC_TEMPLATES = (
    'Summarise the Python language reference section "{name}" in two or three sentences.',
    'In a short paragraph, explain "{name}" in Python to a programmer who is new to the language.',
)
# packages no one asks about: demo scripts, the installer of pip, distutils (removed in 3.12)
PROMPT_SKIP = frozenset({"turtledemo", "ensurepip", "distutils"})
# the share of each kind of prompt (functions get the rest)
PROMPT_SHARES = {"class": 0.15, "module": 0.15, "keyword": 0.10, "topic": 0.20}


def _public_module(rel: str) -> str | None:
    """``json/__init__.py`` -> ``json``; None for a private or ``__main__`` module, or one deeper than
    ``package.module`` (``xml.dom.expatbuilder``: internals few programmers ask about)."""
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or len(parts) > 2 or any(p.startswith("_") for p in parts) or parts[0] in PROMPT_SKIP:
        return None
    return ".".join(parts)


def _exported(tree: ast.Module) -> set[str] | None:
    """The module's literal ``__all__``, if it has one."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                return None
            return {n for n in names if isinstance(n, str)}
    return None


def add_prompt_names(rel: str, tree: ast.Module, names: dict[str, set[str]]) -> None:
    """The documented public functions, classes and module of one file (those in its ``__all__``,
    if it has one) added to ``names``."""
    module = _public_module(rel)
    if module is None:
        return
    if ast.get_docstring(tree):
        names["module"].add(module)
    exported = _exported(tree)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            kind = "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "function"
        else:
            continue
        if not node.name.startswith("_") and (exported is None or node.name in exported) and ast.get_docstring(node):
            names[kind].add(f"{module}.{node.name}")


def prompt_names(library_names: dict[str, set[str]]) -> dict[str, list[str]]:
    """Sorted names for each kind of prompt: the library's (functions, classes, modules), the
    keywords, and the reference topics' titles."""
    import pydoc
    from pydoc_data.topics import topics

    titles = {topics[key].splitlines()[0].strip().replace('"', "`") for key in topics}
    return {
        **{kind: sorted(found) for kind, found in library_names.items()},
        "keyword": sorted(k for k in pydoc.Helper.keywords if k.isidentifier()),
        "topic": sorted(t for t in titles if t),
    }


def chat_prompts(names: Mapping[str, tuple[str, ...]], n: int, rng: random.Random) -> list[dict]:
    """``n`` user prompts, each a template filled with a real name, in a shuffled order (any first
    ``limit`` of them has every kind); ids are stable: kind, template and name."""
    templates = {"function": FUNCTION_TEMPLATES, "class": CLASS_TEMPLATES, "module": MODULE_TEMPLATES,
                 "keyword": KEYWORD_TEMPLATES, "topic": TOPIC_TEMPLATES}
    quotas = {kind: min(round(n * share), len(names[kind])) for kind, share in PROMPT_SHARES.items()}
    quotas["function"] = min(n - sum(quotas.values()), len(names["function"]))
    if sum(quotas.values()) < n:
        log.warning("the standard library gives %d chat prompts, fewer than the %d asked for", sum(quotas.values()), n)
    prompts = []
    for kind in ("function", "class", "module", "keyword", "topic"):
        for name in rng.sample(names[kind], quotas[kind]):
            t = rng.randrange(len(templates[kind]))
            prompts.append({"prompt": templates[kind][t].format(name=name), "domain": "chat", "id": f"{kind}{t}:{name}"})
    rng.shuffle(prompts)
    return prompts


# --- building -------------------------------------------------------------------------------------


def _jsonl(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def _write_tree(tmp: Path, settings: Settings) -> dict:
    """Every file of the corpus written under ``tmp``; returns the record counts for the manifest."""
    size = settings.chars_per_record
    sizes = {"train": settings.records_per_domain, "val": settings.val_records, "test": settings.test_records}
    library = read_library(size)
    written: dict[str, bytes] = {}
    counts: dict[str, dict[str, int]] = {}
    for domain in DOMAINS:
        rng = random.Random(f"{settings.seed}-{domain}")  # str seeds are hashed with SHA-512: stable everywhere
        splits = split_by_source(library.candidates[domain], sizes, rng, domain)
        counts[domain] = {split: len(chunks) for split, chunks in splits.items()}
        for split, chunks in splits.items():
            records = [{"text": c.text, "domain": domain, "source": c.source} for c in chunks]
            written[f"{domain}/{split}.jsonl"] = _jsonl(records)
    prompts = chat_prompts(library.names, settings.prompts, random.Random(f"{settings.seed}-chat"))
    written["chat/prompts.jsonl"] = _jsonl(prompts)
    counts["chat"] = {"prompts": len(prompts)}
    for rel, data in written.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"counts": counts}


def _recorded(settings: Settings) -> dict:
    """What a corpus's manifest records about how it was built (a reuse needs all of it equal)."""
    return {"version": CORPUS_VERSION, "python": platform_python(), "seed": settings.seed, "settings": asdict(settings)}


def platform_python() -> str:
    """The Python version the text comes from (its standard library is the corpus)."""
    return ".".join(map(str, sys.version_info[:3]))


def build_corpus(out_dir: str | Path, seed: int = 0, **settings) -> Path:
    """Build the corpus into ``out_dir`` (replacing what is there) and return it.

    ``settings``: see :class:`Settings`. Written as a kdlab cache entry (kdlab/cache.py): into a
    temporary folder beside ``out_dir``, renamed into place when complete, so an interrupted build is
    never used.
    """
    parsed = Settings.of({"seed": seed, **settings})
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cache.write(out, lambda tmp: _write_tree(tmp, parsed), _recorded(parsed), FILES, replace=True)
    log.info("built the Python corpus in %s: %s", out, json.loads((out / cache.MANIFEST).read_text())["counts"])
    return out


def ensure_corpus(root: str | Path, **settings) -> Path:
    """The corpus at ``root``: reused if its manifest records these settings and its files their
    checksums, else built."""
    parsed = Settings.of(settings)
    root = Path(root).expanduser().resolve()
    if cache.load(root, _recorded(parsed), FILES, "Python corpus") is not None:
        return root
    log.info("building the Python corpus in %s", root)
    return build_corpus(root, **asdict(parsed))


def default_root(cache_dir: str | Path, settings: Settings) -> Path:
    """``<cache_dir>/corpus/py311-seed0`` (other settings than the defaults add a short hash of them,
    so that runs with different sizes keep their own corpus instead of rebuilding one in turn)."""
    name = f"py{sys.version_info[0]}{sys.version_info[1]}-seed{settings.seed}"
    if {**asdict(settings), "seed": 0} != asdict(Settings()):
        name += "-" + hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser() / "corpus" / name


# --- reading it: data=python_corpus ---------------------------------------------------------------


def split_chat(chat: Path, out_root: Path, seed: int, fraction: float) -> dict[str, Path]:
    """``chat`` (a messages JSONL) cut into train/val/test files under ``out_root`` (a folder named by a
    hash of its bytes and the settings): ``fraction`` of the records each to val and test (at least 1),
    chosen by ``seed`` over the records' ids (their line numbers where they have none)."""
    data = chat.read_bytes()
    key = hashlib.sha256(data + f"|{seed}|{fraction}".encode()).hexdigest()[:16]
    folder = out_root / key
    recorded = {"seed": seed, "fraction": fraction}  # the folder name hashes the bytes with them
    if cache.load(folder, recorded, ("*.jsonl",), "chat split") is None:
        cache.write(folder, lambda tmp: _write_chat_splits(tmp, chat, data, seed, fraction), recorded, ("*.jsonl",))
    return {s: folder / f"{s}.jsonl" for s in SPLITS}


def _write_chat_splits(tmp: Path, chat: Path, data: bytes, seed: int, fraction: float) -> None:
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    ids = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.chat: {chat}, line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
        ids.append(str(record.get("id", f"line {n}")) if isinstance(record, dict) else f"line {n}")
    if len(lines) < 3:
        raise ValueError(f"data.chat: {chat} has {len(lines)} record(s); a chat domain needs 3 or more (train, val and test)")
    order = sorted(range(len(lines)), key=lambda i: ids[i])
    random.Random(f"{seed}-chat-split").shuffle(order)
    n = min(max(1, round(fraction * len(lines))), (len(lines) - 1) // 2)
    parts = {"val": order[:n], "test": order[n : 2 * n], "train": order[2 * n :]}
    for split, rows in parts.items():
        (tmp / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in sorted(rows)), encoding="utf-8")


class CorpusDataModule(FilesDataModule):
    """``data=python_corpus``: the corpus's domains through :class:`FilesDataModule` (see ``kdlab/conf/data/python_corpus.yaml``).

    ``root``: the corpus folder (None: under ``cache_dir``, see :func:`default_root`), built on
    first use with ``corpus`` (:class:`Settings`). ``domains``: which of ``code``, ``docstrings``,
    ``reference``. ``chat``: a messages JSONL written by ``python -m kdlab.generate`` from the
    corpus's ``chat/prompts.jsonl``, added as the ``chat`` domain with ``chat_holdout`` of it held
    out each for val and test. Every other argument is FilesDataModule's.
    """

    def __init__(
        self,
        tokenizer,
        root: str | None = None,
        cache_dir: str = "~/.cache/kdlab",
        corpus: Mapping | None = None,
        domains: Iterable[str] = DOMAINS,
        chat: str | None = None,
        chat_holdout: float = 0.1,
        **kwargs,
    ):
        given = sorted(k for k in ("train", "val", "test") if kwargs.get(k) is not None)
        if given:
            raise ValueError(f"data=python_corpus writes data.{given[0]} itself (the corpus's files); use data=files for files of your own")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("train", "val", "test")}
        corpus = OmegaConf.to_container(corpus, resolve=True) if isinstance(corpus, DictConfig) else dict(corpus or {})
        settings = Settings.of(corpus)
        domains = list(domains)
        unknown = sorted(set(domains) - set(DOMAINS))
        if unknown or not domains:
            raise ValueError(f"data.domains={domains}: choose one or more of {list(DOMAINS)}")
        if not 0.0 < chat_holdout < 0.5:
            raise ValueError(f"data.chat_holdout must be in (0, 0.5) (the fraction of the chat records for val and for test), got {chat_holdout}")
        root = Path(root).expanduser() if root else default_root(cache_dir, settings)
        root = ensure_corpus(root, **asdict(settings))
        splits = {split: {d: str(root / d / f"{split}.jsonl") for d in domains} for split in SPLITS}
        if chat:
            chat_path = Path(chat).expanduser()
            if not chat_path.is_file():
                raise FileNotFoundError(
                    f"data.chat={chat} does not exist. Write it with the teacher's answers to the corpus's prompts:\n"
                    f"    python -m kdlab.generate model=smollm2 prompts={root / 'chat' / 'prompts.jsonl'} out={chat_path}\n"
                    f"(model=smollm2: the real tier's teacher; yours: model=hf model.teacher.path=<folder>), "
                    f"or leave data.chat=null for the three text domains alone"
                )
            for split, path in split_chat(chat_path, root.parent / "chat-splits", settings.seed, chat_holdout).items():
                splits[split]["chat"] = str(path)
        super().__init__(tokenizer, train=splits["train"], val=splits["val"], test=splits["test"], **kwargs)


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m kdlab.data.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--records-per-domain", type=int, default=defaults.records_per_domain, help="training records per domain")
    parser.add_argument("--val-records", type=int, default=defaults.val_records, help="validation records per domain")
    parser.add_argument("--test-records", type=int, default=defaults.test_records, help="test records per domain")
    parser.add_argument("--chars-per-record", type=int, default=defaults.chars_per_record, help="about this many characters per record")
    parser.add_argument("--prompts", type=int, default=defaults.prompts, help="chat prompts in chat/prompts.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    out = build_corpus(args.out_dir, **settings)
    counts = json.loads((out / cache.MANIFEST).read_text())["counts"]
    print(f"{out}: " + "; ".join(f"{d}: " + ", ".join(f"{c[s]} {s}" for s in (*SPLITS, "prompts") if s in c) for d, c in counts.items()))
    return out


if __name__ == "__main__":
    main()
