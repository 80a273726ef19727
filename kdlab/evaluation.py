"""One evaluation pass of a DistillModule: generations, per-domain metrics and the samples table.

Validation, test and ``python -m kdlab.evaluate`` all go through :class:`Evaluation`, so a
metric is computed one way everywhere. Per pass and per model (the student, and the frozen
teacher as a reference) it measures teacher-forced perplexity and ECE on the target tokens,
greedy exact match where the DataModule has a checker, ROUGE of sampled responses (MiniLLM's
protocol: ``EvalSettings.num_samples`` samples per prompt at temperature 1), the DataModule's
extra metrics, and the teacher–student agreement; it fills the samples table (W&B and
``samples.jsonl``). Records without a prompt (plain text) are scored by perplexity only.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from kdlab.agreement import AgreementMetrics
from kdlab.losses.base import IGNORE_INDEX
from kdlab.metrics import EvalSettings, ModelEval, SampleTable, decode_responses
from kdlab.rollout import sample

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, batch: dict, tokenizer, max_new_tokens: int, eos_token_id: int) -> list[str]:
    """Greedy continuations of the batch's left-padded prompts, decoded up to ``eos_token_id``."""
    out = model.generate(
        input_ids=batch["prompt_ids"],
        attention_mask=batch["prompt_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_id,
    )
    return decode_responses(tokenizer, out[:, batch["prompt_ids"].shape[1] :].tolist(), eos_token_id)


def _rows(batch: dict, picked: Tensor | list[int]) -> dict:
    picked = torch.as_tensor(picked, device=batch["input_ids"].device)
    return {k: v[picked] for k, v in batch.items() if isinstance(v, Tensor)}


class Evaluation(torch.nn.Module):
    """The evaluation state of one DistillModule: a :class:`ModelEval` per model (built once the
    data's domains are known), the agreement metrics, the samples table, the frozen teacher's
    greedy outputs (generated once per example) and its validation perplexities (measured once,
    ``teacher_val_ppl``, which DDK reads)."""

    def __init__(self, settings: EvalSettings | None, tokenizer, vocab_size: int | None, teacher_comparable: bool = True):
        super().__init__()
        # across tokenizers the teacher reads other tokens: its perplexity, agreement and greedy outputs
        # on the student's sequences are meaningless, so they are left out (said once, in the log)
        self.teacher_comparable, self._said = teacher_comparable, False
        self.settings = settings or EvalSettings()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.agreement = AgreementMetrics()  # RLKD's top-k agreement, logged for every objective
        self.models: torch.nn.ModuleDict | None = None
        self.table = SampleTable(self.settings.table_rows)
        self.teacher_outputs: dict[tuple[str, int], str] = {}
        self.teacher_val_ppl: dict[str, float] | None = None

    def teacher_of(self, module):
        """The teacher as a reference on the student's tokens, or None across tokenizers."""
        if self.teacher_comparable:
            return module.teacher
        if not self._said:
            self._said = True
            log.info("the teacher has another tokenizer: teacher perplexity, agreement and outputs are left out of evaluation "
                     "(per-token measures over different tokens are not comparable)")
        return None

    def _model_evals(self, module) -> torch.nn.ModuleDict:
        if self.models is None:
            dm = module.trainer.datamodule
            evals = {}
            for role, model in (("student", module.student), ("teacher", self.teacher_of(module))):
                if model is not None:
                    num_classes = self.vocab_size or model.get_output_embeddings().weight.shape[0]
                    extras = dm.extra_metrics(self.tokenizer, dm.domains) if dm.extra_metrics else []
                    evals[role] = ModelEval(dm.domains, num_classes, self.settings, extras)
            self.models = torch.nn.ModuleDict(evals).to(module.device)
        return self.models

    # -- one batch ----------------------------------------------------------------------------
    def step(self, module, batch: dict, batch_idx: int, split: str, with_exact: bool) -> None:
        dm = module.trainer.datamodule
        with_teacher = split == "test" or self.teacher_val_ppl is None
        with_exact = with_exact and dm.checker is not None
        num_samples = self.settings.num_samples if split == "test" else self.settings.val_num_samples
        teacher = self.teacher_of(module)
        student_logits = module.logits(module.student, batch)
        teacher_logits = module.teacher_logits(batch) if teacher is not None else None
        if teacher_logits is not None:
            self.agreement.update(student_logits, teacher_logits, batch["labels"] != IGNORE_INDEX)
        prompted = batch["generate"].nonzero().flatten().tolist()  # plain text has nothing to generate from
        gen_batch = _rows(batch, prompted) if prompted and len(prompted) < len(batch["generate"]) else batch
        records = [dm.records[split][i] for i in gen_batch["index"].tolist()] if prompted else []
        domains = gen_batch["domain"].tolist() if prompted else []
        texts = {}  # role -> (greedy outputs or None, sampled responses or None)
        evals = self._model_evals(module)
        for role, model, logits in (("student", module.student, student_logits), ("teacher", teacher, teacher_logits)):
            if model is None or (role == "teacher" and not with_teacher):
                continue
            evals[role].update_logits(logits, batch)
            if not prompted:
                continue
            greedy = self._greedy(model, gen_batch, dm) if with_exact else None
            if greedy is not None:
                indices = gen_batch["index"].tolist()
                evals[role].update_exact(domains, [dm.check(split, i, out) for i, out in zip(indices, greedy)])
                if role == "teacher":
                    self.teacher_outputs.update({(split, i): out for i, out in zip(indices, greedy)})
            samples = self._samples(model, gen_batch, dm, num_samples, batch_idx) if num_samples else None
            if samples is not None:
                evals[role].update_samples(domains, [r.prompt for r in records], [r.answer for r in records], samples)
            texts[role] = (greedy, samples)
        if prompted:
            self._add_table_rows(module, gen_batch, split, records, texts)

    def _greedy(self, model, batch: dict, dm) -> list[str]:
        return generate(model, batch, self.tokenizer, dm.max_new_tokens, dm.eos_token_id)

    @torch.no_grad()
    def _samples(self, model, batch: dict, dm, num_samples: int, batch_idx: int) -> list[list[str]]:
        """``num_samples`` sampled responses per prompt of the batch (MiniLLM's evaluation protocol).

        Drawn with kdlab.rollout's sampler from a generator seeded by (eval seed, batch index), so
        a pass is reproducible and independent of the training RNG; every model gets the same seed
        (common random numbers make the student–teacher comparison less noisy).
        """
        settings = self.settings
        device = batch["prompt_ids"].device
        generator = torch.Generator(device).manual_seed(settings.seed * 1_000_003 + batch_idx)
        rollout = sample(
            model,
            None,
            batch["prompt_ids"].repeat_interleave(num_samples, 0),
            batch["prompt_mask"].repeat_interleave(num_samples, 0),
            eos_token_id=dm.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_new_tokens=dm.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            vocab_size=self.vocab_size,
            generator=generator,
        )
        rows = [row[row != IGNORE_INDEX].tolist() for row in rollout.labels]
        texts = decode_responses(self.tokenizer, rows, dm.eos_token_id)
        return [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]

    def _add_table_rows(self, module, batch: dict, split: str, records: list, texts: dict) -> None:
        """The batch's rows that belong in this pass's samples table (the first few of each domain)."""
        rows = self.table.wanted(batch["domain"].tolist())
        if not rows:
            return
        dm = module.trainer.datamodule
        indices = batch["index"].tolist()
        greedy, samples = texts["student"]
        student = [greedy[r] for r in rows] if greedy is not None else self._greedy(module.student, _rows(batch, rows), dm)
        teacher, reference = [""] * len(rows), self.teacher_of(module)
        if reference is not None:  # the frozen teacher's outputs never change: generated once per example
            missing = [r for r in rows if (split, indices[r]) not in self.teacher_outputs]
            if missing:
                outputs = self._greedy(reference, _rows(batch, missing), dm)
                self.teacher_outputs.update({(split, indices[r]): out for r, out in zip(missing, outputs)})
            teacher = [self.teacher_outputs[(split, indices[r])] for r in rows]
        for j, r in enumerate(rows):
            self.table.add(
                split=split,
                domain=records[r].domain,
                prompt=records[r].prompt,
                reference=records[r].answer,
                teacher=teacher[j],
                student=student[j],
                student_sample=samples[r][0] if samples is not None else "",
            )

    # -- the end of a pass --------------------------------------------------------------------
    def epoch_end(self, module, split: str) -> dict[str, Tensor]:
        """Compute, log (``<split>/...``) and reset this pass's metrics; flush the samples table."""
        trainer = module.trainer
        with_teacher = split == "test" or self.teacher_val_ppl is None
        evals = self._model_evals(module)
        metrics = evals["student"].compute("")
        if with_teacher and "teacher" in evals:
            metrics.update(evals["teacher"].compute("teacher_"))
        for model_eval in evals.values():
            model_eval.reset()
        metrics["loss"] = metrics["ppl"].log()
        has_teacher = self.teacher_of(module) is not None
        if has_teacher:
            metrics.update(self.agreement.compute())
            self.agreement.reset()
        if split == "val" and has_teacher:
            domains = trainer.datamodule.domains
            if with_teacher and not trainer.sanity_checking:
                self.teacher_val_ppl = {d: float(metrics[f"{d}/teacher_ppl"]) for d in domains}
            elif self.teacher_val_ppl is not None:
                # the cached teacher values, logged beside every validation for side-by-side curves
                metrics.update({f"{d}/teacher_ppl": torch.tensor(v) for d, v in self.teacher_val_ppl.items()})
        # how far the student is from the teacher per domain (1 = the teacher's perplexity; DDK's score)
        ratios = {d: metrics[f"{d}/ppl"] / metrics[f"{d}/teacher_ppl"] for d in trainer.datamodule.domains
                  if f"{d}/ppl" in metrics and f"{d}/teacher_ppl" in metrics}
        if ratios:
            metrics.update({f"{d}/ppl_ratio": r for d, r in ratios.items()})
            metrics["ppl_ratio"] = torch.stack(list(ratios.values())).float().mean()
        module.log_dict({f"{split}/{k}": v for k, v in metrics.items()})
        if trainer.sanity_checking:
            self.table = SampleTable(self.settings.table_rows)  # not a real validation: dropped
        else:
            self.table.flush(trainer, split)
        return metrics
