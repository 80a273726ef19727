"""Evaluation metrics (kdlab/metrics.py, the suite's in kdlab/data/suite_eval.py) on hand-made cases with hand-computed values."""

import math

import pytest
import torch

from kdlab.data.suite import build_tokenizer
from kdlab.data.suite_eval import GrammarTrueKL, GrammarValidity, grammar_metrics
from kdlab.losses.base import IGNORE_INDEX
from kdlab.metrics import EvalSettings, ModelEval, NextTokenCalibrationError, SampleTable


def _positions(probs: list[list[float]], labels: list[int]):
    """Logits (1, N, V) whose softmax is ``probs``, labels (1, N)."""
    return torch.tensor(probs).log()[None], torch.tensor(labels)[None]


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # confidence 0.8 right 8 times out of 10, confidence 0.6 right 3 times out of 5
    probs = [[0.8, 0.1, 0.1]] * 10 + [[0.6, 0.3, 0.1]] * 5
    labels = [0] * 8 + [1] * 2 + [0] * 3 + [2] * 2
    logits, labels = _positions(probs, labels)
    ece = NextTokenCalibrationError(num_classes=3)
    ece.update(logits, labels)
    assert ece.compute().item() == pytest.approx(0.0, abs=1e-6)


def test_ece_of_a_miscalibrated_predictor_and_masked_positions():
    # 5 positions at confidence 0.9, 2 right: abs(0.4 - 0.9) = 0.5 with weight 5/10;
    # 5 positions at confidence 0.6, 3 right: calibrated, 0. ECE = 0.5 * 0.5 = 0.25.
    probs = [[0.9, 0.05, 0.05]] * 5 + [[0.05, 0.6, 0.35]] * 5 + [[0.9, 0.05, 0.05]] * 3
    labels = [0, 0, 1, 2, 1] + [1, 1, 1, 0, 2] + [IGNORE_INDEX] * 3  # masked positions never count
    logits, labels = _positions(probs, labels)
    ece = NextTokenCalibrationError(num_classes=3, n_bins=15)
    ece.update(logits[:, :7], labels[:, :7])  # two updates accumulate
    ece.update(logits[:, 7:], labels[:, 7:])
    assert ece.compute().item() == pytest.approx(0.25, abs=1e-6)


# "say the = big cat sees a dog ." : the true next-word distribution at each answer position,
# written out by hand from the grammar's definition (kdlab/data/suite.py).
_ADJ_OR_NOUN = {"big": 0.1, "small": 0.1, "red": 0.1, "young": 0.1, "cat": 0.18, "dog": 0.18, "bird": 0.12, "fox": 0.12}
TRUE = [
    _ADJ_OR_NOUN,  # after "the": adjective (0.4 x 0.25) or noun (0.6 x p_noun)
    {"cat": 0.3, "dog": 0.3, "bird": 0.2, "fox": 0.2},  # after "the big"
    {"sees": 0.4, "chases": 0.3, "likes": 0.3},  # after the subject
    {"the": 0.6, "a": 0.4},  # after the verb
    _ADJ_OR_NOUN,  # after "a"
    {".": 0.6, "and": 0.4},  # after the object
    {"<eos>": 1.0},  # after "."
]


def _grammar_batch(tok):
    ids = [
        tok.bos_token_id,
        *tok("say the = big cat sees a dog .", add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
    ]
    labels = [IGNORE_INDEX] * len(ids)
    start = 3  # the position of "=", which predicts the first answer word
    for t in range(start, len(ids) - 1):
        labels[t] = ids[t + 1]
    return torch.tensor([ids]), torch.tensor([labels]), start


def test_true_kl_against_hand_computation():
    tok = build_tokenizer()
    V = len(tok)
    input_ids, labels, start = _grammar_batch(tok)
    assert (labels != IGNORE_INDEX).sum() == len(TRUE)

    # A uniform student: KL(p || uniform) = log V - H(p) at each position.
    metric = GrammarTrueKL(tok)
    metric.update(torch.zeros(1, input_ids.shape[1], V), input_ids, labels)
    entropies = [-sum(p * math.log(p) for p in dist.values()) for dist in TRUE]
    assert metric.compute().item() == pytest.approx(sum(math.log(V) - h for h in entropies) / len(TRUE), rel=1e-5)

    # The truth itself gets 0; halving one position's mass onto a forbidden token adds log 2 there.
    logits = torch.full((1, input_ids.shape[1], V), -1e9)
    for j, dist in enumerate(TRUE):
        for word, p in dist.items():
            logits[0, start + j, tok.convert_tokens_to_ids(word)] = math.log(p)
    metric = GrammarTrueKL(tok)
    metric.update(logits, input_ids, labels)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)
    # position "after the verb": q = 0.5 * p_true + 0.5 on "cat" (forbidden): KL = sum p log(p / (p/2)) = log 2
    logits[0, start + 3] = torch.full((V,), -1e9)
    logits[0, start + 3, tok.convert_tokens_to_ids("the")] = math.log(0.3)
    logits[0, start + 3, tok.convert_tokens_to_ids("a")] = math.log(0.2)
    logits[0, start + 3, tok.convert_tokens_to_ids("cat")] = math.log(0.5)
    metric = GrammarTrueKL(tok)
    metric.update(logits, input_ids, labels)
    assert metric.compute().item() == pytest.approx(math.log(2) / len(TRUE), rel=1e-5)


def test_grammar_validity_accepts_and_rejects_the_right_strings():
    cases = [
        ("say the big =", "cat sees a dog .", True),
        ("say a =", "fox likes the red bird and chases a cat .", True),
        ("say the =", "dog .", False),  # no verb phrase
        ("say the big =", "cat sees a dog", False),  # stops before the full stop
        ("say the big =", "cat sees a dog . the", False),  # runs on after the sentence
        ("say the big =", "cat sees dog .", False),  # a noun phrase without determiner
        ("say the =", "big big cat sees a dog .", False),  # two adjectives
        ("say a =", "cat sees a dog and likes a cat and likes a fox .", False),  # at most one "and"
        ("say the big =", "", False),
    ]
    metric = GrammarValidity()
    metric.update([c[0] for c in cases], [c[1] for c in cases])
    assert metric.compute().item() == pytest.approx(2 / len(cases))
    for prompt, output, valid in cases:
        one = GrammarValidity()
        one.update([prompt], [output])
        assert one.compute().item() == float(valid), (prompt, output)


def test_model_eval_rouge_averages_samples_then_domains_and_names_metrics():
    tok = build_tokenizer()
    ev = ModelEval(["copy", "grammar"], len(tok), EvalSettings(), grammar_metrics(tok, ["copy", "grammar"]))
    # copy: reference "a b c d"; samples "a b c d" (F1 1) and "a b" (P 1, R 1/2, F1 2/3) -> 5/6
    # grammar: one sample, identical to the reference -> 1; it is a valid sentence, the other is not
    ev.update_samples(
        domains=[0, 1, 1],
        prompts=["copy a b c d =", "say the big =", "say a ="],
        references=["a b c d", "cat sees a dog .", "fox likes the cat ."],
        samples=[["a b c d", "a b"], ["cat sees a dog ."], ["fox likes the"]],
    )
    input_ids, labels, _ = _grammar_batch(tok)
    ev.update_logits(
        torch.zeros(1, input_ids.shape[1], len(tok)),
        {"input_ids": input_ids, "labels": labels, "domain": torch.tensor([1])},
    )
    out = ev.compute("teacher_")
    assert out["copy/teacher_rougeL"].item() == pytest.approx(5 / 6)
    # "fox likes the" vs "fox likes the cat": the normaliser drops ".", so P 1, R 3/4, F1 6/7
    assert out["grammar/teacher_rougeL"].item() == pytest.approx((1 + 6 / 7) / 2)
    assert out["teacher_rougeL"].item() == pytest.approx((5 / 6 + (1 + 6 / 7) / 2) / 2)
    assert out["grammar/teacher_valid_fraction"].item() == pytest.approx(0.5)
    assert {"teacher_ppl", "teacher_ece", "grammar/teacher_true_kl", "teacher_rouge1", "teacher_rouge2"} <= set(out)
    ev.reset()
    out = ev.compute("")
    assert "rougeL" not in out and "grammar/valid_fraction" not in out  # nothing sampled since the reset


def test_sample_table_takes_the_first_rows_of_each_domain():
    table = SampleTable(rows_per_domain=2)
    assert table.wanted([0, 1, 0, 0, 1, 2]) == [0, 1, 2, 4, 5]
    assert table.wanted([0, 1, 2, 2]) == [2]  # domain 2 had one row; 0 and 1 are full


def test_eval_settings_reject_bad_values():
    for bad in ({"num_samples": -1}, {"temperature": 0.0}, {"top_p": 0.0}, {"ece_bins": 0}):
        with pytest.raises(ValueError, match="eval"):
            EvalSettings(**bad)
