"""Cost of RLKD's ranking term over its base loss: loss forward+backward only, CPU, one process.

    .venv/bin/python bench/rlkd_overhead.py [--batch 64 --seq 24 --vocab 80 --k 5 --rounds 30 --threads 1]

Times TokenKD(fkl) and RankingKD(base=fkl, k) side by side on random logits of the default
pair's batch shape (64, 24, 80), interleaving the two so that machine noise hits both alike, and
prints the median of each and their ratio. One intra-op thread by default: these kernels are tiny,
and on a busy machine OpenMP threads waiting for a free core swamp them. A full training-step
comparison lives elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdlab.losses.base import KDBatch
from kdlab.losses.divergences import TokenKD, forward_kl
from kdlab.losses.rlkd import RankingKD


def step_seconds(loss, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> float:
    student.grad = None
    start = time.perf_counter()
    loss(KDBatch(student_logits=student, teacher_logits=teacher, labels=labels)).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=80)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)
    labels = torch.zeros(shape[:2], dtype=torch.long)
    losses = {
        "TokenKD(fkl)": TokenKD(divergence=forward_kl),
        f"RankingKD(fkl, k={args.k})": RankingKD(base="fkl", k=args.k),
    }

    times: dict[str, list[float]] = {name: [] for name in losses}
    for round_ in range(args.rounds + 3):
        for name, loss in losses.items():
            seconds = step_seconds(loss, student, teacher, labels)
            if round_ >= 3:  # the first rounds warm up allocators and caches
                times[name].append(seconds)

    print(f"logits {shape}, float32, CPU, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        print(f"  {name:<22} {median * 1e3:8.2f} ms  forward+backward")
    base, ranked = medians.values()
    print(f"  ratio RankingKD / TokenKD: {ranked / base:.2f}x")


if __name__ == "__main__":
    main()
