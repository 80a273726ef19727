"""What evaluation adds to a training run on the default settings, as a fraction of training time.

    python -m bench.eval_cost [--accelerator cpu|gpu] [--repeats 3] [overrides ...]

Runs the default distillation (``python -m kdlab.train``'s config: trained default teacher and
warm-started student from the cache, 600 steps, a validation every 200) in this process and
times, side by side:

1. the fit itself: wall time inside validation passes vs the rest (training), as a callback sees
   them — the figure a user pays (goal: validation ≤ 15% of training time);
2. one validation pass of the fitted student, timed round-robin ``--repeats`` times in three
   settings — perplexity + agreement only; + greedy exact match (kdlab before issue 6); the
   default (+ ECE, grammar true KL, one sampled response per prompt with ROUGE and grammar
   validity, the samples table) — each as a fraction of the training time between two validations;
3. the test pass run once at the end (teacher included, ``eval.num_samples`` samples per prompt).

Extra arguments are Hydra overrides of the run (e.g. ``trainer.max_steps=200``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import replace

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from bench.common import default_config
from kdlab.build import build_model
from kdlab.models import distillation_vocab_size
from kdlab.module import DistillModule

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class StageTimer(L.Callback):
    """Wall time spent in validation passes during fit (the rest of fit is training)."""

    def __init__(self):
        self.validation: list[float] = []
        self._start = 0.0

    def on_validation_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.validation.append(time.perf_counter() - self._start)

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = default_config("logger=csv", f"trainer.accelerator={args.accelerator}", *args.overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/kdlab-bench-eval"
    L.seed_everything(cfg.seed)
    tokenizer = instantiate(cfg.model.tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    teacher = build_model(cfg, "teacher", tokenizer, datamodule)  # trained once and cached, like a real run
    student = build_model(cfg, "student", tokenizer, datamodule)
    module = DistillModule(
        student,
        teacher,
        instantiate(cfg.loss),
        tokenizer,
        vocab_size=distillation_vocab_size(teacher, student, tokenizer),
        eval_settings=instantiate(cfg.eval),
        **cfg.module,
    )
    timer = StageTimer()
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate(cfg.logger),
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    fit_validations = list(timer.validation)  # the validate calls below append to it too
    validation = sum(fit_validations)
    training = fit_time - validation
    steps, interval = trainer.global_step, cfg.trainer.val_check_interval
    per_interval = training / steps * interval

    # One validation pass in three settings, round-robin so that machine noise hits them alike.
    # The teacher's validation values are cached by then, as after the first validation of a run.
    default = instantiate(cfg.eval)
    no_sampling = replace(default, val_num_samples=0, table_rows=0)
    settings = {
        "perplexity + agreement only": (False, no_sampling),
        "+ greedy exact match (before issue 6)": (True, no_sampling),
        "default (all metrics, samples table)": (True, default),
    }
    times = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (greedy, eval_settings) in settings.items():
            module.generate_in_validation = greedy
            module.evaluation.settings, module.evaluation.models = eval_settings, None  # rebuilt with these settings
            start = time.perf_counter()
            trainer.validate(module, datamodule=datamodule, verbose=False)
            times[name].append(time.perf_counter() - start)

    module.generate_in_validation = True
    module.evaluation.settings, module.evaluation.models = default, None
    start = time.perf_counter()
    trainer.test(
        module, datamodule=datamodule, verbose=False
    )  # once per run: teacher too, eval.num_samples samples each
    test_time = time.perf_counter() - start

    print(
        f"device={args.accelerator} torch threads={torch.get_num_threads()} steps={steps} val_check_interval={interval} "
        f"val examples={len(datamodule.records['val'])} eval: {default}"
    )
    print(
        f"fit: {fit_time:.1f} s = training {training:.1f} s ({training / steps * 1e3:.1f} ms/step) + {len(fit_validations)} validations {validation:.1f} s "
        f"({', '.join(f'{t:.2f}' for t in fit_validations)} s; the first also scores the teacher once)"
    )
    print(f"validation time / training time in the fit = {validation / training:.1%}   (goal <= 15%)")
    print(
        f"one validation pass (median of {args.repeats}), as a fraction of the {interval} training steps between validations ({per_interval:.1f} s):"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<40} {median:6.2f} s  {median / per_interval:6.1%}")
    print(
        f"the test pass at the end of a run (student and teacher, {default.num_samples} samples per prompt): {test_time:.1f} s = {test_time / training:.1%} of training time"
    )


if __name__ == "__main__":
    main()
