"""kdlab objectives: pure per-token functions and the callables Hydra builds from conf/loss/."""

from kdlab.losses.base import IGNORE_INDEX, KDBatch, LossOutput, masked_mean

__all__ = ["IGNORE_INDEX", "KDBatch", "LossOutput", "masked_mean"]
