"""DDK's sampling ablation on the built-in suite: uniform vs DDK without smoothing vs full DDK.

    KDLAB_CACHE=/tmp/kdcache-real python -m bench.ddk [--seeds 0 1 2] [--steps 400] [--val-every 50] [OVERRIDE ...]
    python -m bench.ddk callbacks.model_checkpoint.monitor=null   # test the final students, not the best by val/loss

Every run is `experiment=ddk` (loss CE + 0.2·KL, docs/methods.md §4) on the default teacher/student
pair with the same budget (steps, batch size, validations); only the mixture differs:
``data/mixing=uniform``, ``ddk_no_smoothing`` (Eq. 1 at every update) or ``ddk`` (Eq. 1, then
Eq. 2 with α = 0.5). ``--val-every`` plays the paper's K. The default teacher is trained and
cached on first use (under $KDLAB_CACHE); point KDLAB_CACHE at an existing cache to reuse it.
As in every kdlab run, the student tested is the best by val/loss; extra Hydra overrides apply to
every run.

Prints, per variant, mean ± std over seeds of the held-out (test) student/teacher perplexity
ratio ℓ_S/ℓ_T: of the worst domain and averaged over domains (lower is better; 1 = the
teacher), and saves the table and the per-run numbers under --out.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

VARIANTS = {"uniform": "uniform", "DDK w/o smoothing": "ddk_no_smoothing", "DDK": "ddk"}


def gaps(metrics: dict[str, float], domains: list[str]) -> dict[str, float]:
    ratios = {d: metrics[f"test/{d}/ppl"] / metrics[f"test/{d}/teacher_ppl"] for d in domains}
    worst = max(ratios, key=ratios.get)
    return {"worst": ratios[worst], "worst_domain": worst, "mean": statistics.fmean(ratios.values()), **ratios}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=50, help="validation interval = DDK's K")
    # On the shared 2-core dev machine two intra-op threads made a default-teacher forward ~15x
    # slower than one (1.35 s vs 0.08 s, other jobs competing for the cores).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS.values()), choices=list(VARIANTS.values()))
    parser.add_argument("--out", default="outputs/bench/ddk")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    from bench.common import default_config, mean_std
    from kdlab.train import run

    out = Path(args.out)
    rows = []
    for seed in args.seeds:  # seeds outermost: an interrupted bench still has whole seeds
        for name, mixing in VARIANTS.items():
            if mixing not in args.variants:
                continue
            cfg = default_config(
                "experiment=ddk",
                f"data/mixing={mixing}",
                f"seed={seed}",
                f"trainer.max_steps={args.steps}",
                f"trainer.val_check_interval={args.val_every}",
                "+trainer.enable_progress_bar=false",
                "module.generate_in_validation=false",  # DDK needs perplexities only; test still scores generations
                "logger=csv",
                *args.overrides,
            )
            cfg.paths.output_dir = str(out / f"{mixing}-seed{seed}")
            start = time.perf_counter()
            metrics = run(cfg)
            row = {"variant": name, "seed": seed, "seconds": time.perf_counter() - start}
            row.update(gaps(metrics, list(cfg.data.splits.domains)))
            rows.append(row)
            print(f"{name:<18} seed {seed}: worst {row['worst']:.4f} ({row['worst_domain']}), mean {row['mean']:.4f}, {row['seconds']:.0f} s", flush=True)

    header = (
        f"test student/teacher perplexity ratio (lower is better), {args.steps} steps, K = {args.val_every}, "
        f"seeds {args.seeds}, mean ± std" + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
    )
    lines = [header, f"{'variant':<18}  {'worst domain':<17}  {'mean over domains':<17}"]
    for name in VARIANTS:
        runs = [r for r in rows if r["variant"] == name]
        if runs:
            lines.append(f"{name:<18}  {mean_std([r['worst'] for r in runs]):<17}  {mean_std([r['mean'] for r in runs]):<17}")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(table + "\n")
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"saved {out / 'table.txt'} and {out / 'runs.csv'}")


if __name__ == "__main__":
    main()
