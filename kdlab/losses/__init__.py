"""kdlab objectives: pure per-token functions and the callables Hydra builds from kdlab/conf/loss/."""

from kdlab.losses.base import IGNORE_INDEX, KDBatch, LossOutput, Needs, RolloutKDBatch, RolloutSettings, masked_mean, needs_of

__all__ = ["IGNORE_INDEX", "KDBatch", "LossOutput", "Needs", "RolloutKDBatch", "RolloutSettings", "masked_mean", "needs_of"]
