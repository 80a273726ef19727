"""Tokens per second and step time of training, logged for every run and kept for its summary."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs ``train/tokens_per_sec`` (real, non-padding input tokens of the student's forward
    passes, summed over ranks) and ``train/step_time`` (seconds per optimiser step, wall clock,
    including data loading and any rollouts), averaged over the last ``trainer.log_every_n_steps``
    steps; ``summary()`` gives the averages over the whole fit (validation time excluded), which
    kdlab.train writes to ``metrics.json`` and the sweep table."""

    def __init__(self):
        self.tokens = self.seconds = 0.0
        self.steps = 0
        self._window = [0.0, 0.0, 0]  # tokens, seconds, steps since the last log
        self._start: float | None = None
        self._step_tokens = 0.0

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._sync(trainer)
            self._start = time.perf_counter()
        self._step_tokens = self._step_tokens + batch["attention_mask"].sum()  # a tensor: no device sync here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # the optimiser step ends with the window's last micro-batch
        self._sync(trainer)
        now = time.perf_counter()
        seconds, self._start = now - self._start, now
        tokens = float(trainer.strategy.reduce(torch.as_tensor(self._step_tokens, device=pl_module.device).float(), reduce_op="sum"))
        self._step_tokens = 0.0
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1
        window = self._window
        window[0], window[1], window[2] = window[0] + tokens, window[1] + seconds, window[2] + 1
        if window[2] >= trainer.log_every_n_steps:
            pl_module.log_dict({"train/tokens_per_sec": window[0] / window[1], "train/step_time": window[1] / window[2]})
            self._window = [0.0, 0.0, 0]

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start = None  # validation time is not training time

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"train/tokens_per_sec": self.tokens / self.seconds, "train/step_time": self.seconds / self.steps}
