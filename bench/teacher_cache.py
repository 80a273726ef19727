"""The teacher signal cache (``teacher_cache.k``): a sweep with and without it, and the top-k error.

    KDLAB_CACHE=/tmp/kdcache-real python -m bench.teacher_cache [--steps 200] [--k 32] [--objectives fkl rkl jsd tvd skl]
    python -m bench.teacher_cache --skip-sweep        # the error table only
    python -m bench.teacher_cache --skip-error        # the sweep only
    python -m bench.teacher_cache --skip-sweep --real --vocab  # the error table with the real tier's pair

(a) **Sweep.** Each objective runs ``train_only=true`` for ``--steps`` steps on the default pair
(``kdlab.train.run`` in this process), once with the dense teacher and once with
``teacher_cache.k``; the two runs of an objective follow each other, so machine noise hits both
alike. The cached sweep starts from an empty signal cache, so its first job builds it: the
one-off build time is printed apart and counted in the cached total; a short uncounted dense
job warms the process up first, and the order of the two runs alternates. The models (the trained
default teacher and its warm-start student) come from ``$KDLAB_CACHE`` (trained there on first
use); the signals go to a temporary cache folder that links those models, removed at the end.
The issue's goal: cached / uncached sweep time ≤ 0.6.

(b) **Error.** For each token-level objective, the relative error of its value, |L_k − L| / |L|,
and of its gradient with respect to the student logits, ‖g_k − g‖ / ‖g‖, of the top-k view
(kdlab/losses/sparse.py) against the dense teacher, in float64 (so the numbers are the
approximation's, not rounding): on the default pair (its trained teacher and warm-start student,
at the labelled positions of training batches; V = the suite's vocabulary, so k = 8 and 32 only)
with ``--real`` instead, on SmolLM2-135M-Instruct and its depth-pruned student at the Python corpus's
labelled positions (V = 49,152; experiment=real); and on synthetic logits at V = 32,000 and 151,936.
The cached view is evaluated as stored (kdlab.teacher_cache.stored: float16 values), so the error
includes the storage's rounding, and the bytes stored per labelled position are printed. The
synthetic teacher is Zipf-like: at each position the logits are −a·log(rank) over a random
permutation of the vocabulary, with a drawn uniformly in [1, 3] (a = 1: a flat, heavy-tailed
position, a = 3: a peaked one); the student is the teacher plus Gaussian noise of standard
deviation 1 on every logit (a student close to the teacher, as during distillation).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

OBJECTIVES = ["fkl", "rkl", "jsd", "tvd", "skl"]
ERROR_OBJECTIVES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]
KS = [8, 32, 128]


# -- (a) the sweep ----------------------------------------------------------------------------------
def signal_cache_folder(models: Path) -> Path:
    """A fresh cache folder whose teachers/ and students/ are those of ``models`` (links): the
    trained models are reused, the teacher signals start empty."""
    folder = Path(tempfile.mkdtemp(prefix="kdlab-signals-"))
    models.mkdir(parents=True, exist_ok=True)
    for sub in ("teachers", "students"):
        (models / sub).mkdir(exist_ok=True)
        (folder / sub).symlink_to((models / sub).resolve(), target_is_directory=True)
    return folder


def sweep(args, cache: Path, out: Path) -> None:
    from bench.common import default_config
    from kdlab import teacher_cache
    from kdlab.train import run

    builds: list[float] = []
    original = teacher_cache.build

    def timed_build(*a, **kw):
        start = time.perf_counter()
        original(*a, **kw)
        builds.append(time.perf_counter() - start)

    teacher_cache.build = timed_build  # this process only: the one-off build time, apart
    def job(name: str, mode: str, steps: int) -> tuple[float, dict]:
        overrides = [f"loss={name}", "train_only=true", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                     "logger=csv", "+trainer.enable_progress_bar=false", f"trainer.log_every_n_steps={steps}"]
        if mode == "cached":
            overrides.append(f"teacher_cache.k={args.k}")
        cfg = default_config(*overrides, *args.overrides)
        cfg.paths.output_dir = str(out / f"{name}-{mode}-{steps}")
        cfg.paths.cache_dir = str(cache)
        start = time.perf_counter()
        metrics = run(cfg)
        return time.perf_counter() - start, metrics

    job(args.objectives[0], "dense", 5)  # warm-up, not counted: imports, first allocations, file caches
    rows = []
    for i, name in enumerate(args.objectives):
        row = {"objective": name}
        # the order alternates, so that neither mode always runs first
        for mode in ("dense", "cached") if i % 2 == 0 else ("cached", "dense"):
            row[mode], metrics = job(name, mode, args.steps)
            row[f"{mode}_step"] = metrics["train/step_time"]
        rows.append(row)
        print(f"{name}: dense {row['dense']:.1f} s, cached {row['cached']:.1f} s", flush=True)
    teacher_cache.build = original

    build = sum(builds)
    dense, cached = sum(r["dense"] for r in rows), sum(r["cached"] for r in rows)
    lines = [
        f"sweep of {len(rows)} objectives, {args.steps} steps each, train_only=true, default pair, CPU, "
        f"{args.threads} torch thread(s); cached: teacher_cache.k={args.k}",
        f"{'objective':<10} {'dense s':>8} {'cached s':>9} {'dense ms/step':>14} {'cached ms/step':>15}",
    ]
    for r in rows:
        lines.append(f"{r['objective']:<10} {r['dense']:>8.1f} {r['cached']:>9.1f} {1e3 * r['dense_step']:>14.1f} {1e3 * r['cached_step']:>15.1f}")
    lines.append(f"{'total':<10} {dense:>8.1f} {cached:>9.1f}   (the cached total includes the one-off build)")
    lines.append(f"one-off cache build: {build:.2f} s ({len(builds)} build(s))")
    lines.append(f"ratio cached/uncached: {cached / dense:.2f} (goal <= 0.6); without the build: {(cached - build) / dense:.2f}")
    bytes_per_position = teacher_cache.bytes_per_position
    lines.append("stored per labelled position (kdlab/teacher_cache.py): " + "; ".join(
        f"V={v:,}: " + ", ".join(f"k={k} {bytes_per_position(k, v)} B" for k in KS) for v in (49_152, 151_936)))
    print("\n".join(lines), flush=True)


# -- (b) the top-k error ----------------------------------------------------------------------------
def relative_errors(loss, student, labels, teacher, ks):
    """{k: (value error, gradient error)} of the top-k view against the dense teacher (float64)."""
    import torch

    from kdlab.losses.base import KDBatch
    from kdlab.losses.sparse import sparse_teacher
    from kdlab.teacher_cache import stored

    def value_and_grad(**teachers):
        s = student.detach().clone().requires_grad_(True)
        out = loss(KDBatch(s, labels=labels, num_tokens=(labels >= 0).sum(), **teachers))
        (grad,) = torch.autograd.grad(out.loss, s)
        return out.loss.item(), grad

    value, grad = value_and_grad(teacher_logits=teacher)
    errors = {}
    for k in ks:
        if k >= teacher.shape[-1]:
            continue
        # as the cache stores it (float16 values shifted by the row's largest), read back in float64
        view = stored(sparse_teacher(teacher, k)).map(lambda t: t.double() if t.is_floating_point() else t)
        v_k, g_k = value_and_grad(teacher_logits=None, teacher_sparse=view)
        errors[k] = (abs(v_k - value) / abs(value), ((g_k - grad).norm() / grad.norm()).item())
    return errors


def labelled_logits(teacher, student, datamodule, batches: int):
    """Student and teacher logits (float64) at the labelled positions of the first training batches."""
    import torch

    from kdlab.losses.base import IGNORE_INDEX

    s_rows, t_rows, labels = [], [], []
    with torch.no_grad():
        for batch, _ in zip(datamodule.train_dataloader(), range(batches)):
            mask = batch["labels"] != IGNORE_INDEX
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            s_rows.append(student.eval()(**inputs).logits[mask].double())
            t_rows.append(teacher.eval()(**inputs).logits[mask].double())
            labels.append(batch["labels"][mask])
    return torch.cat(s_rows)[None], torch.cat(t_rows)[None], torch.cat(labels)[None]


def default_pair_logits(batches: int):
    """The default pair: its trained teacher and warm-start student."""
    from hydra.utils import instantiate

    from bench.common import default_config
    from kdlab.build import build_model

    cfg = default_config("trainer.accelerator=cpu")
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    return labelled_logits(build_model(cfg, "teacher", tok, dm), build_model(cfg, "student", tok, dm), dm, batches)


def real_pair_logits(batches: int):
    """The real tier (experiment=real): SmolLM2-135M-Instruct and its depth-pruned student, before training."""
    from bench.common import real_pair

    _, dm, teacher, student = real_pair()
    return labelled_logits(teacher, student, dm, batches)


def zipf_logits(rows: int, vocab: int, seed: int = 0):
    """Synthetic Zipf-like teacher logits and a noisy student (module docstring), float64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sharpness = 1.0 + 2.0 * torch.rand(rows, 1, generator=g, dtype=torch.float64)
    ranks = torch.argsort(torch.rand(rows, vocab, generator=g), dim=-1).double() + 1.0  # a random permutation of 1..V
    teacher = -sharpness * ranks.log()
    student = teacher + torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    labels = teacher.argmax(-1)
    return student[None], teacher[None], labels[None]


def error_table(args) -> None:
    from kdlab.losses.divergences import load_loss
    from kdlab.losses.sparse import sparse_teacher
    from kdlab.teacher_cache import bytes_per_position

    if args.real:  # instead of the default pair
        cases = [("SmolLM2 -> pruned student (V={v})", lambda: real_pair_logits(args.batches))]
    else:
        cases = [("default pair, real teacher (V={v})", lambda: default_pair_logits(args.batches))]
    for vocab in args.vocab:
        cases.append((f"synthetic Zipf-like (V={vocab:,})", lambda vocab=vocab: zipf_logits(args.rows, vocab)))
    header = f"{'case':<36} {'objective':<9} " + " ".join(f"{f'k={k} value':>11} {f'k={k} grad':>10}" for k in KS)
    lines = [
        "relative error of the cached top-k view (as stored: float16 values) against the dense teacher, computed in float64: |L_k - L| / |L| and ||g_k - g|| / ||g||;",
        "'tail m': the teacher's mean probability outside its top-k",
        header,
    ]
    for title, make in cases:
        student, teacher, labels = make()
        title = title.format(v=teacher.shape[-1])
        # how much of the teacher the top-k leaves out: the mean tail mass m at this case's positions
        tails = {k: sparse_teacher(teacher[0], k).log_tail.exp().mean().item() for k in KS if k < teacher.shape[-1]}
        cells = " ".join(f"{tails[k]:>11.2e} {'':>10}" if k in tails else f"{'(k >= V)':>11} {'':>10}" for k in KS)
        lines.append(f"{title:<36} {'tail m':<9} {cells}")
        for name in ERROR_OBJECTIVES:
            errors = relative_errors(load_loss(name), student, labels, teacher, KS)
            cells = " ".join(f"{errors[k][0]:>11.2e} {errors[k][1]:>10.2e}" if k in errors else f"{'(k >= V)':>11} {'':>10}" for k in KS)
            lines.append(f"{title:<36} {name:<9} {cells}")
        print(f"{title}: {student.shape[1]} positions", flush=True)
    lines.append("stored per labelled position (kdlab/teacher_cache.py): " + "; ".join(
        f"V={v:,}: " + ", ".join(f"k={k} {bytes_per_position(k, v)} B" for k in KS) for v in (49_152, 151_936)))
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of every sweep job")
    parser.add_argument("--k", type=int, default=32, help="teacher_cache.k of the cached sweep")
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batches", type=int, default=4, help="training batches of the default pair for the error table")
    parser.add_argument("--rows", type=int, default=256, help="positions of each synthetic case")
    parser.add_argument("--vocab", type=int, nargs="*", default=[32_000, 151_936], help="synthetic vocabularies")
    parser.add_argument("--real", action="store_true", help="the real tier's pair (SmolLM2 and its pruned student) instead of the default pair in the error table")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-error", action="store_true")
    parser.add_argument("--out", default=None, help="run folders of the sweep (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep job")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import lightning  # noqa: F401  (imported first: it sets its loggers' levels, which are lowered below)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", "kdlab"):
        logging.getLogger(name).setLevel(logging.ERROR)

    models = Path(os.environ.get("KDLAB_CACHE", "~/.cache/kdlab")).expanduser()
    if not args.skip_sweep:
        cache = signal_cache_folder(models)
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdlab-bench-tc-"))
        try:
            sweep(args, cache, out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)  # the links and the signals; the models stay in KDLAB_CACHE
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
    if not args.skip_error:
        error_table(args)


if __name__ == "__main__":
    main()
