"""MiniLLM's ablation on the built-in suite, beside forward KL and ce, over seeds.

    KDLAB_CACHE=/tmp/kdcache-real python -m bench.minillm_ablation [--seeds 0 1 2] [--steps 150]

Each variant is one in-process ``kdlab.train.run`` on the default config (logger=csv, one
validation at the end, sampled-response metrics off — greedy exact match is what is compared),
from the same cached teacher and SFT warm-started student. Printed per variant, mean ± std
over the seeds:

- ``test exact``: held-out (test split) greedy exact match of the exported student;
- ``rev KL``: the student's sequence-level reverse KL[q‖p] on the test prompts, estimated by
  sampling ``--samples`` continuations per prompt from the student (temperature 1) and averaging
  Σ_t log q(y_t) − log p(y_t) (the quantity MiniLLM minimises; lower = closer to the teacher's modes).

A "start" row evaluates the warm-started student before distillation (``trainer.max_steps=0``),
and the teacher's exact match is printed as the reference. All variants take the same number of
optimisation steps; a MiniLLM step trains on a mini-batch of 16 rollouts plus the data batch as
plain text (kdlab/conf/loss/minillm.yaml), a fkl/ce step on the 64-example data batch.

One intra-op thread by default: these models are tiny, and on a shared 2-core machine two
spinning OpenMP threads per process made runs 5x slower (measured: a 20-step run 53 s vs 9 s).
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

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from transformers import AutoModelForCausalLM

from kdlab import CONF_DIR  # noqa: E402
from kdlab.build import build_model
from kdlab.models import distillation_vocab_size
from kdlab.rollout import sample
from kdlab.train import run

VARIANTS = {
    "minillm": ["loss=minillm", "+ablation/minillm=full"],
    "w/o length norm": ["loss=minillm", "+ablation/minillm=no_length_norm"],
    "w/o teacher mix": ["loss=minillm", "+ablation/minillm=no_teacher_mix"],
    "w/o single-step": ["loss=minillm", "+ablation/minillm=no_single_step"],
    "fkl": ["loss=fkl"],
    "ce": ["loss=ce"],
}


def config(out_dir: Path, steps: int, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = ["logger=csv", f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(steps, 1)}"]
        # validation only picks the checkpoint (val/loss): its greedy generation is skipped
        cfg = compose("train", overrides=[*base, "module.generate_in_validation=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        if cfg.get("eval") is not None:  # sampled-response metrics are not compared here: skip their cost
            cfg.eval.num_samples = 0
            cfg.eval.val_num_samples = 0
    return cfg


class ReverseKL:
    """Sequence-level KL[q‖p] of exported students on the test prompts (the teacher loaded once)."""

    def __init__(self, cfg, samples: int):
        self.tokenizer = instantiate(cfg.model.tokenizer)
        self.datamodule = instantiate(cfg.data, tokenizer=self.tokenizer)
        self.teacher = build_model(cfg, "teacher", self.tokenizer, self.datamodule).eval()
        self.samples = samples

    @torch.no_grad()
    def __call__(self, student_dir: Path, seed: int) -> float:
        student = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True).eval()
        vocab = distillation_vocab_size(self.teacher, student, self.tokenizer)
        generator = torch.Generator().manual_seed(1000 + seed)
        values = []
        for batch in self.datamodule.test_dataloader():
            rollout = sample(
                student,
                self.teacher,
                batch["prompt_ids"].repeat_interleave(self.samples, 0),
                batch["prompt_mask"].repeat_interleave(self.samples, 0),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                max_new_tokens=self.datamodule.max_new_tokens,
                vocab_size=vocab,
                generator=generator,
            )
            values.append(rollout.sequence_reverse_kl())
        return float(torch.cat(values).mean())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps per run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=4, help="student samples per test prompt for the reverse KL")
    parser.add_argument("--out", default="/tmp/kdlab-minillm-ablation")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    start = time.time()

    rkl = ReverseKL(config(out / "start", 0, ["loss=ce"]), args.samples)
    start_metrics = run(config(out / "start", 0, ["loss=ce"]))
    rows = [{"variant": "start (SFT warm start)", "seed": "-", "exact": start_metrics["test/exact_match"], "rev_kl": rkl(out / "start" / "student", 0), "seconds": 0.0}]
    teacher_exact = start_metrics["test/teacher_exact_match"]
    for seed in args.seeds:
        for name in args.variants:
            run_dir = out / f"{name.replace('/', '').replace(' ', '_')}-seed{seed}"
            t0 = time.time()
            metrics = run(config(run_dir, args.steps, [*VARIANTS[name], f"seed={seed}"]))
            seconds = time.time() - t0
            rows.append({"variant": name, "seed": seed, "exact": metrics["test/exact_match"], "rev_kl": rkl(run_dir / "student", seed), "seconds": seconds})
            print(f"[{time.time() - start:6.0f}s] {name:<16} seed {seed}: exact {rows[-1]['exact']:.3f}  rev KL {rows[-1]['rev_kl']:.3f}  ({seconds:.0f}s)", flush=True)

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nMiniLLM ablation on the built-in suite: {args.steps} steps, seeds {args.seeds}, rev KL from {args.samples} samples per test prompt")
    print(f"{'variant':<24} {'test exact match':>18} {'rev KL (student)':>18} {'s/run':>6}")
    for name in ["start (SFT warm start)", *args.variants]:
        group = [r for r in rows if r["variant"] == name]
        secs = statistics.mean(r["seconds"] for r in group)
        print(f"{name:<24} {mean_std([r['exact'] for r in group]):>18} {mean_std([r['rev_kl'] for r in group]):>18} {secs:>6.0f}")
    print(f"{'teacher':<24} {teacher_exact:>18.3f} {0.0:>18.3f}")
    print(f"total {time.time() - start:.0f}s; per-run results in {out / 'results.csv'}")


if __name__ == "__main__":
    main()
