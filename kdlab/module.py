"""DistillModule: a frozen teacher, a student, and one pluggable loss callable.

The module never knows which loss it holds: it runs the forwards, hands a :class:`KDBatch` to
the loss and logs the :class:`LossOutput`. Validation and test passes are handed to
:class:`kdlab.evaluation.Evaluation` (per-domain perplexity, generations, ROUGE, calibration,
agreement, the samples table), which ``python -m kdlab.evaluate`` shares.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from kdlab.evaluation import Evaluation
from kdlab.heads import labelled_logits
from kdlab.losses.base import IGNORE_INDEX, KDBatch
from kdlab.losses.fused import fused_training_loss
from kdlab.losses.sparse import SparseTeacher
from kdlab.metrics import EvalSettings
from kdlab.preflight import check_optimisation
from kdlab.rollout import RolloutBuffer, RolloutKDBatch, plain_text_labels, sample, token_logprobs

# Lightning warns about every module in eval mode when training starts. The frozen teacher is in
# eval mode by design (482 modules for SmolLM2), so that warning is replaced by the module's own
# check of the student alone (DistillModule.on_train_start).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


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
    vocabulary they share (see ``kdlab.models.distillation_vocab_size``).
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
        self.evaluation = Evaluation(eval_settings, tokenizer, vocab_size)
        self.strict_loading = False  # checkpoints hold no teacher weights
        self._rollout_buffer: RolloutBuffer | None = None  # for losses that need rollouts (MiniLLM, on-policy KD)
        self._rollout_generator: torch.Generator | None = None

    # -- the frozen teacher -------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher stays in eval
        return self

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
            "rollout_generator": self._rollout_generator.get_state() if self._rollout_generator is not None else None,
            "rollout_device": str(self._rollout_generator.device) if self._rollout_generator is not None else None,
            "rollout_buffer": self._rollout_buffer.state_dict() if self._rollout_buffer is not None else None,
            "teacher_val_ppl": self.evaluation.teacher_val_ppl,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("kdlab")
        if not state:
            return
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["rollout_generator"] is not None:
            self._rollout_generator = torch.Generator(state["rollout_device"])
            self._rollout_generator.set_state(state["rollout_generator"])
        if state["rollout_buffer"] is not None:
            self._rollout_buffer = RolloutBuffer(self.loss.rollout, seed=torch.initial_seed())
            self._rollout_buffer.load_state_dict(state["rollout_buffer"])
        self.evaluation.teacher_val_ppl = state["teacher_val_ppl"]

    # -- forwards -----------------------------------------------------------------------------
    def logits(self, model, batch: dict) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> Tensor:
        return self.logits(self.teacher, batch)

    def labelled_logits(self, model, batch: dict, mask: Tensor) -> Tensor:
        """(1, N, V) logits of the N positions of ``mask``: the head runs on those rows only (kdlab/heads.py).

        Under FSDP the model's own forward computes them (its head's weight is only whole inside
        its FSDP unit's forward), and the rows are selected after.
        """
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        return labelled_logits(model, batch, mask, self.vocab_size, through_head=not sharded)

    def _num_tokens(self, labels: Tensor, batch: dict | None = None) -> Tensor:
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

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # -- loss.fused_head: the objective from hidden states and heads, no (N, V) logits ----------
        if getattr(self.loss, "fused_head", False):  # kdlab/losses/fused.py; refuses rollout losses
            num_tokens = self._num_tokens(batch["labels"], batch)
            out = fused_training_loss(self.loss, self.student, self.teacher, batch, self.vocab_size, num_tokens)
            return self._log_loss(out, batch["domain"])
        # -- on-policy losses (MiniLLM, on-policy KD) train on samples: see _rollout_training_step --
        if getattr(self.loss, "needs_rollouts", False):
            loss = self._rollout_training_step(batch)
            if loss is not None:  # None: this step trains on the data batch, as below
                return loss
        # -------------------------------------------------------------------------------------------
        # -- teacher_cache.k: the batch carries the cached teacher rows (kdlab/teacher_cache.py) ------
        # then no teacher forward: the objective gets a sparse view (top-k + tail, kdlab/losses/sparse.py)
        teacher_sparse = SparseTeacher.from_dict(batch["teacher_signals"]) if "teacher_signals" in batch else None
        # The teacher runs first: run after the student, its forward competes for memory with the
        # student's live autograd graph, which cost ~25% of a step on CPU (bench/step_overhead.py).
        needs_teacher = getattr(self.loss, "needs_teacher", True) and teacher_sparse is None
        # only labelled positions reach the heads and the objective's softmaxes (prompts and padding
        # carry no label): every tensor below is one row of the N labelled tokens
        mask = batch["labels"] != IGNORE_INDEX
        teacher_logits = None
        if needs_teacher:
            with torch.no_grad():
                teacher_logits = self.labelled_logits(self.teacher, batch, mask)
        kd_batch = KDBatch(
            student_logits=self.labelled_logits(self.student, batch, mask),
            teacher_logits=teacher_logits,
            labels=batch["labels"][mask].unsqueeze(0),
            num_tokens=self._num_tokens(batch["labels"], batch),
            teacher_sparse=teacher_sparse.map(lambda t: t[mask].unsqueeze(0)) if teacher_sparse is not None else None,
        )
        return self._log_loss(self.loss(kd_batch), batch["domain"])

    def _log_loss(self, out, domain: Tensor | None) -> Tensor:
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
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
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

    # -- rollouts (kdlab/rollout.py): losses with ``needs_rollouts`` -------------------------------
    def _rollout_training_step(self, batch: dict) -> Tensor | None:
        """One training step on rollouts of the batch's prompts, or None on a data-batch step.

        The buffer (``loss.rollout`` settings) decides when to sample anew and which mini-batch of
        rollouts this step gets. The loss receives a :class:`RolloutKDBatch`: logits of both models
        on the sampled sequences, the rollout-time log-probs, and, if the loss asks for it, the data
        batch's full sequences as plain text for a pre-training term (``needs_plain_text``).
        """
        if self._rollout_buffer is None:
            self._rollout_buffer = RolloutBuffer(self.loss.rollout, seed=torch.initial_seed())
        rollout = self._rollout_buffer.next(batch, self._sample)
        if rollout is None:
            return None
        inputs = rollout.model_inputs()
        labels = rollout.labels
        plain = None
        if getattr(self.loss, "needs_plain_text", False):
            # the data's pre-training corpus (data.pretrain) when it has one, else the batch's own sequences
            text = batch.get("plain") or {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "labels": plain_text_labels(batch["input_ids"], batch["attention_mask"]),
            }
            plain = KDBatch(
                student_logits=self.logits(self.student, text),
                teacher_logits=self.teacher_logits(text) if getattr(self.loss, "needs_plain_text_teacher", False) else None,
                labels=text["labels"],
                domain=batch["domain"],
                num_tokens=self._num_tokens(text["labels"]),
            )
        teacher_logits = self.teacher_logits(inputs)
        stats = self._rollout_buffer.stats
        if rollout.logp_teacher is None:
            # the student sampled alone: this forward scores its tokens (one teacher forward per step, not two)
            rollout = replace(rollout, logp_teacher=token_logprobs(teacher_logits, labels))
            stats = {**stats, "rev_kl": rollout.sequence_reverse_kl().mean()}
        kd_batch = RolloutKDBatch(
            student_logits=self.logits(self.student, inputs),
            teacher_logits=teacher_logits,
            labels=labels,
            domain=rollout.domain,
            num_tokens=self._num_tokens(labels),
            old_logprobs=rollout.logp_student,
            sample_logprobs=rollout.logp_sample,
            teacher_logprobs=rollout.logp_teacher,
            plain=plain,
            stats=stats,
        )
        return self._log_loss(self.loss(kd_batch), kd_batch.domain)

    @torch.no_grad()
    def _sample(self, prompt_ids: Tensor, prompt_mask: Tensor, teacher_mix: float, score_teacher: bool = True):
        """Rollouts of left-padded prompts; the student samples in eval mode (no dropout), as it is
        then the policy whose log-probs the loss treats as q_old."""
        settings = self.loss.rollout
        if self._rollout_generator is None:  # its own stream from the run's seed (and rank); the global RNG is untouched
            self._rollout_generator = torch.Generator(prompt_ids.device).manual_seed(torch.initial_seed() + self.global_rank)
        was_training = self.student.training
        self.student.eval()
        try:
            return sample(
                self.student,
                self.teacher,
                prompt_ids,
                prompt_mask,
                eos_token_id=self.trainer.datamodule.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                max_new_tokens=settings.max_new_tokens or self.trainer.datamodule.max_new_tokens,
                teacher_mix=teacher_mix,
                vocab_size=self.vocab_size,
                generator=self._rollout_generator,
                score_teacher=score_teacher,
                **settings.sampling,
            )
        finally:
            self.student.train(was_training)

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
