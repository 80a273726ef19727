"""data=files: tokenising your data the first time vs loading the cached tokenisation, side by side.

    python -m bench.data_files [--records 20000] [--family qwen2]

Writes a chat JSONL of ``--records`` conversations in 3 domains (the worked example's generator),
then builds the DataModule twice in one process with an empty ``datasets`` cache: the first build
reads and tokenises every record through the chat template; the second finds the tokenised file
in the cache. Prints records/s of both and their ratio. Needs the dev extras (real tokenizers).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# an empty cache, set before datasets loads, and removed at exit with the generated data
SCRATCH = tempfile.mkdtemp(prefix="kdlab-bench-datasets-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ["HF_DATASETS_CACHE"] = str(Path(SCRATCH) / "datasets")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.chat.make_data import arithmetic, capitals, explain  # noqa: E402
from examples.tiny_pair import tokenizer as family_tokenizer  # noqa: E402
from kdlab.data.files import FilesDataModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--family", default="qwen2", choices=["qwen2", "llama", "gpt2"])
    args = parser.parse_args()
    tok = family_tokenizer(args.family)
    rng = random.Random(0)
    path = Path(SCRATCH) / "chat.jsonl"
    makers = (arithmetic, capitals, explain)
    if args.family != "qwen2":  # no chat template: the same data as prompt/response records
        rows = [make(rng) for make in makers for _ in range(args.records // 3)]
        rows = [{"domain": r["domain"], "prompt": r["messages"][-2]["content"], "response": " " + r["messages"][-1]["content"]} for r in rows]
    else:
        rows = [make(rng) for make in makers for _ in range(args.records // 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    times = []
    for _ in ("cold", "cached"):
        start = time.perf_counter()
        dm = FilesDataModule(tok, train=str(path), max_length=256)
        times.append(time.perf_counter() - start)
    n = sum(len(split) for split in dm.records.values())
    print(f"{args.family} tokenizer, {n} records ({path.stat().st_size / 1e6:.1f} MB JSONL)")
    print(f"{'first build (read + tokenise)':34s} {times[0]:7.2f} s  {n / times[0]:9.0f} records/s")
    print(f"{'second build (cached tokenisation)':34s} {times[1]:7.2f} s  {n / times[1]:9.0f} records/s")
    print(f"cached / first time: {times[1] / times[0]:.2f}")


if __name__ == "__main__":
    main()
