"""On-policy distillation for any token-level objective (GKD: Agarwal et al., ICLR 2024, arXiv 2306.13649).

A fraction λ of the training batches are the student's own continuations of the batch's prompts
(sampled fresh by :mod:`kdlab.rollout`; teacher logits computed on them); the base divergence is
applied to the sampled tokens exactly as to a data batch's answer tokens. The other 1 − λ batches
are ordinary data batches. λ = 0 is the base loss itself; λ = 1 is fully on-policy.

    python -m kdlab.train loss=onpolicy loss.base=jsd loss.lambda_onpolicy=1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdlab.losses.base import KDBatch, LossOutput, Needs, RolloutKDBatch, RolloutSettings, needs_of


class OnPolicyKD:
    """``loss=onpolicy``: the ``base`` objective on student samples for a fraction ``lambda_onpolicy`` of batches.

    Args:
        base: a loss name (``kdlab/conf/loss/<name>.yaml``, e.g. ``fkl``, ``jsd``, ``rlkd``) or a callable.
            It must use the teacher: a teacher-free loss on the student's own samples teaches nothing.
        lambda_onpolicy: λ, the fraction of steps on student samples (TRL's GKD default 0.5). The
            steps are spread evenly (see :class:`kdlab.rollout.RolloutBuffer`).
        rollout: sampling settings; ``teacher_mix``, ``epochs`` and the buffer sizes default to
            fresh pure-student samples of the whole batch every on-policy step (as GKD).

    Logs ``onpolicy`` (1 on a student-sample step, else 0) and on those steps the rollouts'
    ``gen_length`` and ``rev_kl``, beside the base loss's own logs.
    """

    def __init__(
        self,
        base: str | Callable[[KDBatch], LossOutput] = "fkl",
        lambda_onpolicy: float = 0.5,
        rollout: RolloutSettings | None = None,
    ):
        from kdlab.losses.divergences import load_loss

        if not 0.0 <= lambda_onpolicy <= 1.0:
            raise ValueError(f"loss.lambda_onpolicy must be in [0, 1], got {lambda_onpolicy}")
        if base in ("minillm", "onpolicy"):
            raise ValueError(f"loss.base={base!r}: the base of loss=onpolicy must be a token-level objective (fkl, rkl, jsd, ...)")
        self.base = load_loss(base)
        if not needs_of(self.base).teacher:
            raise ValueError(
                f"loss.base={base!r} does not use the teacher, so training it on the student's own samples teaches "
                "nothing; pick a divergence (fkl, rkl, jsd, skl, srkl, tvd)"
            )
        self.rollout = rollout if rollout is not None else RolloutSettings()
        self.rollout.fraction = lambda_onpolicy
        self.needs = Needs(rollouts=self.rollout)

    def __call__(self, batch: KDBatch) -> LossOutput:
        out = self.base(batch)
        on = isinstance(batch, RolloutKDBatch)
        logs = dict(out.logs, onpolicy=torch.tensor(float(on)))
        if on:
            logs.update(batch.stats)
        return LossOutput(loss=out.loss, logs=logs, per_token=out.per_token)
