"""Objectives across tokenizers: ``loss=uld`` and ``loss=gold`` (docs/methods.md §6).

Both take an :class:`AlignedKDBatch`: the student's logits at its N labelled positions and the
teacher's, on its own vocabulary, at the G aligned groups' first positions (kdlab/data/alignment.py),
each compared with the student row ``aligned_rows[g]`` where both models have read the same text.

    L = ce_weight · (1/N) Σ_n −log q(y_n)  +  weight · (1/N) Σ_g d_g

- ``loss=uld`` (Boizard et al. 2024, arXiv 2402.12030, §3): d_g = Σ_i |q_(i) − p_(i)|, the
  L1 distance between the two distributions sorted in descending order, the shorter zero-padded:
  the closed form of the Wasserstein-1 distance under a uniform transport cost, which needs no
  token correspondence at all. The paper's setting: ce_weight 1, weight (λ) 1.5, τ = 1 for both.
- ``loss=gold`` (the hybrid of TRL's GOLDTrainer): where the group is one token on each side and
  the same string in both vocabularies (``matched``), d_g is a token-level divergence (``divergence``,
  forward KL by default) between the two distributions over the tokens the vocabularies share;
  ULD elsewhere. With one tokenizer every group is matched and the shared vocabulary is the whole
  one, so the hybrid is that divergence exactly.

The sum over groups is divided by N, the student's labelled tokens (the count every kdlab objective
is normalised by, so gradient accumulation and data parallelism stay exact): with one tokenizer
G = N and the term is the usual per-token mean. Both are chunked over rows like the token-level
objectives (``chunk_size``), and ULD also reads the teacher cache's top-k + tail view
(``teacher_cache.k``; kdlab.losses.uld.uld_sparse_distance, a lower bound of the dense distance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdlab.losses.base import AlignedKDBatch, KDBatch, LossOutput, Needs, masked_mean
from kdlab.losses.chunked import RowwiseLoss, check_chunk_size, check_fused_head
from kdlab.losses.divergences import CrossEntropy, forward_kl
from kdlab.losses.dtypes import wide_dtype
from kdlab.losses.uld import shared_vocab_divergence, uld_distance, uld_sparse_distance


class _Rows(RowwiseLoss):
    """A per-row distance over a (1, G, ·) KDBatch whose labels only mark valid rows, summed over
    ``num_tokens``: the shape :func:`kdlab.losses.chunked.chunked` splits into chunks."""

    def __init__(self, distance: Callable[[KDBatch], Tensor], chunk_size):
        self.distance, self.chunk_size = distance, chunk_size

    def dense(self, batch: KDBatch) -> LossOutput:
        per_row = self.distance(batch)
        return LossOutput(loss=masked_mean(per_row, batch.mask, batch.num_tokens), per_token=per_row.detach())


class AcrossTokenizers:
    """``loss=uld`` (``divergence=None``) and ``loss=gold`` (a token-level ``divergence`` on matched groups).

    ``ce_weight``: the cross-entropy term on the student's labels; ``weight``: the distillation
    term's (ULD's λ); ``student_temperature`` / ``teacher_temperature``: ULD's softmax temperatures;
    ``temperature``: the hybrid divergence's τ (on matched groups); ``chunk_size``: rows per chunk
    (auto, or null = dense). ``fused_head`` (the shared loss setting) must be false: the teacher's logits
    are read on its own tokenisation, not computed from hidden states beside the student's.
    """

    def __init__(
        self,
        divergence: Callable[..., Tensor] | None = None,
        ce_weight: float = 1.0,
        weight: float = 1.5,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        temperature: float = 1.0,
        chunk_size: int | str | None = "auto",
        fused_head: bool = False,
    ):
        if check_fused_head(fused_head):
            raise ValueError("loss.fused_head=true is for token-level objectives on one tokenizer; across tokenizers set loss.fused_head=false")
        bad = [f"{n}={v!r}" for n, v in (("ce_weight", ce_weight), ("weight", weight)) if v < 0]
        bad += [f"{n}={v!r}" for n, v in (("student_temperature", student_temperature), ("teacher_temperature", teacher_temperature),
                                           ("temperature", temperature)) if v <= 0]
        if bad:
            raise ValueError(f"loss: {', '.join(bad)}: the weights must be >= 0 and the temperatures > 0")
        if divergence is not None:  # its own parameter checks (β, α) fire now, before any model is built
            divergence(torch.zeros(1, 2), torch.zeros(1, 2), temperature=temperature)
        self.divergence = divergence
        self.ce_weight, self.weight = ce_weight, weight
        self.student_temperature, self.teacher_temperature, self.temperature = student_temperature, teacher_temperature, temperature
        self.chunk_size = check_chunk_size(chunk_size)
        self.cross_entropy = CrossEntropy(self.chunk_size)  # loss=ce's own computation, chunked alike
        # the teacher cache serves ULD (sorted probabilities need no ids beyond its top-k); the hybrid's
        # divergence reads the teacher over the whole shared vocabulary, so it needs the dense teacher
        self.needs = Needs(teacher=True, aligned=True, sparse_teacher=divergence is None, teacher_temperature=teacher_temperature)

    def __call__(self, batch: AlignedKDBatch) -> LossOutput:
        student = batch.student_logits
        rows = batch.aligned_rows
        num_tokens = batch.num_tokens if batch.num_tokens is not None else batch.mask.sum()
        dtype = wide_dtype(student.dtype)
        logs, per_token = {}, torch.zeros(student.shape[:2], dtype=dtype, device=student.device)
        loss = student.new_zeros((), dtype=dtype)
        if self.weight > 0 and rows is not None and rows.numel():
            matched = batch.matched if self.divergence is not None else torch.zeros_like(rows, dtype=torch.bool)
            kd = student.new_zeros((), dtype=dtype)
            for name, picked, distance in (("uld", ~matched, self._uld), ("shared_kd", matched, self._shared(batch))):
                if not picked.any():
                    continue
                part = self._rows(batch, rows, picked, num_tokens)
                out = _Rows(distance, self.chunk_size)(part)
                kd = kd + out.loss
                logs[name] = out.loss.detach()
                per_token[0, rows[picked]] += self.weight * out.per_token.reshape(-1).to(dtype)
            logs["kd"] = kd.detach()
            loss = loss + self.weight * kd
        if self.ce_weight > 0:
            ce = self.cross_entropy(KDBatch(student_logits=student, teacher_logits=None, labels=batch.labels, num_tokens=num_tokens))
            logs["ce"] = ce.loss.detach()
            loss = loss + self.ce_weight * ce.loss
            per_token = per_token + self.ce_weight * ce.per_token.to(dtype)
        return LossOutput(loss=loss, logs=logs, per_token=per_token)

    @staticmethod
    def _rows(batch: AlignedKDBatch, rows: Tensor, picked: Tensor, num_tokens) -> KDBatch:
        """The picked groups as a (1, g, ·) batch: the student's rows they are compared with, the teacher's own."""
        keep = picked.nonzero().squeeze(-1)
        return KDBatch(
            student_logits=batch.student_logits[:, rows[keep]],
            teacher_logits=batch.teacher_logits[:, keep] if batch.teacher_logits is not None else None,
            teacher_sparse=batch.teacher_sparse.map(lambda t: t[:, keep]) if batch.teacher_sparse is not None else None,
            labels=batch.labels[:, rows[keep]],
            num_tokens=num_tokens,
        )

    def _uld(self, part: KDBatch) -> Tensor:
        student = part.student_logits.flatten(0, -2)
        if part.teacher_sparse is not None:
            return uld_sparse_distance(student, part.teacher_sparse.flatten_rows(), student_temperature=self.student_temperature).view(part.labels.shape)
        teacher = part.teacher_logits.flatten(0, -2)
        d = uld_distance(student, teacher, student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature)
        return d.view(part.labels.shape)

    def _shared(self, batch: AlignedKDBatch) -> Callable[[KDBatch], Tensor]:
        def distance(part: KDBatch) -> Tensor:
            if part.teacher_logits is None:
                raise ValueError("loss=gold compares matched groups over the shared vocabulary and needs the dense teacher; set teacher_cache.k=null")
            teacher_ids, student_ids = batch.shared_vocab
            d = shared_vocab_divergence(
                part.student_logits.flatten(0, -2), part.teacher_logits.flatten(0, -2), student_ids, teacher_ids,
                self.divergence, temperature=self.temperature,
            )
            return d.view(part.labels.shape)

        return distance


def uld(**settings) -> AcrossTokenizers:
    """``loss=uld``: CE + λ·ULD (the paper's defaults: ce_weight 1, weight 1.5, τ 1)."""
    return AcrossTokenizers(divergence=None, **settings)


def gold(divergence: Callable[..., Tensor] = forward_kl, **settings) -> AcrossTokenizers:
    """``loss=gold``: the hybrid, ``divergence`` (forward KL by default) on matched groups, ULD elsewhere."""
    return AcrossTokenizers(divergence=divergence, **settings)
