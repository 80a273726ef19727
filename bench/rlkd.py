"""RLKD's comparison on the built-in suite, and the ranking term's cost per training step.

    KDLAB_CACHE=/tmp/kdcache-real python -m bench.rlkd [--seeds 0 1 2] [--steps 300] [--skip-runs]

1. Step cost, side by side in one process on the default pair: a KD training step with forward
   KL against one with forward KL + the ranking term (k = 5), as DistillModule runs them
   (goal: the ranking term adds at most 25%).
2. The paper's comparison (docs/methods.md §2): KL vs KL+R and TVD vs TVD+R (k = 5, w_rank = 2), the
   same budget for every run, over seeds, from the default (cached) teacher and warm-started
   student. Prints mean ± std of the test top-5 consistency rate, top-20 overlap and exact match.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

VARIANTS = {
    "KL": ["loss=fkl"],
    "KL+R": ["loss=rlkd", "loss.base=fkl", "loss.k=5"],
    "TVD": ["loss=tvd"],
    "TVD+R": ["loss=rlkd", "loss.base=tvd", "loss.k=5"],
}
COLUMNS = {"top-5 consistency": "test/top5_consistency", "top-20 overlap": "test/top20_overlap", "exact match": "test/exact_match"}


def step_cost(repeats: int) -> str:
    import torch

    from bench.common import default_config, default_pair_and_batch, interleaved_medians
    from kdlab.losses.divergences import load_loss
    from kdlab.losses.rlkd import RankingKD
    from kdlab.module import DistillModule

    tokenizer, teacher, student, batch = default_pair_and_batch(default_config(), "cpu")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    modules = {
        "KD step (fkl)": DistillModule(student, teacher, load_loss("fkl"), tokenizer),
        "KD step (fkl + ranking, k=5)": DistillModule(student, teacher, RankingKD(base="fkl", k=5), tokenizer),
    }

    def step(module):
        def run():
            module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    t = interleaved_medians({name: step(m) for name, m in modules.items()}, "cpu", repeats)
    lines = [f"{name:<30} {seconds * 1e3:8.2f} ms" for name, seconds in t.items()]
    ratio = t["KD step (fkl + ranking, k=5)"] / t["KD step (fkl)"]
    lines.append(f"ratio (fkl + ranking) / fkl = {ratio:.3f}   (goal <= 1.25), batch {tuple(batch['input_ids'].shape)}")
    return "\n".join(lines)


def comparison(seeds: list[int], steps: int, out: Path, overrides: list[str]) -> str:
    from bench.common import default_config, mean_std
    from kdlab.train import run

    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        for name, variant in VARIANTS.items():
            cfg = default_config(*variant, f"seed={seed}", f"trainer.max_steps={steps}", "logger=csv", "+trainer.enable_progress_bar=false", *overrides)
            cfg.paths.output_dir = str(out / f"{name.replace('+R', '_R')}-seed{seed}")
            metrics = run(cfg)
            results[name].append(metrics)
            print(f"{name:<6} seed {seed}: " + ", ".join(f"{c} {metrics[k]:.4f}" for c, k in COLUMNS.items()), flush=True)
    lines = [f"RLKD comparison, {steps} steps, seeds {seeds}, test split, mean ± std", f"{'':<6}  " + "  ".join(f"{c:<17}" for c in COLUMNS)]
    for name, runs in results.items():
        lines.append(f"{name:<6}  " + "  ".join(f"{mean_std([m[k] for m in runs]):<17}" for k in COLUMNS.values()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-runs", action="store_true", help="only measure the step cost")
    parser.add_argument("--out", default="outputs/bench/rlkd")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)

    report = [step_cost(args.repeats)]
    print(report[0], flush=True)
    if not args.skip_runs:
        report.append(comparison(args.seeds, args.steps, Path(args.out), args.overrides))
        print(report[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
