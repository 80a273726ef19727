"""Token-level objectives (docs/methods.md §1) as pure functions and one Hydra-built callable.

Every pure function maps ``(student_logits, teacher_logits, labels, *, temperature, <param>)``
to per-token values of shape (B, T), zero where ``labels == IGNORE_INDEX`` (``labels=None``
counts every position). Teacher distribution p = softmax(z_T/τ), student q = softmax(z_S/τ).
Logs are always taken from ``log_softmax``; a term p·log p with p = 0 (a teacher logit of -inf,
e.g. a padded vocabulary entry) counts as 0 rather than 0·(-inf) = NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab import CONF_DIR
from kdlab.losses.base import IGNORE_INDEX, KDBatch, LossOutput, Needs, masked_mean
from kdlab.losses.chunked import RowwiseLoss, check_chunk_size, check_fused_head
from kdlab.losses.dtypes import upcast
from kdlab.losses.sparse import coarsen

LOSS_CONFIG_DIR = Path(CONF_DIR) / "loss"


def _valid(values: Tensor, labels: Tensor | None) -> Tensor:
    if labels is None:
        return values
    return torch.where(labels != IGNORE_INDEX, values, torch.zeros_like(values))


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ_v a (log a − log b) over the last dim, with 0·log 0 = 0."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) computed stably from log a and log b."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    if labels is not None:
        # a −inf teacher logit at a masked row (a masked vocabulary entry) would make q·(log q − log p)
        # infinite there, and its gradient 0 · ∞ = NaN although _valid selects the value out: the
        # masked rows' log p is set to 0 (no host sync; in place when the teacher needs no gradient)
        masked = (labels == IGNORE_INDEX).unsqueeze(-1)
        log_p = log_p.masked_fill(masked, 0.0) if log_p.requires_grad else log_p.masked_fill_(masked, 0.0)
    return log_q, log_p


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """``ce``: −log q(y_t) per token (plain SFT / LM loss), 0 at ignored positions."""
    per_token = F.cross_entropy(
        upcast(student_logits).flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.view(labels.shape)


def forward_kl(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0) -> Tensor:
    """``fkl``: KL(p‖q) = Σ_v p log(p/q) — Hinton et al. 2015 KD (docs/methods.md §1)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    return _valid(_kl(log_p, log_q), labels)


def reverse_kl(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0) -> Tensor:
    """``rkl``: KL(q‖p) = Σ_v q log(q/p) (docs/methods.md §1)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    return _valid(_kl(log_q, log_p), labels)


def generalized_jsd(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """``jsd``: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q — GKD (Agarwal et al. 2024, Eq. for JSD(β)).

    β = 0.5 is the Jensen–Shannon divergence. As in TRL's ``generalized_jsd_loss`` (the
    reference named in docs/methods.md), the end points return the divergences the family tends to
    after dividing by its vanishing weight: β = 0 gives forward KL(p‖q), β = 1 reverse KL(q‖p)
    (JSD(β)/β → KL(p‖q) as β → 0).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    if beta == 0.0:
        values = _kl(log_p, log_q)
    elif beta == 1.0:
        values = _kl(log_q, log_p)
    else:
        log_m = _log_mix(log_p, log_q, beta)
        values = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _valid(values, labels)


def skew_forward_kl(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """``skl``: KL(p ‖ αp + (1−α)q) — DistiLLM (Ko et al. 2024, skew KL, Eq. 4); α = 0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skl alpha must be in [0, 1), got {alpha}")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    return _valid(_kl(log_p, _log_mix(log_p, log_q, alpha)), labels)


def skew_reverse_kl(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """``srkl``: KL(q ‖ αq + (1−α)p) — DistiLLM (Ko et al. 2024, skew reverse KL); α = 0 is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"srkl alpha must be in [0, 1), got {alpha}")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    return _valid(_kl(log_q, _log_mix(log_q, log_p, alpha)), labels)


def total_variation(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0) -> Tensor:
    """``tvd``: ½ Σ_v abs(p − q) (docs/methods.md §1)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, labels)
    return _valid(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), labels)


class CrossEntropy(RowwiseLoss):
    """``loss=ce``: the student trained on the labels alone (the SFT baseline); needs no teacher.
    ``chunk_size``: rows per chunk of the vocabulary-wide softmax (kdlab.losses.chunked; null = dense);
    ``fused_head``: computed from the hidden states, no (N, V) logits (kdlab.losses.fused)."""

    def __init__(self, chunk_size: int | None = None, fused_head: bool = False):
        self.chunk_size = check_chunk_size(chunk_size)
        self.fused_head = check_fused_head(fused_head)
        self.needs = Needs(teacher=False, fused_head=self.fused_head)

    def dense(self, batch: KDBatch) -> LossOutput:
        per_token = cross_entropy(batch.student_logits, batch.labels)
        loss = masked_mean(per_token, batch.mask, batch.num_tokens)
        return LossOutput(loss=loss, logs={"ce": loss.detach()}, per_token=per_token.detach())


class TokenKD(RowwiseLoss):
    """A token-level divergence at temperature τ, optionally mixed with ``ce``.

    L = kd_weight · masked_mean(τ^s · D(p_τ, q_τ)) + ce_weight · masked_mean(−log q(y)), where s = 2 when
    ``scale_by_temperature_squared`` (Hinton et al. 2015 keep gradient magnitudes comparable
    across τ that way) and 0 otherwise. ``divergence`` is one of this module's pure functions,
    given by Hydra as a partial carrying its own parameter (β or α). ``kd_weight`` < 1 expresses
    objectives that weight the divergence against CE, e.g. DDK's L = CE + γ·KL (Eq. 3, γ = 0.2).
    ``chunk_size``: rows per chunk (kdlab.losses.chunked: the same values and gradients without the
    dense path's (N, V) intermediates; null = dense). ``fused_head``: the module hands the hidden
    states and output heads instead of logits (kdlab.losses.fused: no (N, V) logits at all).
    """

    def __init__(
        self,
        divergence: Callable[..., Tensor],
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = False,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        chunk_size: int | None = None,
        fused_head: bool = False,
    ):
        self.chunk_size = check_chunk_size(chunk_size)
        self.fused_head = check_fused_head(fused_head)
        if temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        if ce_weight < 0:
            raise ValueError(f"loss.ce_weight must be >= 0, got {ce_weight}")
        if kd_weight < 0:
            raise ValueError(f"loss.kd_weight must be >= 0, got {kd_weight}")
        # a 1-token dry run: the divergence's own parameter checks (β, α) fire now, before any model is built
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), temperature=temperature)
        self.divergence = divergence
        self.temperature = temperature
        self.scale = temperature**2 if scale_by_temperature_squared else 1.0
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        # the teacher cache (teacher_cache.k): D computed exactly on the partition of the teacher's top-k
        # ids plus one tail outcome (kdlab.losses.sparse), a lower bound of the full D (data processing)
        self.needs = Needs(teacher=True, sparse_teacher=True, fused_head=self.fused_head, teacher_temperature=temperature)

    def dense(self, batch: KDBatch) -> LossOutput:
        if batch.teacher_sparse is not None:
            # the teacher cache: D on the k + 1 outcomes of the coarsened partition (kdlab.losses.sparse),
            # whose log-probabilities, already at τ, the divergence takes as logits at τ = 1
            log_q, log_p = coarsen(batch.student_logits, batch.teacher_sparse, self.temperature)
            per_token = self.scale * self.divergence(log_q, log_p, batch.labels, temperature=1.0)
        elif batch.teacher_logits is None:
            raise ValueError("TokenKD needs teacher logits; the module passed none")
        else:
            per_token = self.scale * self.divergence(
                batch.student_logits, batch.teacher_logits, batch.labels, temperature=self.temperature
            )
        kd = masked_mean(per_token, batch.mask, batch.num_tokens)
        logs = {"kd": kd.detach()}  # unweighted, comparable across kd_weight settings
        loss = self.kd_weight * kd
        per_token = self.kd_weight * per_token
        if self.ce_weight > 0:
            ce_per_token = cross_entropy(batch.student_logits, batch.labels)
            ce = masked_mean(ce_per_token, batch.mask, batch.num_tokens)
            logs["ce"] = ce.detach()
            loss = loss + self.ce_weight * ce
            per_token = per_token + self.ce_weight * ce_per_token
        return LossOutput(loss=loss, logs=logs, per_token=per_token.detach())


def available_losses() -> list[str]:
    return sorted(path.stem for path in LOSS_CONFIG_DIR.glob("*.yaml"))


def loss_config(name: str):
    """``kdlab/conf/loss/<name>.yaml`` as Hydra composes it for ``loss=<name>``: with the shared files
    its defaults list (``/loss_common/<file>@_here_``) merged in."""
    path = LOSS_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    return _composed(path)


def _composed(path: Path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    merged, own_merged = OmegaConf.create(), False
    for entry in cfg.pop("defaults", []):
        if entry == "_self_":
            merged, own_merged = OmegaConf.merge(merged, cfg), True
            continue
        option, _, package = entry.partition("@")
        if package != "_here_":  # the only form the loss files use: kdlab builds sub-losses from them (rlkd's base)
            raise ValueError(f"{path}: defaults entry {entry!r} must be <option>@_here_ to be loaded as a loss")
        folder = LOSS_CONFIG_DIR.parent if option.startswith("/") else path.parent
        merged = OmegaConf.merge(merged, _composed(folder / f"{option.lstrip('/')}.yaml"))
    return merged if own_merged else OmegaConf.merge(merged, cfg)


def load_loss(name_or_cfg) -> Callable[[KDBatch], LossOutput]:
    """Build a loss from ``kdlab/conf/loss/<name>.yaml`` (:func:`loss_config`) or from a ``_target_`` mapping.

    Lets a composite objective take another objective by its config name
    (``loss=rlkd loss.base=tvd``) through the same files Hydra composes, not a code registry.
    """
    from hydra.utils import instantiate

    if callable(name_or_cfg):
        return name_or_cfg
    if isinstance(name_or_cfg, str):
        return instantiate(loss_config(name_or_cfg))
    return instantiate(name_or_cfg)
