"""MiniLLM — sequence-level reverse KL by policy gradient (Gu et al., ICLR 2024, arXiv 2306.08543),
as specified in docs/methods.md §3 (parts 1–6 are cited below as §3.1 … §3.6).

Objective: min_θ KL[q_θ(y|x) ‖ p(y|x)], y ~ q_θ. With r_t = log p(y_t|y<t,x) − log q_θ(y_t|y<t,x)
and R_t = Σ_{t'≥t} r_t', its gradient is ∇L = −E Σ_t (R_t − 1) ∇log q_θ(y_t|y<t,x) (paper Eq. 2).
The estimator's parts, each with a switch (the paper's ablation):

- single-step decomposition (§3.1, Eq. 3): the step-t term E_{y_t~q_θ}[r_t] is computed exactly
  over the vocabulary, L_single = mean_t KL(q_θ(·|y<t) ‖ p(·|y<t)), and only the long-term part
  R_{t+1} goes through the policy gradient (``single_step``; off: the policy gradient uses R_t);
- teacher-mixed sampling (§3.2, Eq. 4–5): rollouts from p̃ = α·p + (1−α)·q_θ (``rollout.teacher_mix``,
  sampled by :mod:`kdlab.rollout`), each step weighted by w_t = q_θ(y_t|·)/p̃(y_t|·);
- length normalisation (§3.3, Eq. 6): R^norm_{t+1} = mean of r_t' over the remaining tokens t' > t
  (``length_normalize``);
- PPO clipping (§3.4): L_pg = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)),
  ρ_t = w_t · q_θ(y_t)/q_old(y_t) (``clip_eps``, None = off);
- pre-training term (§3.5): lm_coef · L_PT on plain text (``lm_coef``);

Total: L = L_pg + L_single + lm_coef · L_PT. The rewards r_t use the log-probs recorded at rollout
time (q_old, the student that sampled) and stay fixed while the buffer is reused (§3.6); w_t is
recorded then as well, so ρ_t = q_θ(y_t)/p̃(y_t), the importance ratio to the sampling distribution.

The authors' code (microsoft/LMOps, minillm/) differs; its variants are switches, off by default:
``gamma`` + ``include_current_step`` (discounted return including step t, divided by the number
of remaining tokens including t), ``whiten_advantages``, ``reward_scaling`` / ``reward_clip``
(r_t = (log p − log q_old)/0.5, clipped to ±100), ``pt_kd_ratio`` (L_PT = 0.5·LM + 0.5·FKL) and
``weight_single_step=False`` (its single-step term is not importance-weighted).

Reductions: every term is a masked mean over the batch's tokens (``num_tokens``), as in the
authors' code. With ``num_tokens`` = the number of sequences instead, the terms are per-sequence
sums: with single_step on, clipping and length normalisation off and α = 0 the gradient is then an
unbiased estimate of ∇KL[q_θ‖p] (tests/test_minillm.py checks this against exact enumeration).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.base import KDBatch, LossOutput, Needs, RolloutKDBatch, RolloutSettings, masked_mean
from kdlab.losses.divergences import cross_entropy, forward_kl, reverse_kl


def _zero_outside(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def token_rewards(
    teacher_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    *,
    reward_scaling: float | None = None,
    reward_clip: float | None = None,
) -> Tensor:
    """r_t = log p(y_t|·) − log q_old(y_t|·) per token (paper Eq. 2), 0 where ``mask`` is False.

    The authors' code: divided by ``reward_scaling`` (0.5 there, i.e. 2·(log p − log q_old)) and
    clipped to ±``reward_clip`` (100 there).
    """
    rewards = teacher_logprobs - old_logprobs
    if reward_scaling is not None:
        rewards = rewards / reward_scaling
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    return _zero_outside(rewards, mask)


def long_term_returns(
    rewards: Tensor,
    mask: Tensor,
    *,
    include_current_step: bool = False,
    length_normalize: bool = True,
    gamma: float = 1.0,
) -> Tensor:
    """The advantage A_t of each token, (B, T), 0 where ``mask`` is False.

    - ``include_current_step=False`` (single-step decomposition, Eq. 3): R_{t+1} = Σ_{t'>t} γ^{t'−t−1} r_t';
      ``True``: R_t = Σ_{t'≥t} γ^{t'−t} r_t' (Eq. 2 without the zero-mean −1; the authors' code).
    - ``length_normalize`` (Eq. 6): divided by the number of summed tokens, so R^norm_{t+1} is the
      mean of the future rewards (0 at the last token, which has none) — the paper's 1/(T−t−1)
      with t counted from 0. With the current step included it divides by the remaining tokens
      including t, as the authors' code does.
    """
    mask = mask.bool()
    rewards = _zero_outside(rewards, mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):  # T is a response length: a short loop
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    count = mask.flip(-1).cumsum(-1).flip(-1).to(rewards.dtype)  # valid tokens t' >= t
    if not include_current_step:
        returns = returns - rewards  # R_{t+1} = (R_t − r_t)/γ
        returns = returns / gamma if gamma != 1.0 else returns
        count = count - mask.to(rewards.dtype)
    if length_normalize:
        returns = returns / count.clamp(min=1)
    return _zero_outside(returns, mask)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values − mean) / std over the valid tokens (the authors' advantage whitening)."""
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    mean = _zero_outside(values, mask).sum() / n
    var = _zero_outside((values - mean) ** 2, mask).sum() / n
    return _zero_outside((values - mean) / (var.sqrt() + eps), mask)


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate (§3.4) and the ratio ρ_t = w_t · q_θ(y_t)/q_old(y_t).

    Returns (max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)), ρ_t), 0 where ``mask`` is False;
    ``clip_eps=None`` gives −A_t ρ_t. Advantages and weights carry no gradient: at θ = θ_old and
    w = 1 the gradient is −A_t ∇log q_θ(y_t), the policy gradient.
    """
    log_ratio = _zero_outside(logprobs - old_logprobs, mask)
    ratio = weights.detach() * log_ratio.exp()
    advantages = advantages.detach()
    surrogate = -advantages * ratio
    if clip_eps is not None:
        surrogate = torch.maximum(surrogate, -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    return _zero_outside(surrogate, mask), _zero_outside(ratio, mask)


def importance_weights(student_logprobs: Tensor, sample_logprobs: Tensor, mask: Tensor) -> Tensor:
    """w_t = q(y_t|·)/p̃(y_t|·) per token (§3.2, the per-step approximation of the product), 1 outside ``mask``."""
    return torch.where(mask, (student_logprobs - sample_logprobs).exp(), torch.ones_like(student_logprobs))


class MiniLLM:
    """``loss=minillm``: L = L_pg + L_single + lm_coef · L_PT on rollouts (see the module docstring).

    Args:
        single_step: §3.1 (Eq. 3). Off: no L_single, and the policy gradient uses R_t.
        length_normalize: §3.3 (Eq. 6).
        clip_eps: ε of §3.4; None turns clipping off.
        lm_coef: weight of L_PT (§3.5) on the data batch's full sequences (plain text); 0 = off.
        weight_single_step: multiply L_single's terms by w_t (paper Eq. 5: both parts of the
            gradient are importance-weighted under teacher-mixed sampling); False = the authors' code.
        include_current_step: None = as the paper (R_t exactly when single_step is off);
            True with single_step on is the authors' code.
        gamma, whiten_advantages, reward_scaling, reward_clip, pt_kd_ratio: the authors' code variants
            (γ = 0.95, True, 0.5, 100, 0.5 there); off by default.
        rollout: :class:`kdlab.losses.base.RolloutSettings` (sampling, buffer, epochs, mini-batches).

    Logs (``train/<name>``): ``pg``, ``single``, ``pt`` (the terms), ``reward`` (mean per-token
    reward as used), ``clip_frac`` (tokens with ρ outside [1−ε, 1+ε]), ``iw_mean``/``iw_max``
    (w_t over tokens), ``ratio_mean``, and the rollout's ``gen_length`` and ``rev_kl``.
    """

    def __init__(
        self,
        single_step: bool = True,
        length_normalize: bool = True,
        clip_eps: float | None = 0.2,
        lm_coef: float = 1.0,
        weight_single_step: bool = True,
        include_current_step: bool | None = None,
        gamma: float = 1.0,
        whiten_advantages: bool = False,
        reward_scaling: float | None = None,
        reward_clip: float | None = None,
        pt_kd_ratio: float = 0.0,
        rollout: RolloutSettings | None = None,
    ):
        if clip_eps is not None and not 0 < clip_eps < 1:
            raise ValueError(f"loss.clip_eps must be in (0, 1) or null, got {clip_eps}")
        if lm_coef < 0:
            raise ValueError(f"loss.lm_coef must be >= 0, got {lm_coef}")
        if not 0 < gamma <= 1:
            raise ValueError(f"loss.gamma must be in (0, 1], got {gamma}")
        if reward_scaling is not None and reward_scaling <= 0:
            raise ValueError(f"loss.reward_scaling must be > 0 or null, got {reward_scaling}")
        if not 0 <= pt_kd_ratio <= 1:
            raise ValueError(f"loss.pt_kd_ratio must be in [0, 1], got {pt_kd_ratio}")
        self.single_step = single_step
        self.length_normalize = length_normalize
        self.clip_eps = clip_eps
        self.lm_coef = lm_coef
        self.weight_single_step = weight_single_step
        self.include_current_step = (not single_step) if include_current_step is None else include_current_step
        self.gamma = gamma
        self.whiten_advantages = whiten_advantages
        self.reward_scaling = reward_scaling
        self.reward_clip = reward_clip
        self.pt_kd_ratio = pt_kd_ratio
        self.rollout = rollout if rollout is not None else RolloutSettings(teacher_mix=0.2)
        if self.rollout.fraction != 1.0:
            raise ValueError(f"loss.rollout.fraction={self.rollout.fraction}: MiniLLM trains on rollouts at every step; it must be 1")
        # rollouts at every step, plus the plain text for L_PT and the teacher on it for its KD share
        self.needs = Needs(rollouts=self.rollout, plain_text=lm_coef > 0, plain_text_teacher=lm_coef > 0 and pt_kd_ratio > 0)

    def __call__(self, batch: KDBatch) -> LossOutput:
        if not isinstance(batch, RolloutKDBatch) or batch.old_logprobs is None:
            raise ValueError("MiniLLM trains on rollouts; the module passed an ordinary batch (Needs.rollouts not honoured)")
        if batch.teacher_logits is None or batch.teacher_logprobs is None:
            raise ValueError("MiniLLM needs the teacher's logits and log-probs on the rollouts")
        mask = batch.mask
        # only the sampled positions reach a softmax over the vocabulary (prompt and padding rows carry no label)
        student_valid = batch.student_logits[mask]
        student_valid = student_valid.to(torch.promote_types(student_valid.dtype, torch.float32))  # bf16 → fp32; fp64 stays
        logprobs = torch.zeros(mask.shape, dtype=student_valid.dtype, device=mask.device)
        logprobs[mask] = student_valid.log_softmax(-1).gather(-1, batch.labels[mask].unsqueeze(-1)).squeeze(-1)

        rewards = token_rewards(
            batch.teacher_logprobs, batch.old_logprobs, mask, reward_scaling=self.reward_scaling, reward_clip=self.reward_clip
        )
        advantages = long_term_returns(
            rewards, mask, include_current_step=self.include_current_step, length_normalize=self.length_normalize, gamma=self.gamma
        )
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        weights = importance_weights(batch.old_logprobs, batch.sample_logprobs, mask)
        pg_tok, ratio = clipped_surrogate(logprobs, batch.old_logprobs, advantages, weights, mask, clip_eps=self.clip_eps)
        pg = masked_mean(pg_tok, mask, batch.num_tokens)
        loss, per_token = pg, pg_tok.detach()
        logs = {"pg": pg.detach()}

        if self.single_step:
            kl_tok = torch.zeros_like(logprobs)  # exact over V on the sampled positions, teacher no_grad
            kl_tok[mask] = reverse_kl(student_valid, batch.teacher_logits[mask]).to(kl_tok.dtype)
            if self.weight_single_step:
                kl_tok = weights * kl_tok
            single = masked_mean(kl_tok, mask, batch.num_tokens)
            loss = loss + single
            per_token = per_token + kl_tok.detach()
            logs["single"] = single.detach()

        if self.lm_coef > 0:
            plain = batch.plain
            if plain is None:
                raise ValueError("loss.lm_coef > 0 needs plain text; the module passed none")
            pt = masked_mean(cross_entropy(plain.student_logits, plain.labels), plain.mask, plain.num_tokens)
            if self.pt_kd_ratio > 0:
                fkl = masked_mean(forward_kl(plain.student_logits, plain.teacher_logits, plain.labels), plain.mask, plain.num_tokens)
                pt = (1 - self.pt_kd_ratio) * pt + self.pt_kd_ratio * fkl
            loss = loss + self.lm_coef * pt
            logs["pt"] = pt.detach()

        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            w_valid = weights[mask] if mask.any() else torch.ones(1, device=weights.device)
            logs["reward"] = rewards.sum() / n
            logs["iw_mean"] = w_valid.mean()
            logs["iw_max"] = w_valid.max()
            logs["ratio_mean"] = ratio.sum() / n
            if self.clip_eps is not None:
                outside = ((ratio - 1.0).abs() > self.clip_eps) & mask
                logs["clip_frac"] = outside.sum() / n
            logs.update(batch.stats)
        return LossOutput(loss=loss, logs=logs, per_token=per_token)
