"""Peak memory and time of one objective's forward + backward: dense vs chunked, side by side.

    python -m bench.objective_memory [--rows 1024] [--vocab 32000 151936] [--chunk 1024] [--device cpu]

For every token-level objective of conf/loss (ce, fkl, rkl, jsd, skl, srkl, tvd, rlkd) on (N, V)
float32 logits: the peak memory above the inputs (student logits, teacher logits, labels), in
units of one (N, V) tensor, and the time of forward + backward, with ``chunk_size=null`` (dense)
and the config's chunked default. On CPU each measurement runs in a fresh process and reads its
peak resident memory (``ru_maxrss``, with large blocks from mmap so that it tracks live tensors);
on CUDA, ``torch.cuda.max_memory_allocated``. The student logits' gradient, which every backward
pass has, is included in the extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]
# large blocks from mmap, so that freed memory leaves the process and its peak RSS tracks live tensors
# (glibc otherwise keeps freed chunks of up to 32 MiB on its heap)
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def measure(name: str, rows: int, vocab: int, chunk: int | str | None, device: str) -> dict:
    """One forward + backward in this process; returns extra peak bytes and seconds."""
    import resource

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kdlab.losses.base import KDBatch

    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "conf" / "loss" / f"{name}.yaml")
    cfg.chunk_size = chunk
    loss = instantiate(cfg)
    student = torch.randn(1, rows, vocab, device=device, requires_grad=True)
    teacher = torch.randn(1, rows, vocab, device=device)
    labels = torch.randint(0, vocab, (1, rows), device=device)
    batch = KDBatch(student_logits=student, teacher_logits=teacher, labels=labels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss(batch).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    # the student logits' gradient is part of any backward pass: counted, as one (N, V) tensor
    return {"extra": (peak - base) / (rows * vocab * 4), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--chunk", default="auto", help="the chunked column's loss.chunk_size: auto (the conf/loss default) or rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # name vocab chunk device: run one measurement
    args = parser.parse_args()
    if args.one:
        name, vocab, chunk, device = args.one
        print(json.dumps(measure(name, args.rows, int(vocab), chunk if chunk == "auto" else (int(chunk) or None), device)))
        return
    print(f"forward + backward on ({args.rows}, V) float32 logits, {args.device}; extra peak memory in (N, V) tensors; chunked: loss.chunk_size={args.chunk}")
    print(f"{'objective':10s} {'V':>7s} {'dense':>7s} {'chunked':>8s} {'t dense':>9s} {'t chunked':>10s} {'t ratio':>8s}")
    for vocab in args.vocab:
        for name in OBJECTIVES:
            results = []
            for chunk in ("0", args.chunk):
                cmd = [sys.executable, "-m", "bench.objective_memory", "--rows", str(args.rows), "--one", name, str(vocab), chunk, args.device]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=ENV)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            dense, chunked = results
            print(
                f"{name:10s} {vocab:7d} {dense['extra']:7.2f} {chunked['extra']:8.2f} {dense['seconds']:8.2f}s "
                f"{chunked['seconds']:9.2f}s {chunked['seconds'] / dense['seconds']:8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
