"""The training step: one strategy per way a loss consumes the models, chosen once from its ``Needs``.

    step = choose_step(needs_of(loss), teacher_signals=None)   # kdlab.losses.base.Needs
    out = step(module, batch)                                   # a LossOutput, or None (below)

- :class:`TeacherForwardStep`: both models' logits at the labelled positions (or none of the
  teacher's, for a loss that needs no teacher), the teacher first.
- :class:`CachedTeacherStep`: the student's logits and the teacher cache's rows for the batch's
  records (``teacher_cache.k``, kdlab/teacher_cache.py): no teacher forward.
- :class:`FusedHeadStep`: both models' last hidden states and output heads, no (N, V) logits
  (``loss.fused_head``, kdlab/losses/fused.py).
- :class:`RolloutStep`: samples of the batch's prompts (MiniLLM, on-policy KD; kdlab/rollout.py),
  or, on the steps its schedule leaves to the data, the teacher-forward step.
- :class:`AlignedStep`: across tokenizers (``Needs.aligned``): the teacher on its own tokenisation
  of the records, at the first positions of the groups aligned with the student's
  (kdlab/data/alignment.py), or the teacher cache's rows there.

A step reads the module's models and its helpers (``logits``, ``labelled_logits``, ``num_tokens``)
and never logs: the module logs the :class:`LossOutput` (kdlab/module.py). Only the labelled
positions reach the heads and the objective's softmaxes (prompts and padding carry no label), so a
token-level step hands the loss one row of the N labelled tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from kdlab.heads import last_hidden_rows, plain_head
from kdlab.losses.base import IGNORE_INDEX, AlignedKDBatch, KDBatch, LossOutput, Needs, RolloutKDBatch
from kdlab.losses.fused import fused_head_loss
from kdlab.losses.sparse import SparseTeacher
from kdlab.rollout import RolloutBuffer, plain_text_labels, sample, token_logprobs


class Step:
    """A training step: ``step(module, batch) -> LossOutput``; stateful steps checkpoint their state."""

    def __call__(self, module, batch: dict) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def choose_step(needs: Needs, teacher_signals=None, vocabulary=None) -> Step:
    """The step that provides what ``needs`` declares, from ``teacher_signals`` (the teacher cache, or
    None) and ``vocabulary`` (across tokenizers: the two vocabularies' shared tokens, a
    kdlab.data.alignment.VocabularyMap); a ValueError naming the fix for combinations no step
    provides (checked before any model is built, too: kdlab/teacher_cache.py)."""
    teacher_cached = teacher_signals is not None
    if needs.aligned:
        if needs.fused_head or needs.rollouts is not None:
            raise ValueError("an objective across tokenizers reads both models' logits on the data: it takes no fused_head and no rollouts")
        if vocabulary is None:
            raise ValueError("this objective compares the teacher on its own tokenisation; the data carries none (use data=files or data=python_corpus)")
        return AlignedStep(vocabulary, teacher_signals)
    if needs.fused_head:
        if needs.rollouts is not None:
            raise ValueError(
                "loss.fused_head=true is for off-policy objectives, but this loss trains on rollouts, whose "
                "losses read full logits; set loss.fused_head=false"
            )
        if teacher_cached:
            raise ValueError(
                "loss.fused_head=true computes the teacher's logits from its hidden states, but teacher_cache.k is set, "
                "so the batch carries the cached teacher instead; set loss.fused_head=false or teacher_cache.k=null"
            )
        return FusedHeadStep(needs)
    if needs.rollouts is not None:
        return RolloutStep(needs)
    if teacher_cached:
        return CachedTeacherStep(teacher_signals)
    return TeacherForwardStep(needs)


def _token_batch(module, batch: dict, mask: Tensor, teacher_logits: Tensor | None, teacher_sparse: SparseTeacher | None) -> KDBatch:
    return KDBatch(
        student_logits=module.labelled_logits(module.student, batch, mask),
        teacher_logits=teacher_logits,
        labels=batch["labels"][mask].unsqueeze(0),
        num_tokens=module.num_tokens(batch["labels"], batch),
        teacher_sparse=teacher_sparse,
    )


class TeacherForwardStep(Step):
    """The teacher's logits (when the loss needs them) and the student's, at the labelled positions.

    The teacher runs first: run after the student, its forward competes for memory with the
    student's live autograd graph, which cost ~25% of a step on CPU (bench/step_overhead.py).
    """

    def __init__(self, needs: Needs):
        self.with_teacher = needs.teacher

    def __call__(self, module, batch: dict) -> LossOutput:
        mask = batch["labels"] != IGNORE_INDEX
        teacher_logits = None
        if self.with_teacher:
            with torch.no_grad():
                teacher_logits = module.labelled_logits(module.teacher, batch, mask)
        return module.loss(_token_batch(module, batch, mask, teacher_logits, None))


class CachedTeacherStep(Step):
    """The teacher cache's rows for the batch's records (top-k + tail, kdlab/losses/sparse.py) instead
    of a teacher forward: ``signals.view(batch["index"], batch["labels"])`` lays them out like the labels."""

    def __init__(self, signals):
        self.signals = signals

    def __call__(self, module, batch: dict) -> LossOutput:
        mask = batch["labels"] != IGNORE_INDEX
        sparse = self.signals.view(batch["index"], batch["labels"]).map(lambda t: t[mask].unsqueeze(0))
        return module.loss(_token_batch(module, batch, mask, None, sparse))


class AlignedStep(Step):
    """Across tokenizers: the student's logits at its labelled positions, and the teacher's, on its own
    tokenisation, at each aligned group's first position (``teacher_labels``), or the teacher cache's
    rows there; ``kd_student`` says which student row each one is compared with. The teacher runs first."""

    def __init__(self, vocabulary, signals=None):
        self.vocabulary, self.signals = vocabulary, signals

    def __call__(self, module, batch: dict) -> LossOutput:
        mask = batch["labels"] != IGNORE_INDEX
        read_at = batch["teacher_labels"]  # the teacher's next token at each group's first position
        groups = read_at != IGNORE_INDEX
        teacher_logits = teacher_sparse = None
        if self.signals is not None:  # laid out like read_at, which the cache checks against what it stored
            teacher_sparse = self.signals.view(batch["index"], read_at).map(lambda t: t[groups].unsqueeze(0))
        else:
            teacher_batch = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
            with torch.no_grad():
                teacher_logits = module.labelled_logits(module.teacher, teacher_batch, groups, self.vocabulary.teacher_size)
        return module.loss(
            AlignedKDBatch(
                student_logits=module.labelled_logits(module.student, batch, mask),
                teacher_logits=teacher_logits,
                labels=batch["labels"][mask].unsqueeze(0),
                num_tokens=module.num_tokens(batch["labels"], batch),
                teacher_sparse=teacher_sparse,
                aligned_rows=batch["kd_student"][mask].nonzero().squeeze(-1),
                matched=batch["kd_matched"][batch["kd_student"]],
                shared_vocab=self.vocabulary.to(mask.device),
            )
        )


class FusedHeadStep(Step):
    """The objective from both models' last hidden states and output heads (kdlab/losses/fused.py):
    rows are selected before the heads, and the teacher runs first, as in the teacher-forward step."""

    def __init__(self, needs: Needs):
        self.with_teacher = needs.teacher

    def __call__(self, module, batch: dict) -> LossOutput:
        mask = batch["labels"] != IGNORE_INDEX
        teacher_inputs = {}
        if self.with_teacher:
            head = plain_head(module.teacher, "teacher")
            with torch.no_grad():
                hidden = last_hidden_rows(module.teacher, batch, mask)
            teacher_inputs = dict(teacher_hidden=hidden, teacher_weight=head.weight, teacher_bias=head.bias)
        head = plain_head(module.student, "student")
        hidden = last_hidden_rows(module.student, batch, mask)
        num_tokens = module.num_tokens(batch["labels"], batch)
        return fused_head_loss(
            module.loss, hidden, head.weight, batch["labels"][mask], num_tokens, bias=head.bias, vocab_size=module.vocab_size, **teacher_inputs
        )


class RolloutStep(Step):
    """One step on rollouts of the batch's prompts, or the teacher-forward step on the data batch.

    The buffer (``Needs.rollouts`` settings, kdlab/rollout.py) decides when to sample anew and
    which mini-batch of rollouts this step gets. The loss receives a :class:`RolloutKDBatch`:
    logits of both models on the sampled sequences, the rollout-time log-probs, and, if the loss
    asks for it (``Needs.plain_text``), the data batch's full sequences as plain text for a
    pre-training term. The buffer and the sampling generator are checkpointed (exact resume).
    """

    def __init__(self, needs: Needs):
        self.needs = needs
        self.settings = needs.rollouts
        self.data_step = TeacherForwardStep(needs)
        self.buffer: RolloutBuffer | None = None
        self.generator: torch.Generator | None = None

    def __call__(self, module, batch: dict) -> LossOutput:
        if self.buffer is None:
            self.buffer = RolloutBuffer(self.settings, seed=torch.initial_seed())
        rollout = self.buffer.next(batch, lambda *args, **kwargs: self._sample(module, *args, **kwargs))
        if rollout is None:  # a data-batch step (GKD's λ < 1, or a batch without prompts)
            return self.data_step(module, batch)
        inputs = rollout.model_inputs()
        labels = rollout.labels
        teacher_logits = module.teacher_logits(inputs)
        stats = self.buffer.stats
        if rollout.logp_teacher is None:
            # the student sampled alone: this forward scores its tokens (one teacher forward per step, not two)
            rollout = replace(rollout, logp_teacher=token_logprobs(teacher_logits, labels))
            stats = {**stats, "rev_kl": rollout.sequence_reverse_kl().mean()}
        return module.loss(
            RolloutKDBatch(
                student_logits=module.logits(module.student, inputs),
                teacher_logits=teacher_logits,
                labels=labels,
                domain=rollout.domain,
                num_tokens=module.num_tokens(labels),
                old_logprobs=rollout.logp_student,
                sample_logprobs=rollout.logp_sample,
                teacher_logprobs=rollout.logp_teacher,
                plain=self._plain_text(module, batch) if self.needs.plain_text else None,
                stats=stats,
            )
        )

    def _plain_text(self, module, batch: dict) -> KDBatch:
        # the data's pre-training corpus (data.pretrain) when it has one, else the batch's own sequences
        text = batch.get("plain") or {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": plain_text_labels(batch["input_ids"], batch["attention_mask"]),
        }
        return KDBatch(
            student_logits=module.logits(module.student, text),
            teacher_logits=module.teacher_logits(text) if self.needs.plain_text_teacher else None,
            labels=text["labels"],
            domain=batch["domain"],
            num_tokens=module.num_tokens(text["labels"]),
        )

    @torch.no_grad()
    def _sample(self, module, prompt_ids: Tensor, prompt_mask: Tensor, teacher_mix: float, score_teacher: bool = True):
        """Rollouts of left-padded prompts; the student samples in eval mode (no dropout), as it is
        then the policy whose log-probs the loss treats as q_old."""
        if self.generator is None:  # its own stream from the run's seed (and rank); the global RNG is untouched
            self.generator = torch.Generator(prompt_ids.device).manual_seed(torch.initial_seed() + module.global_rank)
        datamodule = module.trainer.datamodule
        student = module.student
        was_training = student.training
        student.eval()
        try:
            return sample(
                student,
                module.teacher,
                prompt_ids,
                prompt_mask,
                eos_token_id=datamodule.eos_token_id,
                pad_token_id=module.tokenizer.pad_token_id,
                max_new_tokens=self.settings.max_new_tokens or datamodule.max_new_tokens,
                teacher_mix=teacher_mix,
                vocab_size=module.vocab_size,
                generator=self.generator,
                score_teacher=score_teacher,
                **self.settings.sampling,
            )
        finally:
            student.train(was_training)

    # the checkpoint's keys are those of earlier versions, so their checkpoints resume
    def state_dict(self) -> dict:
        return {
            "rollout_generator": self.generator.get_state() if self.generator is not None else None,
            "rollout_device": str(self.generator.device) if self.generator is not None else None,
            "rollout_buffer": self.buffer.state_dict() if self.buffer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("rollout_generator") is not None:
            self.generator = torch.Generator(state["rollout_device"])
            self.generator.set_state(state["rollout_generator"])
        if state.get("rollout_buffer") is not None:
            self.buffer = RolloutBuffer(self.settings, seed=torch.initial_seed())
            self.buffer.load_state_dict(state["rollout_buffer"])
