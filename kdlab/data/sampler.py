"""A sampler that draws training examples from domains with weights that may change mid-run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler


class DomainMixtureSampler(Sampler[int]):
    """Example indices drawn as: a domain by weight, then that domain's next example.

    The weights live here, not in the dataset, and are read at every draw, so ``set_weights``
    (DDK) takes effect from the next batch the loader asks for. Each domain walks through its
    own shuffled permutation and reshuffles when it runs out (a small domain is cycled, never
    exhausted). The random state carries over from one epoch to the next, so epochs continue
    the stream instead of repeating it. Deterministic under ``seed``; every data-parallel rank draws the same sequence
    and keeps every ``world_size``-th index, so all ranks sample with the same weights.
    """

    def __init__(
        self,
        domain_indices: Mapping[str, Sequence[int]],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        empty = [name for name, idx in domain_indices.items() if len(idx) == 0]
        if empty:
            raise ValueError(f"domain(s) {empty} have no training examples; remove them from the data config")
        self.names = list(domain_indices)
        self.indices = [torch.as_tensor(list(domain_indices[n]), dtype=torch.long) for n in self.names]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.counts = torch.zeros(len(self.names), dtype=torch.long)  # draws since the last reset
        self.set_weights(weights or {n: 1.0 for n in self.names})
        self._gen = torch.Generator().manual_seed(seed)
        self._orders = [idx[torch.randperm(len(idx), generator=self._gen)] for idx in self.indices]
        self._cursors = [0] * len(self.indices)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"weights for unknown domain(s) {sorted(unknown)}; domains are {self.names}")
        w = torch.tensor([float(weights.get(n, 0.0)) for n in self.names], dtype=torch.double)
        if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"domain weights must be finite, >= 0 and not all 0, got {dict(weights)}")
        self.weights = w / w.sum()

    @property
    def weight_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist()))

    def take_counts(self) -> dict[str, int]:
        """Per-domain number of examples drawn since the last call (then reset)."""
        counts = dict(zip(self.names, self.counts.tolist()))
        self.counts.zero_()
        return counts

    def __len__(self) -> int:
        return sum(len(i) for i in self.indices) // self.world_size

    def _draw(self) -> tuple[int, int]:
        d = int(torch.multinomial(self.weights, 1, generator=self._gen))
        if self._cursors[d] == len(self._orders[d]):
            self._orders[d] = self.indices[d][torch.randperm(len(self.indices[d]), generator=self._gen)]
            self._cursors[d] = 0
        self._cursors[d] += 1
        return d, int(self._orders[d][self._cursors[d] - 1])

    def state_dict(self) -> dict:
        """Everything that decides the next draws (for exact resume): the random state, each
        domain's permutation and position, the weights and the draw counts."""
        return {
            "generator": self._gen.get_state(),
            "orders": [o.clone() for o in self._orders],
            "cursors": list(self._cursors),
            "weights": self.weights.clone(),
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["generator"])
        self._orders = [o.clone() for o in state["orders"]]
        self._cursors = list(state["cursors"])
        self.weights, self.counts = state["weights"].clone(), state["counts"].clone()

    def __iter__(self) -> Iterator[int]:
        for _ in range(len(self)):
            # Ranks share one stream: every rank draws a whole round of world_size draws and keeps
            # its own. Between two yields all ranks stand at the same place in the stream, so a
            # weight change (set on every rank between batches) applies from the same draw on all.
            d, index = [self._draw() for _ in range(self.world_size)][self.rank]
            self.counts[d] += 1
            yield index


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` draws of a :class:`DomainMixtureSampler`, remembering the
    sampler's state before each of the last few batches.

    The loader fetches a batch ahead of the one being trained on, so the sampler's live state
    is past what has been trained; ``state_before(n)`` is the state after exactly ``n`` batches,
    which a checkpoint stores so that a resumed run draws the very batches an uninterrupted one
    would have drawn.
    """

    def __init__(self, sampler: DomainMixtureSampler, batch_size: int, keep: int = 8):
        self.sampler, self.batch_size, self.keep = sampler, batch_size, keep
        self.served = 0  # batches handed out so far, across epochs
        self._states: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        draws = iter(self.sampler)
        for _ in range(len(self)):
            self._states[self.served] = self.sampler.state_dict()
            self._states.pop(self.served - self.keep, None)
            self.served += 1
            yield [next(draws) for _ in range(self.batch_size)]

    def state_before(self, batch: int) -> dict:
        if batch == self.served:  # nothing fetched ahead
            return self.sampler.state_dict()
        if batch not in self._states:
            raise RuntimeError(f"no sampler state kept for batch {batch} (served {self.served}); cannot checkpoint the data stream")
        return self._states[batch]

    def load_state_dict(self, state: dict, served: int) -> None:
        self.sampler.load_state_dict(state)
        self.served, self._states = served, {}
