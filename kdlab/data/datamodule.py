"""The DataModule: tokenised :class:`Record`s from several domains, sampled, batched and counted.

Training batches follow a :class:`DomainMixtureSampler` (uniform over domains by default, any
weights from the config, or DDK's moving weights). Validation and test batches keep every
record once, in order, with left-padded prompts for generation and the reference answers.
The data sources hand it record splits: the built-in suite (:class:`kdlab.data.suite.SuiteDataModule`)
and your files (:class:`kdlab.data.files.FilesDataModule`) tokenise their own records.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, get_worker_info

from kdlab.data.records import Record
from kdlab.data.sampler import DomainMixtureSampler, MixtureBatchSampler
from kdlab.losses.base import IGNORE_INDEX

Checker = Callable[[Record, str], bool]
log = logging.getLogger(__name__)


class ExactMatch:
    """A checker: the generation equals the reference answer (whitespace-normalised)."""

    def __call__(self, record: Record, output: str) -> bool:
        return " ".join(output.split()) == " ".join(record.answer.split())


class KDDataModule(L.LightningDataModule):
    """Serves ``splits`` ({"train"|"val"|"test": [Record]}) to the trainer.

    Labels are aligned with the logits (position t predicts token t+1). ``checker``
    scores greedy generations (exact match); None: no greedy generation at all. ``pretrain``:
    records of plain text for a pre-training term (MiniLLM's L_PT), drawn as ``batch["plain"]``
    beside every training batch; None: losses that need one use the batch's own sequences.
    ``extra_metrics``: a factory ``(tokenizer, domains) -> [metric]`` of data-specific
    evaluation metrics (the suite's grammar metrics). ``eos_token_id``: where generation stops
    (default the tokenizer's). ``max_new_tokens``: the generation budget (default the longest
    reference response).
    """

    def __init__(
        self,
        splits: Mapping[str, Sequence],
        tokenizer,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        max_length: int = 32,
        num_workers: int = 0,
        mixing: Mapping[str, float] | None = None,
        checker: Checker | None = None,
        seed: int = 0,
        pretrain: Sequence[Record] | None = None,
        extra_metrics: Callable | None = None,
        eos_token_id: int | None = None,
        max_new_tokens: int | None = None,
    ):
        super().__init__()
        missing = {"train", "val", "test"} - set(splits)
        if missing:
            raise ValueError(f"data splits {sorted(missing)} are missing; the data source must give train, val and test")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        self.tokenizer = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length, self.num_workers, self.seed = max_length, num_workers, seed
        self.checker = checker
        self.extra_metrics = extra_metrics
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        self.records = {name: list(split) for name, split in splits.items()}
        self.pretrain = list(pretrain) if pretrain else None
        self.domains = sorted({r.domain for r in self.records["train"]})
        if not self.domains:
            raise ValueError("the training split is empty; give the data source at least one training record")
        for split in ("val", "test"):
            without = sorted(set(self.domains) - {r.domain for r in self.records[split]})
            if without:
                raise ValueError(
                    f"domain(s) {without} have training data but no {split} data; every domain needs "
                    f"{split} examples (to measure it and, under DDK, to weight it)"
                )
            untrained = sorted({r.domain for r in self.records[split]} - set(self.domains))
            if untrained:
                raise ValueError(
                    f"domain(s) {untrained} have {split} data but no training data: they would count in {split}/loss (the "
                    f"checkpoint monitor) without a per-domain metric; remove them from data.{split} or add training records"
                )
        self._check_held_out_is_not_training_data()
        self._check_lengths()
        responses = [r.response_len for split in self.records.values() for r in split]
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"data.max_new_tokens={max_new_tokens} must be >= 1, or null for the longest reference response")
        self.max_new_tokens = max_new_tokens or max(responses) or 1
        domain_indices = {d: [] for d in self.domains}
        for i, r in enumerate(self.records["train"]):
            domain_indices[r.domain].append(i)
        self.domain_indices = domain_indices
        self.sampler = DomainMixtureSampler(domain_indices, self._initial_weights(mixing), seed=seed)
        self.batches: MixtureBatchSampler | None = None  # the run's training batches, once a loader is built
        self._restored: tuple[dict, int] | None = None  # a checkpoint's sampler state, applied to the next loader
        self._pretrain_generator: torch.Generator | None = None

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
        if mixing is None:
            return {d: 1.0 for d in self.domains}
        if not mixing:
            raise ValueError(
                f"data.mixing is empty: name each domain's weight, e.g. data.mixing='{{{self.domains[0]}: 2, ...}}' (a domain "
                f"left out gets 0; the domains are {self.domains}), or use data/mixing=uniform"
            )
        unknown = sorted(set(mixing) - set(self.domains))
        if unknown:
            raise ValueError(f"data.mixing names unknown domain(s) {unknown}; the domains are {self.domains}")
        return {d: float(mixing.get(d, 0.0)) for d in self.domains}

    def _check_held_out_is_not_training_data(self) -> None:
        """Validation and test records that are copies of training records measure memorisation: a domain
        whose held-out records are all copies is refused, a few copies (duplicates in a dataset) are said."""
        seen = {r.input_ids for r in self.records["train"]}
        for split in ("val", "test"):
            copies = Counter(r.domain for r in self.records[split] if r.input_ids in seen)
            if not copies:
                continue
            sizes = Counter(r.domain for r in self.records[split])
            whole = sorted(d for d, n in copies.items() if n == sizes[d])
            if whole:
                raise ValueError(
                    f"every data.{split} record of domain(s) {whole} is also a training record: {split} metrics would "
                    f"measure memorisation. Give held-out records, or leave data.{split} unset to hold them out of data.train"
                )
            log.warning("%d data.%s record(s) are copies of training records (%s)", sum(copies.values()), split, dict(sorted(copies.items())))

    def _check_lengths(self) -> None:
        longest = max((r for split in self.records.values() for r in split), key=lambda r: len(r.input_ids))
        if len(longest.input_ids) > self.max_length:
            raise ValueError(
                f"data.max_length={self.max_length} is too small: a record of domain {longest.domain!r} needs "
                f"{len(longest.input_ids)} tokens (prompt: {longest.prompt_len}, answer: {longest.response_len}). "
                f"Set data.max_length={len(longest.input_ids)} or more."
            )

    def longest_sequence(self) -> tuple[int, str]:
        """The most positions a run feeds a model: the longest record, or a prompt plus the generation budget."""
        records = [r for split in self.records.values() for r in split]
        longest = max(records, key=lambda r: len(r.input_ids))
        prompted = max((r for r in records if r.prompt_len), key=lambda r: r.prompt_len, default=None)
        generated = prompted.prompt_len + self.max_new_tokens if prompted is not None else 0
        if generated > len(longest.input_ids):
            return generated, f"generation (a {prompted.prompt_len}-token prompt of domain {prompted.domain!r} + data.max_new_tokens={self.max_new_tokens})"
        return len(longest.input_ids), f"a record of domain {longest.domain!r} (data.max_length={self.max_length})"

    # -- batches ------------------------------------------------------------------------------
    def collate(self, items: list[dict]) -> dict:
        records: list[Record] = [e["record"] for e in items]
        batch = self._sequences(records)
        pad = self.tokenizer.pad_token_id
        # prompts for generation, LEFT-padded; a record without a prompt (plain text) gets its
        # first token and generate=False, so evaluation skips it
        prompts = [r.input_ids[: max(r.prompt_len, 1)] for r in records]
        prompt_width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(items), prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(items), prompt_width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, prompt_width - len(p) :] = torch.tensor(p)
            prompt_mask[i, prompt_width - len(p) :] = 1
        batch.update(
            domain=torch.tensor([self.domains.index(r.domain) if r.domain in self.domains else -1 for r in records]),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            generate=torch.tensor([r.prompt_len > 0 for r in records]),
            index=torch.tensor([e["index"] for e in items]),
        )
        return batch

    @property
    def aligned(self) -> bool:
        """Whether the records carry the teacher's own tokenisation (distillation across tokenizers)."""
        return bool(self.records["train"][0].teacher_ids)

    @staticmethod
    def _aligned(records: Sequence[Record], width: int) -> dict:
        """Across tokenizers, for the aligned step (kdlab/steps.py): the teacher's sequences as
        :meth:`teacher_sequences` gives them (``teacher_input_ids``, ``teacher_attention_mask``,
        ``teacher_labels``: where the teacher is read), and over the student's logits positions the
        groups' first tokens (``kd_student``) and which of them are matched (``kd_matched``). In
        row-major order the teacher's read positions and ``kd_student`` pair up."""
        teacher = KDDataModule._teacher_sequences(records)
        kd_student = torch.zeros((len(records), width), dtype=torch.bool)
        kd_matched = torch.zeros((len(records), width), dtype=torch.bool)
        for i, r in enumerate(records):
            for s, _, matched in r.aligned:
                kd_student[i, s - 1] = True
                kd_matched[i, s - 1] = matched
        return {"teacher_input_ids": teacher["input_ids"], "teacher_attention_mask": teacher["attention_mask"],
                "teacher_labels": teacher["labels"], "kd_student": kd_student, "kd_matched": kd_matched}

    @staticmethod
    def _teacher_sequences(records: Sequence[Record]) -> dict:
        """The teacher's own tokenisations, right-padded (the padding is masked), with ``labels``: the
        teacher's next token at each aligned group's first position (what it predicts there), elsewhere IGNORE_INDEX."""
        width = max(len(r.teacher_ids) for r in records)
        input_ids = torch.zeros((len(records), width), dtype=torch.long)
        attention_mask = torch.zeros((len(records), width), dtype=torch.long)
        labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(records):
            input_ids[i, : len(r.teacher_ids)] = torch.tensor(r.teacher_ids)
            attention_mask[i, : len(r.teacher_ids)] = 1
            for _, t, _ in r.aligned:
                labels[i, t - 1] = r.teacher_ids[t]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _sequences(self, records: Sequence[Record]) -> dict:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (aligned with the logits)."""
        width = max(len(r.input_ids) for r in records)
        input_ids = torch.full((len(records), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(records), width), dtype=torch.long)
        for i, r in enumerate(records):
            ids = torch.tensor(r.input_ids)
            n = len(ids)
            input_ids[i, :n] = ids
            attention_mask[i, :n] = 1
            # logits at position t predict token t+1
            labels[i, : n - 1] = torch.where(torch.tensor(r.targets[1:]), ids[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # -- what the teacher reads (the teacher cache builds from these) ---------------------------------
    def teacher_sequences(self, records: Sequence[Record]) -> dict:
        """The teacher's inputs for ``records`` and, as ``labels``, the tokens it is read at (elsewhere
        IGNORE_INDEX): the records' own labels, or across tokenizers its own sequences at the aligned
        groups' first positions."""
        return self._teacher_sequences(records) if self.aligned else self._sequences(records)

    def teacher_positions(self, record: Record) -> int:
        """How many of the record's positions the teacher is read at (:meth:`teacher_sequences`)."""
        return len(record.aligned) if self.aligned else record.num_targets

    def _train_collate(self, items: list[dict]) -> dict:
        batch = self.collate(items)  # "index": each record's place in records["train"] (the teacher cache's key)
        if self.aligned:  # only training batches: evaluation reads the student alone
            batch.update(self._aligned([e["record"] for e in items], batch["input_ids"].shape[1]))
        if self.pretrain:
            batch["plain"] = self._sequences(self._draw_pretrain(len(items)))
        return batch

    def _draw_pretrain(self, n: int) -> list[Record]:
        if self._pretrain_generator is None:  # own stream per loader worker, from the data seed
            worker = get_worker_info()
            self._pretrain_generator = torch.Generator().manual_seed(self.seed * 7919 + 17 + (worker.id if worker else 0))
        picks = torch.randint(len(self.pretrain), (n,), generator=self._pretrain_generator)
        return [self.pretrain[i] for i in picks.tolist()]

    def _dataset(self, split: str) -> list[dict]:
        return [{"record": r, "index": i} for i, r in enumerate(self.records[split])]

    def train_dataloader(self, sampler: DomainMixtureSampler | None = None, batch_size: int | None = None):
        """Training batches of ``batch_size`` (default ``data.batch_size``) drawn by ``sampler``
        (default: this module's mixture sampler).

        With gradient accumulation over k micro-batches (``trainer.accumulate_grad_batches``),
        each optimiser step's k·b records are drawn and counted together, and every micro-batch
        carries the window's valid-token count (``window_tokens``, ``window_size`` = k), so that the
        step's loss is the sum over the window's valid tokens divided by their number, exactly as
        one batch of k·b (kdlab.module.DistillModule.num_tokens).
        """
        k = self.trainer.accumulate_grad_batches if self._trainer_attached() else 1
        batches = MixtureBatchSampler(sampler or self.sampler, (batch_size or self.batch_size) * k)
        if sampler is None:  # the run's own stream: checkpointed (state_dict) for exact resume
            if self._restored is not None:
                batches.load_state_dict(*self._restored)
                self._restored = None
            self.batches = batches
        loader = DataLoader(
            self._dataset("train"),
            batch_sampler=batches,
            collate_fn=self._train_collate,
            num_workers=self.num_workers,
        )
        return loader if k == 1 else MicroBatches(loader, k)

    # -- exact resume: the training stream's state after the batches already trained on ------------
    def state_dict(self) -> dict:
        if self.batches is None:
            return {}
        consumed = self.trainer.global_step  # one loader batch (k micro-batches) per optimiser step
        return {"sampler": self.batches.state_before(consumed), "served": consumed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._restored = (state["sampler"], state["served"])

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:  # a DataModule used without a Trainer
            return False

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def check(self, split: str, index: int, output: str) -> bool:
        """Score one generated continuation of ``split``'s record ``index`` (needs a checker)."""
        return bool(self.checker(self.records[split][index], output))



class MicroBatches:
    """Splits each batch of k·b records into k micro-batches that carry the whole window's
    valid-token count, so that gradient accumulation normalises by the optimiser step's tokens."""

    def __init__(self, loader: DataLoader, k: int):
        self.loader, self.k = loader, k

    def __len__(self) -> int:
        return len(self.loader) * self.k

    def __iter__(self):
        for window in self.loader:
            tokens = (window["labels"] != IGNORE_INDEX).sum()
            for micro in split_batch(window, self.k):
                micro.update(window_tokens=tokens, window_size=torch.tensor(self.k))
                yield micro


def split_batch(batch: dict, k: int) -> list[dict]:
    """``batch`` as k equal micro-batches, each trimmed to its own longest sequence and prompt."""
    size = batch["input_ids"].shape[0] // k
    out = []
    for i in range(k):
        rows = slice(i * size, (i + 1) * size)
        micro = {key: value[rows] for key, value in batch.items() if not isinstance(value, dict)}
        width = int(micro["attention_mask"].sum(-1).max())
        for key in ("input_ids", "attention_mask", "labels", "kd_student", "kd_matched"):
            if key in micro:
                micro[key] = micro[key][:, :width]
        if "teacher_attention_mask" in micro:  # the teacher's own tokenisation (across tokenizers)
            width = int(micro["teacher_attention_mask"].sum(-1).max())
            for key in ("teacher_input_ids", "teacher_attention_mask", "teacher_labels"):
                micro[key] = micro[key][:, :width]
        if "prompt_mask" in micro:
            prompt_width = int(micro["prompt_mask"].sum(-1).max())
            micro["prompt_ids"], micro["prompt_mask"] = micro["prompt_ids"][:, -prompt_width:], micro["prompt_mask"][:, -prompt_width:]
        if isinstance(batch.get("plain"), dict):  # the pre-training corpus batch, split alike
            micro["plain"] = {key: value[rows] for key, value in batch["plain"].items()}
        out.append(micro)
    return out
