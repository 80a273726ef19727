"""Objectives over (N, V) rows computed chunk by chunk, so no (N, V) intermediate outlives its chunk.

A token-level objective is a sum over tokens divided by one count (``masked_mean`` with the
batch's ``num_tokens``), so it splits exactly over chunks of rows that share that count. The
dense path keeps every softmax of every row alive for the backward pass (e.g. p, q, m and their
logs for ``jsd``: up to 11 (N, V) tensors); :class:`_Chunked` instead computes, in its forward
pass, each chunk's value and its gradient with respect to the chunk's student logits, and keeps
only that gradient: one (N, V) tensor besides the logits themselves. The backward pass scales it
by the incoming gradient. Values and gradients equal the dense path's (float64 tests).

Used by :class:`RowwiseLoss`, the base of every token-level objective (``loss.chunk_size``: auto,
the default, or rows per chunk; null or 0 = dense). :mod:`kdlab.losses.fused` runs the same chunk
step (:func:`chunk_value_and_grad`, :class:`ChunkTotals`) on logits it computes from hidden states.
A sparse teacher (the teacher cache's top-k view, :mod:`kdlab.losses.sparse`) is chunked by the
same rows as the student's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from kdlab.losses.base import KDBatch, LossOutput
from kdlab.losses.sparse import SparseTeacher


class RowwiseLoss:
    """An objective that is a token sum over one count: computed densely or over chunks of rows.

    Subclasses implement ``dense(batch) -> LossOutput``; ``__call__`` chunks the batch's rows
    when ``chunk_size`` is set and the batch has more rows than that. Their ``logs`` must be
    token sums over ``num_tokens`` too (they are summed over chunks); ``chunkable`` is False for
    a setting that is not (e.g. a weight averaged over the batch), which then runs densely.
    """

    chunk_size: int | str | None = None
    fused_head: bool = False  # loss.fused_head: the module computes it from hidden states (kdlab.losses.fused)

    @property
    def chunkable(self) -> bool:
        return True

    def dense(self, batch: KDBatch) -> LossOutput:
        raise NotImplementedError

    def rows_per_chunk(self, vocab: int) -> int | None:
        """``chunk_size`` rows, or with ``auto`` as many rows as make AUTO_CHUNK_ELEMENTS logits."""
        if self.chunk_size == "auto":
            return max(1, AUTO_CHUNK_ELEMENTS // vocab)
        return self.chunk_size

    def __call__(self, batch: KDBatch) -> LossOutput:
        rows = batch.labels.numel()
        chunk = self.rows_per_chunk(batch.student_logits.shape[-1])
        if not chunk or rows <= chunk or not self.chunkable or not torch.is_grad_enabled():
            return self.dense(batch)
        return chunked(self.dense, batch, chunk)


# ``chunk_size: auto``: chunks of 2^23 logits (32 MiB in float32; 55 rows at V = 151,936, 262 at
# V = 32,000), large enough to keep the kernels efficient, small enough that a chunk's softmaxes
# stay a small fraction of an (N, V) tensor at real batch sizes. A batch that fits in one chunk (the
# built-in suite's 46-token vocabulary) runs densely, with no overhead.
AUTO_CHUNK_ELEMENTS = 2**23


def check_chunk_size(chunk_size: int | str | None) -> int | str | None:
    if chunk_size == "auto":
        return chunk_size
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"loss.chunk_size must be auto, rows per chunk (>= 1) or 0/null (dense), got {chunk_size!r}")
    return chunk_size or None


def check_fused_head(fused_head: bool) -> bool:
    if not isinstance(fused_head, bool):
        raise ValueError(f"loss.fused_head must be true or false, got {fused_head!r}")
    return fused_head


def chunked(dense: Callable[[KDBatch], LossOutput], batch: KDBatch, chunk_size: int) -> LossOutput:
    """``dense(batch)``'s value and gradient, computed over chunks of ``chunk_size`` rows."""
    v = batch.student_logits.shape[-1]
    student = batch.student_logits.reshape(-1, v)
    # the teacher's own vocabulary, which across tokenizers is not the student's
    teacher = batch.teacher_logits.reshape(-1, batch.teacher_logits.shape[-1]) if batch.teacher_logits is not None else None
    if batch.teacher_sparse is not None:  # the teacher cache's top-k view (kdlab.losses.sparse): chunked by the same rows
        teacher = batch.teacher_sparse.flatten_rows()
    labels = batch.labels.reshape(-1)
    num_tokens = batch.num_tokens if batch.num_tokens is not None else batch.mask.sum()
    sink: dict = {}
    loss = _Chunked.apply(student, dense, teacher, labels, num_tokens, chunk_size, sink)
    return LossOutput(loss=loss, logs=sink["logs"], per_token=sink["per_token"].view(batch.labels.shape) if sink["per_token"] is not None else None)


def chunk_value_and_grad(
    dense: Callable[[KDBatch], LossOutput], student: Tensor, teacher: Tensor | None, labels: Tensor, num_tokens: Tensor
) -> tuple[LossOutput, Tensor | None]:
    """``dense`` on one chunk of (rows, V) logits and d loss / d those student logits.

    The gradient is None for an all-masked chunk (its loss does not depend on the logits). The
    chunk's graph is freed by ``autograd.grad``: only the returned gradient outlives the call.
    """
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        part = KDBatch(
            student_logits=s.unsqueeze(0),
            teacher_logits=teacher.unsqueeze(0) if isinstance(teacher, Tensor) else None,
            labels=labels.unsqueeze(0),
            num_tokens=num_tokens,
            teacher_sparse=teacher.map(lambda t: t.unsqueeze(0)) if isinstance(teacher, SparseTeacher) else None,
        )
        out = dense(part)
        (g,) = torch.autograd.grad(out.loss, s, allow_unused=True)
    return out, g


class ChunkTotals:
    """The loss, logs and per-token values of a batch, summed (concatenated) over its chunks.

    Exact because every chunk is normalised by the batch's ``num_tokens`` (the module docstring).
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=device)
        self.logs: dict[str, Tensor] = {}
        self.per_token: list[Tensor | None] = []

    def add(self, out: LossOutput) -> None:
        self.loss += out.loss.detach()
        for key, value in out.logs.items():
            self.logs[key] = self.logs.get(key, 0) + value.detach()
        self.per_token.append(out.per_token.reshape(-1) if out.per_token is not None else None)

    def write(self, sink: dict) -> None:
        """Logs and per-token values go out through ``sink``: an autograd Function returns tensors only."""
        sink["logs"] = self.logs
        parts = self.per_token
        sink["per_token"] = torch.cat(parts) if parts and all(p is not None for p in parts) else None


class _Chunked(torch.autograd.Function):
    """Forward: Σ_chunks dense(chunk) and d/d student_logits, chunk by chunk. Backward: that gradient × grad_output."""

    @staticmethod
    def forward(ctx, student, dense, teacher, labels, num_tokens, chunk_size, sink):
        grad = torch.empty_like(student)
        totals = ChunkTotals(student.dtype, student.device)
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            out, g = chunk_value_and_grad(dense, student[rows], teacher[rows] if teacher is not None else None, labels[rows], num_tokens)
            grad[rows] = 0 if g is None else g  # an all-masked chunk has no gradient
            totals.add(out)
        totals.write(sink)
        ctx.save_for_backward(grad)
        return totals.loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # in place: a second (N, V) tensor here would double the peak (the graph runs backward once)
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None


def valid_rows(batch: KDBatch) -> KDBatch:
    """The batch reduced to its labelled positions, as one row of N tokens: (1, N, V) logits.

    Prompt and padding positions carry no label and never reach a softmax over the vocabulary.
    (``DistillModule`` selects these rows earlier, before the output heads: kdlab/heads.py.)
    ``num_tokens`` (the step's normaliser) is kept; ``domain`` (per sequence) no longer applies.
    """
    keep = batch.mask
    return replace(
        batch,
        student_logits=batch.student_logits[keep].unsqueeze(0),
        teacher_logits=batch.teacher_logits[keep].unsqueeze(0) if batch.teacher_logits is not None else None,
        teacher_sparse=batch.teacher_sparse.map(lambda t: t[keep].unsqueeze(0)) if batch.teacher_sparse is not None else None,
        labels=batch.labels[keep].unsqueeze(0),
        domain=None,
    )
