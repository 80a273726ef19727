"""The built-in suite's evaluation: each domain's exact checker and the grammar domain's metrics.

``data=suite`` plugs both into the DataModule (``checker``, ``extra_metrics``); nothing outside
``kdlab/data/`` imports this module, so the trainer and the metrics work the same on user data.

=================================  ==========================================================
``grammar/true_kl``                KL(p_true ‖ q) on the grammar domain's answer positions
``grammar/valid_fraction``         sampled grammar continuations that are valid sentences
=================================  ==========================================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from kdlab.data.records import Record
from kdlab.data.suite import Grammar, build_domains
from kdlab.losses.base import IGNORE_INDEX

log = logging.getLogger(__name__)


class SuiteChecker:
    """Scores generations with each built-in domain's exact checker (e.g. any valid grammar sentence)."""

    def __init__(self, domains: Sequence[str]):
        self.by_name = {d.name: d for d in build_domains(domains)}

    def __call__(self, record: Record, output: str) -> bool:
        return self.by_name[record.domain].check(record.prompt, output)


class GrammarTrueKL(Metric):
    """Mean KL(p_true ‖ q) over the grammar domain's answer positions, in nats.

    p_true is the grammar's exact next-token distribution given the sentence prefix
    (``Grammar.next_token_distribution``), q the model's softmax at that position, both
    teacher-forced on the reference sentence. The direction is forward, from the truth: it is
    finite for any model (q > 0 everywhere) and is the excess cross-entropy of the model over
    the grammar's entropy; the reverse KL(q ‖ p_true) is infinite as soon as the model puts any
    mass on a token the grammar forbids, which a softmax always does.

    ``update(logits (B, T, V), input_ids (B, T), labels (B, T))`` takes grammar rows only; the
    context of position t is ``input_ids[:, :t+1]`` without special tokens (``say w1 = a b``).
    The tokenizer must hold each grammar word as one token (the built-in suite's does).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, tokenizer, grammar: Grammar | None = None, **kwargs):
        super().__init__(**kwargs)
        self.grammar = grammar or Grammar()
        words = [w for w in dict.fromkeys(w for state in self.grammar.table.values() for w in state)]
        ids = tokenizer.convert_tokens_to_ids(words)
        unknown = [w for w, i in zip(words, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(
                f"grammar words {unknown} are not single tokens of this tokenizer; the grammar's true KL needs the suite's tokenizer"
            )
        self.word_ids = dict(zip(words, ids)) | {"<eos>": tokenizer.eos_token_id}
        self.id_to_token = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.special_ids = set(tokenizer.all_special_ids)
        self._true: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # a prefix's p_true, computed once
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def true_distribution(self, context: tuple[str, ...]) -> tuple[list[int], list[float]]:
        """Token ids and probabilities of p_true after ``context`` (``say w1 = a b``)."""
        if context not in self._true:
            dist = self.grammar.next_token_distribution(self.grammar.prefix(context))
            self._true[context] = ([self.word_ids[w] for w in dist], list(dist.values()))
        return self._true[context]

    def update(self, logits: Tensor, input_ids: Tensor, labels: Tensor) -> None:
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        p_true = torch.zeros(rows.numel(), logits.shape[-1])
        tokens = input_ids.tolist()
        for n, (b, t) in enumerate(zip(rows.tolist(), cols.tolist())):
            context = tuple(self.id_to_token[i] for i in tokens[b][: t + 1] if i not in self.special_ids)
            ids, probs = self.true_distribution(context)
            p_true[n, ids] = torch.tensor(probs)
        p_true = p_true.to(logits.device)
        log_q = logits[rows, cols].float().log_softmax(-1)
        kl = torch.where(p_true > 0, p_true * (p_true.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
        self.total += kl.sum()
        self.count += rows.numel()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class GrammarValidity(MeanMetric):
    """Fraction of continuations that complete their prompt into a valid sentence of the grammar.

    ``update(prompts, outputs)``: ``say the big =`` + ``cat sees a dog .`` is valid; an output that
    stops early, runs on after ``.``, or uses a word the grammar forbids at that point is not.
    """

    def __init__(self, grammar: Grammar | None = None, **kwargs):
        super().__init__(**kwargs)
        self.grammar = grammar or Grammar()

    def update(self, prompts: list[str], outputs: list[str]) -> None:  # type: ignore[override]
        if prompts:
            super().update(torch.tensor([float(self.grammar.check(p, o)) for p, o in zip(prompts, outputs)]))


class GrammarMetrics(torch.nn.Module):
    """The grammar domain's true KL (teacher-forced) and valid fraction (sampled), as extra metrics.

    Built by the DataModule's ``extra_metrics`` factory for one model's evaluation:
    ``update_logits(logits, batch)``, ``update_samples(domains, prompts, samples)`` and
    ``compute(prefix)`` are called by :class:`kdlab.metrics.ModelEval` beside its own metrics.
    """

    def __init__(self, tokenizer, domains: Sequence[str]):
        super().__init__()
        self.index = list(domains).index("grammar")
        self.true_kl = GrammarTrueKL(tokenizer)
        self.valid = GrammarValidity()

    def update_logits(self, logits: Tensor, batch: dict) -> None:
        rows = batch["domain"] == self.index
        if rows.any():
            self.true_kl.update(logits[rows], batch["input_ids"][rows], batch["labels"][rows])

    def update_samples(self, domains: list[int], prompts: list[str], samples: list[list[str]]) -> None:
        rows = [i for i, d in enumerate(domains) if d == self.index]
        if rows:
            self.valid.update([prompts[i] for i in rows for _ in samples[i]], [s for i in rows for s in samples[i]])

    def compute(self, prefix: str) -> dict[str, Tensor]:
        out = {}
        if self.true_kl.update_called:
            out[f"grammar/{prefix}true_kl"] = self.true_kl.compute()
        if self.valid.update_called:
            out[f"grammar/{prefix}valid_fraction"] = self.valid.compute()
        return out


def grammar_metrics(tokenizer, domains: Sequence[str]) -> list[torch.nn.Module]:
    """The suite's extra metrics for one model: the grammar metrics when the data has that domain
    and the tokenizer holds each grammar word as one token (the suite's own does)."""
    if "grammar" not in domains:
        return []
    try:
        return [GrammarMetrics(tokenizer, domains)]
    except ValueError as err:  # the suite with a foreign tokenizer: the other metrics still apply
        log.warning("grammar metrics are off: %s", err)
        return []
