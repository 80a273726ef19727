"""DistillModule: a frozen teacher, a student, and one pluggable loss callable.

The module never knows which loss it holds: it runs the forwards, hands a :class:`KDBatch` to
the loss and logs the :class:`LossOutput`. Evaluation (kdlab/metrics.py: per-domain perplexity,
greedy exact match, calibration, ROUGE and grammar metrics of sampled responses, teacher–student
agreement, a table of sample generations) runs in every validation and test pass.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from kdlab.agreement import AgreementMetrics
from kdlab.data.datamodule import SuiteChecker
from kdlab.losses.base import IGNORE_INDEX, KDBatch
from kdlab.metrics import EvalSettings, ModelEval, SampleTable, decode_responses
from kdlab.rollout import RolloutBuffer, RolloutKDBatch, plain_text_labels, sample


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
        self.student = student
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
        self.eval_settings = eval_settings or EvalSettings()
        self._table = SampleTable(self.eval_settings.table_rows)
        self._teacher_outputs: dict[tuple[str, int], str] = {}  # greedy outputs of the frozen teacher, for the table
        self.strict_loading = False  # checkpoints hold no teacher weights
        self.teacher_val_ppl: dict[str, float] | None = None  # the frozen teacher's, measured once
        self._evals: torch.nn.ModuleDict | None = None  # ModelEval per role, built once the data's domains are known
        self._rollout_buffer: RolloutBuffer | None = None  # for losses that need rollouts (MiniLLM, on-policy KD)
        self._rollout_generator: torch.Generator | None = None
        self.agreement = AgreementMetrics()  # RLKD's top-k agreement, logged for every objective

    # -- the frozen teacher -------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning calls .train() on the whole module; the teacher stays in eval
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    # -- forwards -----------------------------------------------------------------------------
    def _logits(self, model, batch: dict) -> Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> Tensor:
        return self._logits(self.teacher, batch)

    def _num_tokens(self, labels: Tensor) -> Tensor:
        # DDP averages gradients over ranks, so dividing each rank's sum by the mean count across
        # ranks makes the step the global token mean (METHODS.md §1, one shared reduction).
        count = (labels != IGNORE_INDEX).sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")
        return count

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # -- on-policy losses (MiniLLM, on-policy KD) train on samples: see _rollout_training_step --
        if getattr(self.loss, "needs_rollouts", False):
            loss = self._rollout_training_step(batch)
            if loss is not None:  # None: this step trains on the data batch, as below
                return loss
        # -------------------------------------------------------------------------------------------
        # The teacher runs first: run after the student, its forward competes for memory with the
        # student's live autograd graph, which cost ~25% of a step on CPU (bench/step_overhead.py).
        teacher_logits = self.teacher_logits(batch) if getattr(self.loss, "needs_teacher", True) else None
        kd_batch = KDBatch(
            student_logits=self._logits(self.student, batch),
            teacher_logits=teacher_logits,
            labels=batch["labels"],
            domain=batch["domain"],
            num_tokens=self._num_tokens(batch["labels"]),
        )
        out = self.loss(kd_batch)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        return out.loss

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
            plain_labels = plain_text_labels(batch["input_ids"], batch["attention_mask"])
            plain = KDBatch(
                student_logits=self._logits(self.student, batch),
                teacher_logits=self.teacher_logits(batch) if getattr(self.loss, "needs_plain_text_teacher", False) else None,
                labels=plain_labels,
                domain=batch["domain"],
                num_tokens=self._num_tokens(plain_labels),
            )
        kd_batch = RolloutKDBatch(
            student_logits=self._logits(self.student, inputs),
            teacher_logits=self.teacher_logits(inputs),
            labels=labels,
            domain=rollout.domain,
            num_tokens=self._num_tokens(labels),
            old_logprobs=rollout.logp_student,
            sample_logprobs=rollout.logp_sample,
            teacher_logprobs=rollout.logp_teacher,
            plain=plain,
            stats=self._rollout_buffer.stats,
        )
        out = self.loss(kd_batch)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        return out.loss

    @torch.no_grad()
    def _sample(self, prompt_ids: Tensor, prompt_mask: Tensor, teacher_mix: float):
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
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                max_new_tokens=settings.max_new_tokens or self.trainer.datamodule.max_new_tokens,
                teacher_mix=teacher_mix,
                vocab_size=self.vocab_size,
                generator=self._rollout_generator,
                **settings.sampling,
            )
        finally:
            self.student.train(was_training)

    # -- evaluation ---------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return self.trainer.datamodule.domains

    def _eval_for(self, role: str) -> ModelEval:
        if self._evals is None:
            checker = getattr(self.trainer.datamodule, "checker", None)
            grammar = self.tokenizer if isinstance(checker, SuiteChecker) else None  # the built-in grammar domain
            evals = {}
            for name, model in (("student", self.student), ("teacher", self.teacher)):
                if model is not None:
                    num_classes = self.vocab_size or model.get_output_embeddings().weight.shape[0]
                    evals[name] = ModelEval(self.domains, num_classes, self.eval_settings, grammar)
            self._evals = torch.nn.ModuleDict(evals).to(self.device)
        return self._evals[role]

    @torch.no_grad()
    def generate(self, model, batch: dict) -> list[str]:
        """Greedy continuations of the batch's left-padded prompts, decoded up to ``<eos>``."""
        tok = self.tokenizer
        out = model.generate(
            input_ids=batch["prompt_ids"],
            attention_mask=batch["prompt_mask"],
            max_new_tokens=self.trainer.datamodule.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return decode_responses(tok, out[:, batch["prompt_ids"].shape[1] :].tolist())

    @torch.no_grad()
    def sample_responses(self, model, batch: dict, num_samples: int, batch_idx: int) -> list[list[str]]:
        """``num_samples`` sampled responses per prompt of the batch (MiniLLM's evaluation protocol).

        Drawn with kdlab.rollout's sampler from a generator seeded by (eval seed, batch index), so
        a pass is reproducible and independent of the training RNG; every model gets the same seed
        (common random numbers make the student–teacher comparison less noisy).
        """
        settings = self.eval_settings
        generator = torch.Generator(self.device).manual_seed(settings.seed * 1_000_003 + batch_idx)
        rollout = sample(
            model,
            None,
            batch["prompt_ids"].repeat_interleave(num_samples, 0),
            batch["prompt_mask"].repeat_interleave(num_samples, 0),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_new_tokens=self.trainer.datamodule.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            vocab_size=self.vocab_size,
            generator=generator,
        )
        texts = decode_responses(self.tokenizer, [row[row != IGNORE_INDEX].tolist() for row in rollout.labels])
        return [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]

    def _eval_step(self, batch: dict, batch_idx: int, split: str, with_teacher: bool, with_exact: bool) -> None:
        dm = self.trainer.datamodule
        settings = self.eval_settings
        num_samples = settings.num_samples if split == "test" else settings.val_num_samples
        indices, domains = batch["index"].tolist(), batch["domain"].tolist()
        examples = [dm.examples[split][i] for i in indices]
        student_logits = self._logits(self.student, batch)
        teacher_logits = self.teacher_logits(batch) if self.teacher is not None else None
        if teacher_logits is not None:
            self.agreement.update(student_logits, teacher_logits, batch["labels"] != IGNORE_INDEX)
        texts = {}  # role -> (greedy outputs or None, sampled responses or None)
        roles = (("student", self.student, student_logits), ("teacher", self.teacher, teacher_logits))
        for role, model, logits in roles:
            if model is None or (role == "teacher" and not with_teacher):
                continue
            evaluator = self._eval_for(role)
            evaluator.update_logits(logits, batch)
            greedy = self.generate(model, batch) if with_exact else None
            if greedy is not None:
                evaluator.update_exact(domains, [dm.check(split, i, out) for i, out in zip(indices, greedy)])
                if role == "teacher":
                    self._teacher_outputs.update({(split, i): out for i, out in zip(indices, greedy)})
            samples = self.sample_responses(model, batch, num_samples, batch_idx) if num_samples else None
            if samples is not None:
                evaluator.update_samples(domains, [e.prompt for e in examples], [e.answer for e in examples], samples)
            texts[role] = (greedy, samples)
        self._add_table_rows(batch, split, examples, texts)

    def _add_table_rows(self, batch: dict, split: str, examples: list, texts: dict) -> None:
        """The batch's rows that belong in this pass's samples table (the first few of each domain)."""
        rows = self._table.wanted(batch["domain"].tolist())
        if not rows:
            return
        indices = batch["index"].tolist()

        def subset(picked):
            return {k: v[torch.tensor(picked, device=v.device)] for k, v in batch.items()}

        greedy, samples = texts["student"]
        student = [greedy[r] for r in rows] if greedy is not None else self.generate(self.student, subset(rows))
        teacher = [""] * len(rows)
        if self.teacher is not None:  # the frozen teacher's outputs never change: generated once per example
            missing = [r for r in rows if (split, indices[r]) not in self._teacher_outputs]
            if missing:
                outputs = self.generate(self.teacher, subset(missing))
                self._teacher_outputs.update({(split, indices[r]): out for r, out in zip(missing, outputs)})
            teacher = [self._teacher_outputs[(split, indices[r])] for r in rows]
        for j, r in enumerate(rows):
            self._table.add(
                split=split,
                domain=examples[r].domain,
                prompt=examples[r].prompt,
                reference=examples[r].answer,
                teacher=teacher[j],
                student=student[j],
                student_sample=samples[r][0] if samples is not None else "",
            )

    def _eval_epoch_end(self, split: str, with_teacher: bool, with_exact: bool) -> dict[str, Tensor]:
        student = self._eval_for("student")
        metrics = student.compute("", with_exact)
        student.reset()
        if with_teacher and self.teacher is not None:
            teacher = self._eval_for("teacher")
            metrics.update(teacher.compute("teacher_", with_exact))
            teacher.reset()
        metrics["loss"] = metrics["ppl"].log()
        if self.teacher is not None:
            metrics.update(self.agreement.compute())
            self.agreement.reset()
        self.log_dict({f"{split}/{k}": v for k, v in metrics.items()})
        if self.trainer.sanity_checking:
            self._table = SampleTable(self.eval_settings.table_rows)  # not a real validation: dropped
        else:
            self._table.flush(self.trainer, split)
        return metrics

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with_teacher = self.teacher_val_ppl is None
        self._eval_step(batch, batch_idx, "val", with_teacher=with_teacher, with_exact=self.generate_in_validation)

    def on_validation_epoch_end(self) -> None:
        with_teacher = self.teacher_val_ppl is None
        metrics = self._eval_epoch_end("val", with_teacher, self.generate_in_validation)
        if with_teacher and self.teacher is not None and not self.trainer.sanity_checking:
            self.teacher_val_ppl = {d: float(metrics[f"{d}/teacher_ppl"]) for d in self.domains}
        if self.teacher_val_ppl is not None and not with_teacher:
            # the cached teacher values, logged beside every validation for side-by-side curves
            self.log_dict({f"val/{d}/teacher_ppl": v for d, v in self.teacher_val_ppl.items()})

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test", with_teacher=True, with_exact=True)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", with_teacher=True, with_exact=True)

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
