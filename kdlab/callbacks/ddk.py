"""DDK: the training mixture follows where the student lags the teacher most.

Distilling LLMs' Knowledge via Domain-Discrepancy-Aware Distillation (DDK), Liu et al.,
NeurIPS 2024, arXiv 2407.16154; kdlab's specification is docs/methods.md §4.

At every validation during fitting, :class:`DDKReweighting` reads each domain's validation
perplexity of the student (ℓ_S, logged by the module as ``val/<domain>/ppl``) and of the frozen
teacher (ℓ_T, measured once: ``DistillModule.teacher_val_ppl``), turns them into domain
sampling proportions (Eq. 1 at the first update, Eq. 2 afterwards) and hands them to the
DataModule's :class:`~kdlab.data.sampler.DomainMixtureSampler`. ``trainer.val_check_interval``
plays the paper's K (the paper: K = 1000 steps).

    python -m kdlab.train data/mixing=ddk                 # DDK sampling with any loss
    python -m kdlab.train experiment=ddk                  # + the DDK loss CE + 0.2·KL
    python -m kdlab.train experiment=ddk callbacks.ddk.smoothing=false   # ablation: Eq. 1 each time
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor


def _as_tensor(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def discrepancy_factor(student_ppl: Sequence[float] | Tensor, teacher_ppl: Sequence[float] | Tensor) -> Tensor:
    """DDK Eq. 1 (Liu et al. 2024): the domain discrepancy factor r[i] = softmax_i(ℓ_S[i] / ℓ_T[i]).

    ``student_ppl`` and ``teacher_ppl`` are per-domain validation perplexities in one domain
    order; the result is a probability vector over the domains (float64).
    """
    return torch.softmax(_as_tensor(student_ppl) / _as_tensor(teacher_ppl), dim=0)


def smooth_update(
    factor: Sequence[float] | Tensor,
    student_ppl: Sequence[float] | Tensor,
    teacher_ppl: Sequence[float] | Tensor,
    alpha: float = 0.5,
) -> Tensor:
    """DDK Eq. 2 (Liu et al. 2024), "factor smooth updating":

    ψ[i] = r_t[i] · exp(ℓ_S[i] / ℓ_T[i]);   r_{t+1}[i] = α · ψ[i] / Σ_j ψ[j] + (1 − α) / N.

    Every domain keeps at least (1 − α)/N, so none starves. ψ/Σψ is computed as
    softmax(log r_t + ℓ_S/ℓ_T), the same quantity without overflowing exp for large ratios.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"DDK alpha must be in (0, 1], got {alpha}")
    r = _as_tensor(factor)
    psi = torch.softmax(r.log() + _as_tensor(student_ppl) / _as_tensor(teacher_ppl), dim=0)
    return alpha * psi + (1.0 - alpha) / len(r)


class DDKReweighting(Callback):
    """Sets the DataModule sampler's domain weights from the teacher–student gap (DDK, docs/methods.md §4).

    The first validation of a fit computes r with Eq. 1; each later one applies Eq. 2 with
    ``alpha`` to the previous r (``smoothing=False``, the paper's ablation: Eq. 1 recomputed
    every time). Until the first validation, training samples with the DataModule's initial
    weights (``data/mixing=ddk`` keeps them uniform): kdlab's students start from scratch, where
    the paper measures Eq. 1 on a pretrained student before distilling.

    Logged at every update (and the starting weights at step 0), through the trainer's loggers
    (CSV, W&B, …) at the current step: ``data/weight/<domain>`` (the new sampling weights),
    ``data/ppl_ratio/<domain>`` (ℓ_S/ℓ_T that produced them) and ``data/sampled/<domain>``
    (examples drawn since the previous update, summed over ranks). With ``data.num_workers=0``
    the batch right after an update follows the new weights; with workers, the loader has
    already drawn up to num_workers × prefetch_factor batches with the old ones (they count in
    the previous update's ``sampled``).
    """

    def __init__(self, alpha: float = 0.5, smoothing: bool = True):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"callbacks.ddk.alpha must be in (0, 1], got {alpha}")
        self.alpha, self.smoothing = alpha, smoothing
        self.factor: Tensor | None = None  # r_t, in the sampler's domain order; None before the first update

    # -- what DDK reads ----------------------------------------------------------------------
    @staticmethod
    def _sampler(trainer: L.Trainer):
        sampler = getattr(trainer.datamodule, "sampler", None)
        if sampler is None or not hasattr(sampler, "set_weights"):
            raise RuntimeError(
                "DDKReweighting needs a DataModule with a domain mixture sampler (trainer.datamodule.sampler, "
                "e.g. kdlab.data.datamodule.KDDataModule); pass the data to trainer.fit as datamodule=..."
            )
        return sampler

    @staticmethod
    def perplexities(trainer: L.Trainer, pl_module: L.LightningModule, domains: Sequence[str]) -> tuple[Tensor, Tensor]:
        """ℓ_S and ℓ_T per domain, in ``domains`` order, with a clear error for anything missing."""
        teacher = getattr(pl_module, "teacher_val_ppl", None)
        if teacher is None:
            raise RuntimeError(
                "DDK needs the teacher's per-domain validation perplexities (DistillModule.teacher_val_ppl), "
                "but none were measured: DDK needs a teacher and a loss that uses one (not loss=ce)."
            )
        student, teacher_ppl = [], []
        for d in domains:
            value = trainer.callback_metrics.get(f"val/{d}/ppl")
            if value is None or not math.isfinite(float(value)) or d not in teacher or not math.isfinite(teacher[d]):
                raise RuntimeError(
                    f"DDK has no validation perplexity for domain {d!r} (val/{d}/ppl from the student, "
                    f"teacher_val_ppl[{d!r}] from the teacher). Every training domain needs validation examples: "
                    f"give domain {d!r} some in the data's val split, or drop it from the training data "
                    f"(and do not cut validation short with trainer.limit_val_batches under DDK)."
                )
            student.append(float(value))
            teacher_ppl.append(float(teacher[d]))
        return _as_tensor(student), _as_tensor(teacher_ppl)

    # -- the update --------------------------------------------------------------------------
    def update(self, student_ppl: Tensor, teacher_ppl: Tensor) -> Tensor:
        """The next r: Eq. 1 at the first update (or always, without smoothing), else Eq. 2."""
        if self.factor is None or not self.smoothing:
            self.factor = discrepancy_factor(student_ppl, teacher_ppl)
        else:
            self.factor = smooth_update(self.factor, student_ppl, teacher_ppl, self.alpha)
        return self.factor

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Count only what this fit draws; before on_train_start, where the loader's workers may
        # already be prefetching.
        self._sampler(trainer).take_counts()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = self._sampler(trainer)
        if self.factor is not None:  # resumed from a checkpoint (callback state restored by now)
            sampler.set_weights(dict(zip(sampler.names, self.factor.tolist())))
        self._log(trainer, {f"data/weight/{d}": w for d, w in sampler.weight_dict.items()})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only validations inside fit move the mixture (not trainer.validate() after it, nor the sanity check).
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        sampler = self._sampler(trainer)
        domains = list(sampler.names)
        student, teacher = self.perplexities(trainer, pl_module, domains)
        factor = self.update(student, teacher)
        # Every rank computes the same r from the same synced metrics; broadcasting rank 0's makes
        # "all ranks sample with the same weights" hold bit for bit.
        self.factor = factor = torch.as_tensor(trainer.strategy.broadcast(factor.tolist(), src=0), dtype=torch.float64)
        sampler.set_weights(dict(zip(domains, factor.tolist())))
        counts = sampler.take_counts()
        counts = torch.tensor([counts[d] for d in domains], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").cpu()  # each rank's sampler counts its own draws
        metrics = {}
        for i, d in enumerate(domains):
            metrics[f"data/weight/{d}"] = float(sampler.weights[i])
            metrics[f"data/ppl_ratio/{d}"] = float(student[i] / teacher[i])
            metrics[f"data/sampled/{d}"] = float(counts[i])
        self._log(trainer, metrics)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        # self.log is not allowed in on_validation_end; the loggers are (rank-zero only, any logger).
        # Logged at the step Lightning gives val/* metrics (batches that stepped; at a mid-epoch
        # validation one less than global_step), so data/* rows line up with the val/* they come from.
        fit_loop = getattr(trainer, "fit_loop", None)
        step = fit_loop.epoch_loop._batches_that_stepped if fit_loop is not None else trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- checkpointing: a resumed run continues Eq. 2 from the saved r_t ----------------------
    def state_dict(self) -> dict:
        return {"factor": None if self.factor is None else self.factor.tolist()}

    def load_state_dict(self, state_dict: dict) -> None:
        factor = state_dict.get("factor")
        self.factor = None if factor is None else _as_tensor(factor)
