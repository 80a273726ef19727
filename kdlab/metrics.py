"""Evaluation metrics of one model in one validation or test pass (torchmetrics wherever it has them).

:class:`ModelEval` holds everything measured on one model (the student, or the teacher as a
reference), per domain and overall; :class:`DistillModule` feeds it and logs ``compute()`` as
``val/…`` and ``test/…``:

=================================  ==========================================================
``ppl``, ``<domain>/ppl|loss``     teacher-forced perplexity on answer tokens (``Perplexity``)
``exact_match``                    greedy generations the domain's checker accepts (``MeanMetric``)
``ece``                            expected calibration error of next-token predictions on answer
                                   tokens (``MulticlassCalibrationError``, L1, equal-width bins)
``rouge1|rouge2|rougeL``           ROUGE F1 of SAMPLED responses against the reference
                                   (``ROUGEScore``), per domain and mean over domains
``<extra>``                        data-specific metrics from the DataModule's ``extra_metrics``
                                   (the built-in suite: ``grammar/true_kl|valid_fraction``)
=================================  ==========================================================

Sampled responses follow MiniLLM's evaluation protocol (Gu et al., ICLR 2024, arXiv
2306.08543, §4.1: responses sampled at temperature 1, ROUGE-L against the reference, averaged
over 5 generation seeds): ``EvalSettings.num_samples`` independent samples per prompt at test
(``val_num_samples`` at each validation, to keep validation cheap). The samples come from a
generator seeded by ``(EvalSettings.seed, batch index)``, never from the global RNG, so a test
pass is reproducible bit for bit (``python -m kdlab.evaluate`` relies on it).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.text import Perplexity, ROUGEScore

from kdlab.losses.base import IGNORE_INDEX

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")  # rougeLsum needs nltk's punkt, a download


@dataclass
class EvalSettings:
    """What a validation / test pass measures beyond perplexity and greedy exact match (``kdlab/conf/eval``).

    ``num_samples`` responses per prompt are sampled at test (MiniLLM: 5 seeds), ``val_num_samples``
    at each validation (0 = no sampled metrics at validation); ``temperature`` and ``top_p`` shape
    the sampling distribution (MiniLLM: 1.0, 1.0); ``seed`` seeds it. ``ece_bins``: equal-width
    confidence bins of the ECE. ``rouge_stemmer``: Porter stemming before ROUGE (as MiniLLM's
    evaluation, which uses the rouge_score package with ``use_stemmer=True``). ``table_rows``: sample
    generations per domain in the samples table of each pass (W&B table and ``samples.jsonl``).
    """

    num_samples: int = 5
    val_num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    ece_bins: int = 15
    rouge_stemmer: bool = True
    table_rows: int = 2

    def __post_init__(self):
        if self.num_samples < 0 or self.val_num_samples < 0:
            raise ValueError(
                f"eval.num_samples and eval.val_num_samples must be >= 0, got {self.num_samples}, {self.val_num_samples}"
            )
        if self.temperature <= 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        if self.ece_bins < 1 or self.table_rows < 0:
            raise ValueError(
                f"eval.ece_bins must be >= 1 and eval.table_rows >= 0, got {self.ece_bins}, {self.table_rows}"
            )


class NextTokenCalibrationError(MulticlassCalibrationError):
    """Expected calibration error of next-token predictions at the positions that count.

    ECE = Σ_b (n_b / N) · abs(acc_b − conf_b) over equal-width bins of the top-1 probability
    (Guo et al. 2017); MiniLLM (§4.3) measures the calibration of distilled students this way.
    ``update(logits (B, T, V), labels (B, T))``: positions with ``labels == IGNORE_INDEX`` are
    skipped, so only answer tokens (and the final ``<eos>``) count.
    """

    def __init__(self, num_classes: int, n_bins: int = 15, **kwargs):
        super().__init__(num_classes=num_classes, n_bins=n_bins, norm="l1", validate_args=False, **kwargs)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        keep = labels != IGNORE_INDEX
        if keep.any():
            # probabilities, not logits: torchmetrics would take logits that happen to lie in [0, 1] as probabilities
            super().update(logits[keep].float().softmax(-1), labels[keep])


class ModelEval(torch.nn.Module):
    """Every metric of one model over one evaluation pass, per domain and overall.

    ``extras``: data-specific metrics (e.g. the built-in suite's grammar metrics, from the
    DataModule's ``extra_metrics``), each with ``update_logits(logits, batch)``,
    ``update_samples(domains, prompts, samples)`` and ``compute(prefix) -> dict``. Overall exact
    match and ROUGE are means over the domains that have them (each domain weighs the same,
    whatever its number of examples); perplexity and ECE are over all target tokens.
    """

    def __init__(self, domains: list[str], num_classes: int, settings: EvalSettings, extras=()):
        super().__init__()
        self.domains = list(domains)
        n = len(domains)
        self.ppl = torch.nn.ModuleList(Perplexity(ignore_index=IGNORE_INDEX) for _ in range(n))
        self.all_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.exact = torch.nn.ModuleList(MeanMetric() for _ in range(n))
        self.ece = NextTokenCalibrationError(num_classes, settings.ece_bins)
        self.rouge = torch.nn.ModuleList(
            ROUGEScore(rouge_keys=ROUGE_KEYS, use_stemmer=settings.rouge_stemmer) for _ in range(n)
        )
        self.extras = torch.nn.ModuleList(extras)
        self._exact_domains: set[int] = set()
        self._sampled_domains: set[int] = set()

    def update_logits(self, logits: Tensor, batch: dict) -> None:
        labels, domain = batch["labels"], batch["domain"]
        self.all_ppl.update(logits.float(), labels)
        self.ece.update(logits, labels)
        for d, metric in enumerate(self.ppl):
            rows = domain == d
            if rows.any():
                metric.update(logits[rows].float(), labels[rows])
        for extra in self.extras:
            extra.update_logits(logits, batch)

    def update_exact(self, domains: list[int], correct: list[bool]) -> None:
        for d, ok in zip(domains, correct):
            self.exact[d].update(float(ok))
            self._exact_domains.add(d)

    def update_samples(
        self, domains: list[int], prompts: list[str], references: list[str], samples: list[list[str]]
    ) -> None:
        """``samples[i]``: the responses sampled for prompt i (one per seed)."""
        for d in set(domains):
            rows = [i for i, di in enumerate(domains) if di == d]
            self.rouge[d].update(
                [s for i in rows for s in samples[i]], [references[i] for i in rows for _ in samples[i]]
            )
            self._sampled_domains.add(d)
        for extra in self.extras:
            extra.update_samples(domains, prompts, samples)

    def compute(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}ppl": self.all_ppl.compute()}
        if self.ece.update_called:
            out[f"{prefix}ece"] = self.ece.compute()
        for d, name in enumerate(self.domains):
            ppl = self.ppl[d].compute()
            out[f"{name}/{prefix}ppl"] = ppl
            out[f"{name}/{prefix}loss"] = ppl.log()
        exact = sorted(self._exact_domains)  # domains of plain text have no generation
        if exact:
            scores = [self.exact[d].compute() for d in exact]
            for d, score in zip(exact, scores):
                out[f"{self.domains[d]}/{prefix}exact_match"] = score
            out[f"{prefix}exact_match"] = torch.stack(scores).mean()
        sampled = sorted(self._sampled_domains)
        if sampled:
            per_domain = [self.rouge[d].compute() for d in sampled]
            for d, scores in zip(sampled, per_domain):
                out[f"{self.domains[d]}/{prefix}rougeL"] = scores["rougeL_fmeasure"]
            for key in ROUGE_KEYS:
                out[f"{prefix}{key}"] = torch.stack([s[f"{key}_fmeasure"] for s in per_domain]).mean()
        for extra in self.extras:
            out.update(extra.compute(prefix))
        return out

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
        self._exact_domains, self._sampled_domains = set(), set()


def decode_responses(tokenizer, rows: list[list[int]], eos: int | None = None) -> list[str]:
    """Generated token ids → text, cut at the first ``eos`` (default the tokenizer's ``<eos>``)."""
    eos = tokenizer.eos_token_id if eos is None else eos
    return [
        tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True).strip() for ids in rows
    ]


class SampleTable:
    """A few generations per domain from one evaluation pass: prompt, reference, teacher, student.

    ``wanted(domains)`` says which rows of a batch still belong in the table; ``flush`` logs the
    table to every W&B logger of the trainer (``<split>/samples``, a ``wandb.Table``; offline runs
    keep it under ``wandb/offline-run-*/files/media/table``) and appends it to
    ``<run folder>/samples.jsonl`` whatever the logger, so that it is readable without W&B.
    """

    columns = ("step", "split", "domain", "prompt", "reference", "teacher", "student", "student_sample")

    def __init__(self, rows_per_domain: int):
        self.rows_per_domain = rows_per_domain
        self.rows: list[dict] = []
        self._count: Counter = Counter()

    def wanted(self, domains: list[int]) -> list[int]:
        picked = []
        for i, d in enumerate(domains):
            if self._count[d] < self.rows_per_domain:
                self._count[d] += 1
                picked.append(i)
        return picked

    def add(self, **row) -> None:
        self.rows.append({c: row.get(c, "") for c in self.columns})

    def flush(self, trainer, split: str) -> None:
        rows, self.rows, self._count = self.rows, [], Counter()
        if not rows or not trainer.is_global_zero:
            return
        for row in rows:
            row["step"] = trainer.global_step
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    f"{split}/samples",
                    columns=list(self.columns),
                    data=[list(r.values()) for r in rows],
                    step=trainer.global_step,
                )
        path = Path(trainer.default_root_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
