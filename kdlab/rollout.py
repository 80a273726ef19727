"""Sampling continuations of prompts for on-policy distillation (MiniLLM, on-policy KD).

    rollout = sample(student, teacher, prompt_ids, prompt_mask, eos_token_id=2, pad_token_id=0,
                     max_new_tokens=16, teacher_mix=0.2)   # y ~ p̃ = α·p + (1−α)·q, token by token

Student and teacher step together, each with its own KV cache (``past_key_values``), from the
batch's LEFT-padded prompts; position ids count real tokens only (``cumsum(mask) − 1``), so a
prompt's samples do not depend on how much padding its batch gave it. The result is laid out like
a training batch — right-padded, ``response_mask`` aligned with the logits (position t predicts
token t+1) — so the loss's forward pass needs no position ids and reproduces the rollout-time
log-probabilities exactly. ``use_cache=False`` recomputes every step from scratch (the benchmark's
reference, ``python -m bench.rollout_speed``).

:class:`RolloutBuffer` is the outer loop of MiniLLM (docs/methods.md §3.6): rollouts of one data
batch's prompts, served as mini-batches for several optimisation epochs, then refreshed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.base import IGNORE_INDEX, RolloutSettings


@dataclass
class Rollout:
    """Sampled continuations in the layout of a training batch.

    ``sequences`` (B, L): <prompt> <response> [<eos>] <pad>…, each prompt moved out of its left
    padding. ``attention_mask`` (B, L): 1 on prompt and response tokens. ``response_mask`` (B, L):
    True at t when token t+1 was sampled (aligned with logits, like a batch's labels).
    ``logp_sample`` / ``logp_student`` / ``logp_teacher`` (B, L): log-probability of the sampled
    token under the sampling distribution (after temperature, top-k, top-p and teacher mixing),
    under the student q and under the teacher p (both at temperature 1, unfiltered: the
    distributions the objective compares); 0 where ``response_mask`` is False.
    """

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logp_sample: Tensor
    logp_student: Tensor
    logp_teacher: Tensor | None
    domain: Tensor | None = None

    @property
    def labels(self) -> Tensor:
        """The sampled tokens aligned with the logits, IGNORE_INDEX elsewhere (a batch's ``labels``)."""
        nxt = torch.full_like(self.sequences, IGNORE_INDEX)
        nxt[:, :-1] = self.sequences[:, 1:]
        return torch.where(self.response_mask, nxt, torch.full_like(nxt, IGNORE_INDEX))

    @property
    def lengths(self) -> Tensor:
        """Number of sampled tokens per row (the <eos> included)."""
        return self.response_mask.sum(-1)

    def sequence_reverse_kl(self) -> Tensor:
        """Σ_t log q(y_t) − log p(y_t) per row: for pure student samples (teacher_mix = 0,
        temperature 1, no filtering), an unbiased estimate of the sequence-level KL(q‖p)."""
        if self.logp_teacher is None:
            raise ValueError("this rollout was sampled without a teacher; no reverse KL")
        return torch.where(self.response_mask, self.logp_student - self.logp_teacher, 0.0).sum(-1)

    def select(self, index: Tensor) -> Rollout:
        """Rows ``index``, trimmed to their longest sequence."""
        width = int(self.attention_mask[index].sum(-1).max())

        def take(x):
            return None if x is None else x[index][:, :width] if x.dim() == 2 else x[index]

        return Rollout(**{name: take(getattr(self, name)) for name in self.__dataclass_fields__})

    def model_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.sequences, "attention_mask": self.attention_mask}


def _filter(log_probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (nucleus) filtering of (B, V) log-probabilities, renormalised.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (always at
    least the most likely one), as transformers' TopPLogitsWarper does.
    """
    if 0 < top_k < log_probs.shape[-1]:
        kth = log_probs.topk(top_k, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth, -math.inf)
    if top_p < 1.0:
        sorted_lp, order = log_probs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop_sorted = mass_before >= top_p  # the first token always has mass_before = 0 < top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        log_probs = log_probs.masked_fill(drop, -math.inf)
    return log_probs.log_softmax(-1)


def sampling_log_probs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    *,
    teacher_mix: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """log p̃ for one step, (B, V): p̃ = α·softmax(z_T/τ) + (1−α)·softmax(z_S/τ) (MiniLLM Eq. 4,
    teacher-mixed sampling), then top-k / top-p filtered and renormalised.

    With α = 0, τ = 1 and no filtering this is exactly log q (the same tensor), so the importance
    weights q/p̃ of pure student sampling are exactly 1.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_mix > 0.0:
        if teacher_logits is None:
            raise ValueError("teacher-mixed sampling (teacher_mix > 0) needs the teacher")
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        if teacher_mix >= 1.0:
            log_mix = log_p
        else:
            log_mix = torch.logaddexp(log_p + math.log(teacher_mix), log_q + math.log1p(-teacher_mix))
    else:
        log_mix = log_q
    if top_k > 0 or top_p < 1.0:
        log_mix = _filter(log_mix, top_k, top_p)
    return log_mix


def _draw(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row by inverse CDF with one uniform per row.

    Each row consumes exactly one uniform per step whatever the other rows hold, and a token is
    picked by where the uniform falls, so float noise of 1e-7 in the probabilities (from a
    different padding) cannot change a sample except on a boundary of that width.
    """
    probs = log_probs.exp()
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    # right=True: the first index whose CDF exceeds u·total, so a zero-probability token is never drawn
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.clamp(max=probs.shape[-1] - 1).squeeze(-1)


class _Stepper:
    """Next-token logits of one model, one step at a time, with or without its KV cache."""

    def __init__(self, model, vocab_size: int | None, use_cache: bool):
        self.model, self.vocab_size, self.use_cache = model, vocab_size, use_cache
        self.cache = None

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor, new: int) -> Tensor:
        """Logits after the last token; ``new`` = how many tokens at the end are not yet cached."""
        if self.use_cache:
            out = self.model(
                input_ids=ids[:, -new:],
                attention_mask=mask,
                position_ids=positions[:, -new:],
                past_key_values=self.cache,
                use_cache=True,
            )
            self.cache = out.past_key_values
        else:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = out.logits[:, -1]
        return logits if self.vocab_size is None else logits[:, : self.vocab_size]


def _left_align(x: Tensor, shift: Tensor, fill) -> Tensor:
    """Row i shifted left by shift[i] columns (B, L), ``fill`` entering on the right."""
    cols = torch.arange(x.shape[1], device=x.device) + shift[:, None]
    out = x.gather(1, cols.clamp(max=x.shape[1] - 1))
    return out.masked_fill(cols >= x.shape[1], fill)


@torch.no_grad()
def sample(
    student,
    teacher,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    teacher_mix: float = 0.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    step_teacher: bool | None = None,
    score_teacher: bool = True,
) -> Rollout:
    """Sample continuations of left-padded prompts, token by token, until <eos> or ``max_new_tokens``.

    Sampling distribution: :func:`sampling_log_probs` (student alone with ``teacher_mix = 0``).
    ``teacher`` may be None for pure student sampling; then ``logp_teacher`` is None. Rows that
    have emitted <eos> receive ``pad_token_id`` and are masked. The models are used as they are
    (the caller chooses train/eval mode). ``vocab_size`` truncates both models' logits.

    The teacher steps beside the student only when it takes part in sampling (``teacher_mix > 0``,
    MiniLLM); otherwise the student samples alone at generation speed and the finished sequences
    are scored by one teacher forward pass (the same ``logp_teacher``). ``step_teacher=True``
    forces the stepping path (the benchmark's reference). ``score_teacher=False`` skips that
    scoring forward (``logp_teacher`` is then None): for a caller that runs the teacher on the
    sequences anyway and takes the log-probs from there (:func:`token_logprobs`, the training step).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    batch, prompt_width = prompt_ids.shape
    device = prompt_ids.device
    mask = prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    ids = prompt_ids
    student_step = _Stepper(student, vocab_size, use_cache)
    stepping = teacher is not None and (teacher_mix > 0 if step_teacher is None else step_teacher)
    teacher_step = _Stepper(teacher, vocab_size, use_cache) if stepping else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, valid, lp_sample, lp_student, lp_teacher = [], [], [], [], []
    new = prompt_width
    for _ in range(max_new_tokens):
        s_logits = student_step(ids, mask, positions, new)
        t_logits = teacher_step(ids, mask, positions, new) if teacher_step is not None else None
        log_s = sampling_log_probs(s_logits, t_logits, teacher_mix=teacher_mix, temperature=temperature, top_k=top_k, top_p=top_p)
        token = _draw(log_s, generator).masked_fill(finished, pad_token_id)
        pick = token[:, None]
        log_q = log_s if (teacher_mix == 0 and temperature == 1.0 and top_k == 0 and top_p == 1.0) else s_logits.float().log_softmax(-1)
        tokens.append(token)
        valid.append(~finished)
        lp_sample.append(log_s.gather(-1, pick).squeeze(-1))
        lp_student.append(log_q.gather(-1, pick).squeeze(-1))
        if t_logits is not None:
            lp_teacher.append(t_logits.float().log_softmax(-1).gather(-1, pick).squeeze(-1))
        finished = finished | (token == eos_token_id)
        if finished.all():
            break
        # finished rows keep stepping on pads (the batch stays rectangular); their outputs are masked
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        new = 1

    valid = torch.stack(valid, 1)
    new_ids = torch.stack(tokens, 1)
    prompt_len = prompt_mask.long().sum(-1)
    shift = prompt_width - prompt_len
    sequences = _left_align(torch.cat([prompt_ids, new_ids], 1), shift, pad_token_id)
    attention_mask = _left_align(torch.cat([prompt_mask.long(), valid.long()], 1), shift, 0)
    width = int(attention_mask.sum(-1).max())
    full_width = sequences.shape[1]  # before the trim below: steps after a row's <eos> land beyond `width`

    def aligned(per_step: Tensor | None, fill) -> Tensor | None:
        """(B, N) per sampled token → (B, width) at the logit position that predicts it."""
        if per_step is None:
            return None
        out = torch.full((batch, full_width), fill, dtype=per_step.dtype, device=device)
        cols = prompt_len[:, None] - 1 + torch.arange(per_step.shape[1], device=device)
        out.scatter_(1, cols, torch.where(valid, per_step, torch.full_like(per_step, fill)))
        return out[:, :width]

    response_mask = aligned(valid, False)
    sequences, attention_mask = sequences[:, :width], attention_mask[:, :width]
    if lp_teacher:
        logp_teacher = aligned(torch.stack(lp_teacher, 1), 0.0)
    elif teacher is not None and score_teacher:  # the student sampled alone: one teacher forward scores its tokens
        logp_teacher = _score(teacher, sequences, attention_mask, response_mask, vocab_size)
    else:
        logp_teacher = None
    return Rollout(
        sequences=sequences,
        attention_mask=attention_mask,
        response_mask=response_mask,
        logp_sample=aligned(torch.stack(lp_sample, 1), 0.0),
        logp_student=aligned(torch.stack(lp_student, 1), 0.0),
        logp_teacher=logp_teacher,
    )


def _score(model, sequences: Tensor, attention_mask: Tensor, response_mask: Tensor, vocab_size: int | None) -> Tensor:
    """log p(token t+1 | tokens ≤ t) at the response positions (aligned like a batch's labels), 0 elsewhere."""
    logits = model(input_ids=sequences, attention_mask=attention_mask).logits
    logits = logits if vocab_size is None else logits[..., :vocab_size]
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, :-1] = torch.where(response_mask[:, :-1], sequences[:, 1:], IGNORE_INDEX)
    return token_logprobs(logits, labels)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] at the labelled positions (float32), 0 elsewhere; only those rows are normalised."""
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    out[rows, cols] = logits[rows, cols].float().log_softmax(-1).gather(-1, labels[rows, cols][:, None]).squeeze(-1)
    return out


# -- the outer loop ------------------------------------------------------------------------------


def plain_text_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Language-modelling labels over every real token of right-padded sequences (aligned with logits)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return labels


# (prompt_ids, prompt_mask, teacher_mix, score_teacher=...) -> Rollout; with score_teacher=False a
# student-only rollout may come without logp_teacher (the training step scores it with its own teacher forward)
Sampler = Callable[..., Rollout]


class RolloutBuffer:
    """Serves rollouts as mini-batches: refreshed from the current data batch when used up.

    ``next(batch, sampler)`` is called once per training step. It returns None on the steps that
    train on ordinary data (a deterministic ``fraction`` of the steps use rollouts: step s is a
    rollout step when ⌊(s+1)·λ⌋ > ⌊s·λ⌋, so exactly ⌊n·λ⌋ of the first n steps are — the same
    expectation as GKD's coin flip, without its run-to-run noise). ``stats`` holds the last
    refresh's statistics: ``gen_length`` (mean sampled tokens per rollout) and ``rev_kl`` (mean
    Σ_t log q − log p over student samples of the same prompts, as MiniLLM logs it: the
    sequence-level KL(q‖p) when sampling at temperature 1 without top-k/top-p; with
    ``teacher_mix = 0`` the training step adds it from the mini-batch it scores).
    """

    def __init__(self, settings: RolloutSettings, seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.step = 0
        self.queue: list[Tensor] = []
        self.rollout: Rollout | None = None
        self.stats: dict[str, Tensor] = {}
        self._shuffle = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        """The loop's position: step, the rollouts still to serve and the shuffling state."""
        rollout = dict(vars(self.rollout)) if self.rollout is not None else None  # plain tensors: loads with weights_only
        return {"step": self.step, "queue": self.queue, "rollout": rollout, "stats": self.stats, "shuffle": self._shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.queue, self.stats = state["step"], state["queue"], state["stats"]
        self.rollout = Rollout(**state["rollout"]) if state["rollout"] is not None else None
        self._shuffle.set_state(state["shuffle"])

    def is_rollout_step(self, step: int) -> bool:
        lam = self.settings.fraction
        return math.floor((step + 1) * lam) > math.floor(step * lam)

    def next(self, batch: dict, sampler: Sampler) -> Rollout | None:
        step, self.step = self.step, self.step + 1
        if not self.is_rollout_step(step):
            return None
        if not self.queue:
            if "generate" in batch and not batch["generate"].any():
                return None  # no prompt in this batch: it trains on the data, as a data-batch step
            self.refresh(batch, sampler)
        return self.rollout.select(self.queue.pop(0))

    @torch.no_grad()
    def refresh(self, batch: dict, sampler: Sampler) -> None:
        s = self.settings
        # rows with a prompt (plain-text records have none to continue)
        prompted = batch["generate"].nonzero().flatten() if "generate" in batch else torch.arange(batch["prompt_ids"].shape[0])
        prompted = prompted.to(batch["prompt_ids"].device)
        n = s.num_rollouts or batch["prompt_ids"].shape[0]
        rows = prompted[torch.arange(n, device=prompted.device) % len(prompted)]
        prompts, prompt_mask = batch["prompt_ids"][rows], batch["prompt_mask"][rows]
        rollout = sampler(prompts, prompt_mask, s.teacher_mix, score_teacher=False)
        self.rollout = replace(rollout, domain=batch["domain"][rows] if "domain" in batch else None)
        self.stats = {"gen_length": rollout.lengths.float().mean()}
        # rev_kl of student samples: with teacher_mix = 0 the training step logs it from its own teacher
        # forward (the rollout is not scored here); the authors' code samples the student alone for it, too
        if s.teacher_mix > 0 and s.log_student_rev_kl:
            self.stats["rev_kl"] = sampler(prompts, prompt_mask, 0.0, score_teacher=True).sequence_reverse_kl().mean()
        mini = s.mini_batch_size or n
        device = rows.device
        self.queue = [
            chunk.to(device) for _ in range(s.epochs) for chunk in torch.randperm(n, generator=self._shuffle).split(mini)
        ]
