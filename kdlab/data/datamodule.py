"""The DataModule: prompt/answer examples from several domains, tokenised for distillation.

Training batches follow a :class:`DomainMixtureSampler` (uniform over domains by default, any
weights from the config, or DDK's moving weights). Validation and test batches keep every
example once, in order, with left-padded prompts for generation and the reference answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from kdlab.data.sampler import DomainMixtureSampler
from kdlab.data.suite import Example
from kdlab.losses.base import IGNORE_INDEX

Checker = Callable[[Example, str], bool]


def exact_match(example: Example, output: str) -> bool:
    """The default checker: the generation equals the reference answer (whitespace-normalised)."""
    return " ".join(output.split()) == " ".join(example.answer.split())


class KDDataModule(L.LightningDataModule):
    """Tokenises ``splits`` ({"train"|"val"|"test": [Example]}) and serves them to the trainer.

    Each sequence is ``<bos> prompt answer <eos>``; labels are aligned with the logits (position
    t predicts token t+1) and count only answer tokens and the final ``<eos>``.
    """

    def __init__(
        self,
        splits: Mapping[str, Sequence[Example]],
        tokenizer,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        max_length: int = 32,
        num_workers: int = 0,
        mixing: Mapping[str, float] | None = None,
        checker: Checker | None = None,
        seed: int = 0,
    ):
        super().__init__()
        missing = {"train", "val", "test"} - set(splits)
        if missing:
            raise ValueError(f"data splits {sorted(missing)} are missing; the data source must give train, val and test")
        self.tokenizer = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.num_workers, self.seed = max_length, num_workers, seed
        self.checker = checker or exact_match
        self.examples = {name: list(split) for name, split in splits.items()}
        self.domains = sorted({ex.domain for ex in self.examples["train"]})
        for split in ("val", "test"):
            without = sorted(set(self.domains) - {ex.domain for ex in self.examples[split]})
            if without:
                raise ValueError(
                    f"domain(s) {without} have training data but no {split} data; every domain needs "
                    f"{split} examples (to measure it and, under DDK, to weight it)"
                )
        self.encoded = {name: [self._encode(ex) for ex in split] for name, split in self.examples.items()}
        self._check_lengths()
        self.max_new_tokens = max(len(e["answer_ids"]) for split in self.encoded.values() for e in split)
        domain_indices = {d: [] for d in self.domains}
        for i, ex in enumerate(self.examples["train"]):
            domain_indices[ex.domain].append(i)
        self.domain_indices = domain_indices
        self.sampler = DomainMixtureSampler(domain_indices, self._initial_weights(mixing), seed=seed)

    def setup(self, stage: str) -> None:
        # Under DDP every rank's sampler draws the same weighted stream and keeps every
        # world_size-th draw, so all ranks sample with the same (DDK-updated) weights and see
        # disjoint examples. Lightning must not wrap the sampler: its DistributedSamplerWrapper
        # would materialise a whole epoch of indices up front (a weight change would wait for the
        # next epoch) and reshuffle them, hence trainer.use_distributed_sampler=false.
        trainer = self.trainer
        if trainer is None or stage != "fit":
            return
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "KDDataModule shards its domain mixture sampler across ranks itself; "
                "set trainer.use_distributed_sampler=false for multi-device training"
            )
        self.sampler.rank, self.sampler.world_size = trainer.global_rank, trainer.world_size

    def _initial_weights(self, mixing: Mapping[str, float] | None) -> dict[str, float]:
        if not mixing:
            return {d: 1.0 for d in self.domains}
        unknown = sorted(set(mixing) - set(self.domains))
        if unknown:
            raise ValueError(f"data.mixing names unknown domain(s) {unknown}; the domains are {self.domains}")
        return {d: float(mixing.get(d, 0.0)) for d in self.domains}

    def _encode(self, ex: Example) -> dict:
        tok = self.tokenizer
        prompt = [tok.bos_token_id] + tok(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"prompt_ids": prompt, "answer_ids": answer, "domain": self.domains.index(ex.domain) if ex.domain in self.domains else -1}

    def _check_lengths(self) -> None:
        longest = max((e for split in self.encoded.values() for e in split), key=lambda e: len(e["prompt_ids"]) + len(e["answer_ids"]))
        need = len(longest["prompt_ids"]) + len(longest["answer_ids"])
        if need > self.max_length:
            domain = self.domains[longest["domain"]] if longest["domain"] >= 0 else "?"
            raise ValueError(
                f"data.max_length={self.max_length} is too small: an example of domain {domain!r} needs {need} tokens "
                f"(<bos> + prompt: {len(longest['prompt_ids'])}, answer + <eos>: {len(longest['answer_ids'])}). "
                f"Set data.max_length={need} or more."
            )

    def collate(self, items: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        width = max(len(e["prompt_ids"]) + len(e["answer_ids"]) for e in items)
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        prompt_width = max(len(e["prompt_ids"]) for e in items)
        prompt_ids = torch.full((len(items), prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(items), prompt_width), dtype=torch.long)
        for i, e in enumerate(items):
            seq = e["prompt_ids"] + e["answer_ids"]
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            # logits at position t predict token t+1: the last prompt token predicts the first answer token
            start = len(e["prompt_ids"]) - 1
            labels[i, start : start + len(e["answer_ids"])] = torch.tensor(e["answer_ids"])
            prompt_ids[i, prompt_width - len(e["prompt_ids"]) :] = torch.tensor(e["prompt_ids"])  # left padding
            prompt_mask[i, prompt_width - len(e["prompt_ids"]) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "domain": torch.tensor([e["domain"] for e in items]),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "index": torch.tensor([e["index"] for e in items]),
        }

    def _dataset(self, split: str) -> list[dict]:
        return [dict(e, index=i) for i, e in enumerate(self.encoded[split])]

    def train_dataloader(self, sampler: DomainMixtureSampler | None = None) -> DataLoader:
        """Training batches drawn by ``sampler`` (default: this module's mixture sampler)."""
        return DataLoader(
            self._dataset("train"),
            batch_size=self.batch_size,
            sampler=sampler or self.sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self._dataset(split), batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def check(self, split: str, index: int, output: str) -> bool:
        """Score one generated continuation of ``split``'s example ``index``."""
        return bool(self.checker(self.examples[split][index], output))


class SuiteChecker:
    """Scores generations with each built-in domain's exact checker (e.g. any valid grammar sentence)."""

    def __init__(self, domains: Sequence[str]):
        from kdlab.data.suite import build_domains

        self.by_name = {d.name: d for d in build_domains(domains)}

    def __call__(self, example: Example, output: str) -> bool:
        return self.by_name[example.domain].check(example.prompt, output)
