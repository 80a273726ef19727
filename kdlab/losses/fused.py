"""The fused head (``loss.fused_head=true``): a token-level objective computed from hidden states.

:mod:`kdlab.losses.chunked` removes the objective's (N, V) intermediates, but the module still
materialises both models' (N, V) logits and the student logits' (N, V) gradient: at V = 151,936 a
float32 (N, V) tensor is 0.6 GB per 1,000 tokens. Here the autograd function takes the student's
last hidden states at the N labelled positions (N, H) and its output head (V, H), the teacher's
too, and for each chunk of rows computes both chunks of logits, runs the objective's ``dense`` on
them (docs/methods.md §1, §2: the same code as the dense and chunked paths, so the same values)
and turns d loss / d student logits into grad_hidden[chunk] = g W and grad_W += gᵀ h at once.
Only grad_hidden (N, H) and grad_W (V, H) survive the forward pass; the backward pass scales
them by the incoming gradient. This is the idea of Liger-Kernel's fused linear JSD, for every
kdlab token-level objective. Values and gradients equal the dense path's (float64 tests).

The training step that feeds it (kdlab/steps.py, ``FusedHeadStep``) requires a plain linear head
(logits = h Wᵀ + b of the base model's last hidden state): models whose causal-LM forward
transforms the logits (softcapping, logit scales) are refused, and the rows are those of
``module.vocab_size`` (both heads truncated, as ``DistillModule.logits`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.base import LossOutput
from kdlab.losses.chunked import ChunkTotals, RowwiseLoss, chunk_value_and_grad


def fused_head_loss(
    loss: RowwiseLoss,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    num_tokens: Tensor,
    *,
    bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    vocab_size: int | None = None,
) -> LossOutput:
    """``loss`` on logits h Wᵀ + b (first ``vocab_size`` rows of both heads), without materialising them.

    ``hidden`` (N, H) and ``teacher_hidden`` (N, H_t) are the labelled rows, ``labels`` (N,).
    Chunks are ``loss.rows_per_chunk(V)`` rows (``loss.chunk_size``; null: one chunk of all rows).
    """
    # Not a read of what the loss needs (Needs.fused_head chose this path): the interface the path calls.
    # A RowwiseLoss whose settings are no token sum refuses fused_head when it is built (rlkd's dynamic_weighting).
    if not isinstance(loss, RowwiseLoss):
        raise ValueError(
            f"loss.fused_head=true needs a token-sum objective (a kdlab.losses.chunked.RowwiseLoss: ce, fkl, rkl, jsd, skl, "
            f"srkl, tvd, rlkd), and {type(loss).__name__} is not one; set loss.fused_head=false"
        )
    vocab = _shared_vocab(vocab_size, weight, teacher_weight)
    chunk = max(1, loss.rows_per_chunk(vocab) or hidden.shape[0])
    sink: dict = {}
    student, teacher = (hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias)
    value = _FusedHead.apply(*student, *teacher, labels, num_tokens, vocab, chunk, loss.dense, sink)
    return LossOutput(loss=value, logs=sink["logs"], per_token=sink["per_token"])


def _shared_vocab(vocab_size: int | None, weight: Tensor, teacher_weight: Tensor | None) -> int:
    """The compared vocabulary: ``vocab_size`` rows of both heads, or the whole heads when they are equal."""
    rows = [weight.shape[0]] + ([teacher_weight.shape[0]] if teacher_weight is not None else [])
    vocab = vocab_size or rows[0]
    if min(rows) < vocab or (vocab_size is None and len(set(rows)) > 1):
        raise ValueError(
            f"the output heads have {rows} rows (student, teacher) and the distillation vocabulary is {vocab_size}: "
            "each head must cover it, and heads of different sizes need module.vocab_size (the shared vocabulary)"
        )
    return vocab


class _FusedHead(torch.autograd.Function):
    """Forward: Σ_chunks dense(h Wᵀ + b, teacher's) and the gradients w.r.t. h, W, b, chunk by chunk.
    Backward: those gradients × grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, num_tokens, vocab, chunk, dense, sink):
        # the heads' rows of the shared vocabulary (views: nothing is copied)
        w, b, tw, tb = (t[:vocab] if t is not None else None for t in (weight, bias, teacher_weight, teacher_bias))
        # a half-precision head accumulates gᵀ h over the chunks in float32, as one matmul would internally
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if ctx.needs_input_grad[2] else None
        totals = ChunkTotals(hidden.dtype, hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            teacher = F.linear(teacher_hidden[rows], tw, tb) if teacher_hidden is not None else None
            out, g = chunk_value_and_grad(dense, F.linear(h, w, b), teacher, labels[rows], num_tokens)
            totals.add(out)
            del out, teacher  # freed before the next chunk's logits exist: one chunk alive at a time
            if g is None:  # an all-masked chunk: its rows' gradient stays 0
                continue
            grad_hidden[rows] = torch.mm(g.to(w.dtype), w)
            if grad_weight is not None:
                grad_weight[:vocab].addmm_(g.t().to(acc), h.to(acc))  # in place: no (V, H) temporary per chunk
            if grad_bias is not None:
                grad_bias[:vocab] += g.sum(0).to(acc)
            del g
        totals.write(sink)
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        return totals.loss

    @staticmethod
    def backward(ctx, grad_output):
        # in place, as in kdlab.losses.chunked._Chunked: the graph runs backward once
        grads = [g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors]
        return *grads, None, None, None, None, None, None, None, None, None
