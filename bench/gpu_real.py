"""The real tier on one GPU in bf16: one prepared script of at most 8 minutes.

    python -m bench.gpu_real [--steps 200] [--out outputs/gpu_real]
    python -m bench.gpu_real --print-config      # composes the runs on any machine (what the CPU test checks)

1. ``experiment=real`` (SmolLM2-135M-Instruct into its 6-layer pruned student) with forward KL, in bf16
   mixed precision, batches of 16 × 256 tokens: absolute training tokens/s, the peak GPU memory,
   and the per-domain perplexities and S/T ratios of the exported student.
2. ``fkl-cached``: the same run with the teacher cache (``teacher_cache.k=32``): its build time and tokens/s.
3. ``bench.objective_memory --real --device cuda``: the fused head against head + chunked at
   V = 49,152 on the real hidden states (memory and time).

Each run goes in this process (``kdlab.train.run``), so ``torch.cuda.max_memory_allocated`` is the
run's own peak; the table is printed and written to ``<out>/gpu_real.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(steps: int, out: Path, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["experiment=real", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "model.teacher.dtype=bfloat16",
            "data.batch_size=16", "data.eval_batch_size=32", "data.max_length=256", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "logger=csv", f"paths.output_dir={out / name}", *extra]


RUNS = {"fkl": (), "fkl-cached": ("teacher_cache.k=32",)}  # name (its run folder) -> overrides


def compose(steps: int, out: Path, name: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import kdlab.resolvers  # noqa: F401  (the configs' resolvers)
    from kdlab import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides(steps, out, name, RUNS[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_real"))
    parser.add_argument("--print-config", action="store_true", help="compose every run and print its overrides; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    configs = {name: compose(args.steps, out, name) for name in RUNS}
    if args.print_config:
        for name, cfg in configs.items():
            print(name, overrides(args.steps, out, name, RUNS[name]), f"batch {cfg.data.batch_size}x{cfg.data.max_length}")
        return
    import torch

    from kdlab.train import run

    if not torch.cuda.is_available():
        sys.exit("bench.gpu_real needs a CUDA GPU; on a CPU use python -m kdlab.train experiment=real")
    lines = [f"## bench.gpu_real on {torch.cuda.get_device_name()} (bf16-mixed, batches 16 x 256, {args.steps} steps)", "",
             "| run | tokens/s | step time (s) | peak GPU memory (GiB) | test ppl | mean S/T ppl ratio | wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, cfg in configs.items():
        torch.cuda.reset_peak_memory_stats()
        start = time.time()
        metrics = run(cfg)
        wall = time.time() - start
        ratios = [metrics[f"test/{d}/ppl"] / metrics[f"test/{d}/teacher_ppl"] for d in ("code", "docstrings", "reference")]
        lines.append(f"| {name} | {metrics['train/tokens_per_sec']:.0f} | {metrics['train/step_time']:.3f} | "
                     f"{torch.cuda.max_memory_allocated() / 2**30:.2f} | {metrics['test/ppl']:.2f} | {sum(ratios) / 3:.3f} | {wall:.0f} |")
        (out / "metrics").mkdir(parents=True, exist_ok=True)
        (out / "metrics" / f"{name}.json").write_text(json.dumps(metrics, indent=1))
        print(lines[-1], flush=True)
    memory = subprocess.run([sys.executable, "-m", "bench.objective_memory", "--real", "--device", "cuda", "--rows", "8192"],
                            cwd=ROOT, capture_output=True, text=True)
    lines += ["", "```", memory.stdout.strip() or memory.stderr[-2000:], "```"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
