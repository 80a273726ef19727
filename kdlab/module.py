"""DistillModule: the Lightning wiring of a frozen teacher, a student and one pluggable loss.

The module never knows which loss it holds: the training step that serves the loss's declared
``Needs`` is chosen once, here (kdlab/steps.py), and the module logs the :class:`LossOutput` it
returns. Validation and test passes are handed to :class:`kdlab.evaluation.Evaluation`
(per-domain perplexity, generations, ROUGE, calibration, agreement, the samples table), which
``python -m kdlab.evaluate`` shares.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from kdlab.evaluation import Evaluation
from kdlab.heads import labelled_logits
from kdlab.losses.base import IGNORE_INDEX, LossOutput, needs_of
from kdlab.metrics import EvalSettings
from kdlab.preflight import check_optimisation
from kdlab.steps import choose_step


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DistillModule(L.LightningModule):
    """Distils ``teacher`` into ``student`` with ``loss`` (any callable over a KDBatch).

    The teacher is frozen (no gradients, always in eval mode, run under ``no_grad``) and is
    stripped from every checkpoint; only the student is optimised, with AdamW and a linear
    warmup + cosine learning-rate schedule. ``vocab_size`` truncates both models' logits to the
    vocabulary they share (see ``kdlab.models.distillation_vocab_size``). ``teacher_signals``: the
    teacher cache (``teacher_cache.k``, :class:`kdlab.teacher_cache.TeacherSignals`), whose rows for
    each training batch's records replace the teacher forward. ``vocabulary``: a teacher with
    another tokenizer (:class:`kdlab.data.alignment.VocabularyMap`); ``vocab_size`` is then the student's.
    """

    def __init__(
        self,
        student,
        teacher,
        loss,
        tokenizer,
        vocab_size: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        generate_in_validation: bool = True,
        eval_settings: EvalSettings | None = None,
        teacher_signals=None,
        vocabulary=None,
    ):
        super().__init__()
        check_optimisation(lr, weight_decay, betas, warmup_steps, min_lr_ratio)
        self.student = student.train()  # from_pretrained returns a model in eval mode (dropout off); the student trains
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.loss = loss
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.generate_in_validation = generate_in_validation
        # across tokenizers the teacher's per-token measures are over other tokens: evaluation leaves them out
        self.evaluation = Evaluation(eval_settings, tokenizer, vocab_size, teacher_comparable=vocabulary is None)
        self.strict_loading = False  # checkpoints hold no teacher weights
        self.step = choose_step(needs_of(loss), teacher_signals, vocabulary)  # kdlab/steps.py

    # -- the frozen teacher -------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher stays in eval
        return self

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts (after this hook).
        # The frozen teacher is in eval mode by design (482 modules for SmolLM2), so that warning
        # is replaced by the check of the student alone below. The filter is set here, at every
        # fit, rather than at import: a caller's warnings.catch_warnings (pytest's, for one) would
        # have dropped an import-time filter.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    def on_train_start(self) -> None:
        frozen = [name for name, m in self.student.named_modules() if not m.training]
        if frozen:
            rank_zero_warn(f"{len(frozen)} student module(s) are in eval mode at the start of training (first: {frozen[:3]})")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        # what else decides the rest of the run, for an exact resume (Lightning keeps the student,
        # optimizer, scheduler, step and callbacks; the DataModule its sampler)
        checkpoint["kdlab"] = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "teacher_val_ppl": self.evaluation.teacher_val_ppl,
            **self.step.state_dict(),  # the rollout buffer and sampling stream, for rollout losses
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("kdlab")
        if not state:
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step.load_state_dict(state)
        self.evaluation.teacher_val_ppl = state["teacher_val_ppl"]

    # -- forwards, for the training steps (kdlab/steps.py) --------------------------------------
    def logits(self, model, batch: dict) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> Tensor:
        return self.logits(self.teacher, batch)

    def labelled_logits(self, model, batch: dict, mask: Tensor, vocab_size: int | None = None) -> Tensor:
        """(1, N, V) logits of the N positions of ``mask``: the head runs on those rows only (kdlab/heads.py).
        ``vocab_size``: columns kept (default: the distillation's; across tokenizers the teacher has its own).

        Under FSDP the model's own forward computes them (its head's weight is only whole inside
        its FSDP unit's forward), and the rows are selected after.
        """
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        return labelled_logits(model, batch, mask, vocab_size or self.vocab_size, through_head=not sharded)

    def num_tokens(self, labels: Tensor, batch: dict | None = None) -> Tensor:
        """The normaliser that makes an optimiser step's loss Σ(valid tokens) / N(valid tokens).

        N counts the whole step: every rank and, under gradient accumulation, every micro-batch.
        DDP averages gradients over W ranks and Lightning divides each of k micro-batch losses by
        k, so a micro-batch's sum is divided by mean_ranks(N_window) / k, where N_window is the
        rank's valid tokens over its k micro-batches (``window_tokens``, counted by the DataModule
        before the first of them): the step's gradient is then that of Σ_all / N_all, as one batch
        of k·b·W records. Without a window (rollouts, k = 1) N is the micro-batch's own count.
        """
        if batch is not None and "window_tokens" in batch:
            count = batch["window_tokens"].float() / batch["window_size"].float()
        else:
            count = (labels != IGNORE_INDEX).sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")
        return count

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._log_loss(self.step(self, batch), batch["domain"])

    def _log_loss(self, out: LossOutput, domain: Tensor | None) -> Tensor:
        if not torch.isfinite(out.loss):
            # stop before a NaN step reaches the weights: the last checkpoint stays the last good one
            names = getattr(self.trainer.datamodule, "domains", None) if self._trainer is not None else None
            ids = domain.tolist() if domain is not None else []
            domains = sorted({names[d] if names else str(d) for d in ids if d >= 0})
            raise FloatingPointError(
                f"the training loss is {out.loss.item()} at step {self.global_step} (batch domains: {domains}): training "
                "diverged. Lower module.lr, keep trainer.gradient_clip_val, or try trainer.precision=32-true; "
                "the last checkpoint is the last good student, and nothing is exported"
            )
        # averaged over ranks: each rank's loss is its share of the step's token sum over the global count
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()}, sync_dist=True)
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # a finite loss can still give a non-finite gradient (an overflow in backward): stop before the step
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            bad = [n for n, p in self.student.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise FloatingPointError(
                f"the gradient is not finite at step {self.global_step} ({len(bad)} tensors, e.g. {bad[0]}): training "
                "diverged. Lower module.lr or try trainer.precision=32-true; the last checkpoint is the last good "
                "student, and nothing is exported"
            )

    # -- evaluation (kdlab/evaluation.py, shared with kdlab.evaluate) -------------------------
    @property
    def teacher_val_ppl(self) -> dict[str, float] | None:
        """The frozen teacher's per-domain validation perplexities, measured once (DDK reads them)."""
        return self.evaluation.teacher_val_ppl

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.step(self, batch, batch_idx, "val", with_exact=self.generate_in_validation)

    def on_validation_epoch_end(self) -> None:
        self.evaluation.epoch_end(self, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.step(self, batch, batch_idx, "test", with_exact=True)

    def on_test_epoch_end(self) -> None:
        self.evaluation.epoch_end(self, "test")

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=self.betas,
        )
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
