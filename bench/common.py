"""Helpers shared by the bench scripts: the default pair and data, composed from the real config."""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

import kdlab.resolvers  # noqa: F401  (the configs' resolvers, e.g. model=smollm2's file)

warnings.filterwarnings("ignore", message=".*self.log.*")  # modules run outside a Trainer here

from kdlab import CONF_DIR  # noqa: E402


def default_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/kdlab-bench"
    return cfg


def real_models(cfg):
    """``cfg``'s tokenizer, teacher and student (eval mode): for model=smollm2, SmolLM2-135M-Instruct and its pruned student."""
    tokenizer = instantiate(cfg.model.tokenizer)
    teacher = instantiate(cfg.model.teacher, tokenizer=tokenizer).eval()
    student = instantiate(cfg.model.student, tokenizer=tokenizer).eval()
    return tokenizer, teacher, student


def real_pair():
    """The real tier (experiment=real): tokenizer, data, SmolLM2-135M-Instruct and its pruned student (eval mode)."""
    cfg = default_config("experiment=real", "trainer.accelerator=cpu")
    tokenizer, teacher, student = real_models(cfg)
    return tokenizer, instantiate(cfg.data, tokenizer=tokenizer), teacher, student


def default_pair_and_batch(cfg, device: str):
    """Untrained default teacher and student (timings do not depend on the weights) and one training batch."""
    tokenizer = instantiate(cfg.model.tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    teacher = instantiate(cfg.model.teacher, tokenizer=tokenizer).to(device).eval().requires_grad_(False)
    student = instantiate(cfg.model.student, tokenizer=tokenizer).to(device)
    batch = next(iter(datamodule.train_dataloader()))
    batch = {k: v.to(device) for k, v in batch.items()}
    return tokenizer, teacher, student, batch


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock reading counts it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timing(fn, times: list[float], device: str):
    """``fn`` that also appends each call's seconds to ``times`` (device work included)."""

    def timed_fn(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        times.append(time.perf_counter() - start)
        return out

    return timed_fn


def timed(fn, device: str) -> float:
    """Seconds of one call of ``fn``."""
    times: list[float] = []
    timing(fn, times, device)()
    return times[0]


def interleaved_medians(fns: dict, device: str, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median time of each function, run round-robin so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of a list (std 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"
