"""Only labelled positions reach the output heads (kdlab/heads.py): the training step's values and
gradients equal those of the models' own full logits with the rows selected after, in float64."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from kdlab.data.suite import build_tokenizer
from kdlab.heads import head_problem, labelled_logits
from kdlab.losses.base import IGNORE_INDEX, KDBatch
from kdlab.losses.chunked import valid_rows
from kdlab.losses.sparse import sparse_teacher
from kdlab.module import DistillModule
from kdlab.teacher_cache import InMemorySignals
from tests.test_fused import build, llama, step_batch, step_grads


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def reference_step(module, batch, teacher_signals=None):
    """The step as it was before rows were selected ahead of the heads: every position's logits from
    the models' own forwards, then the labelled rows (valid_rows), then the objective."""
    module.student.zero_grad(set_to_none=True)
    v = module.vocab_size
    student = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :v]
    with torch.no_grad():
        teacher = module.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :v]
    kd = KDBatch(student_logits=student, teacher_logits=None if teacher_signals else teacher, labels=batch["labels"],
                 num_tokens=(batch["labels"] != IGNORE_INDEX).sum().double(), teacher_sparse=teacher_signals)
    loss = module.loss(valid_rows(kd)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()}


def no_full_forward(*args, **kwargs):
    raise AssertionError("a model with a plain head must not compute every position's logits")


@pytest.mark.parametrize("name", ["ce", "fkl", "jsd", "tvd", "rlkd"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_the_training_step_equals_the_full_logits_path(tokenizer, name, chunk_size, monkeypatch):
    student = llama(tokenizer, 16, padded_rows=5, tie=True)  # tied head, rows past the tokenizer
    teacher = llama(tokenizer, 24, padded_rows=2, tie=False, seed=1)
    module = DistillModule(student, teacher, build(name, chunk_size), tokenizer, vocab_size=len(tokenizer))
    batch = step_batch(tokenizer)
    value, grads = reference_step(module, batch)

    monkeypatch.setattr(student, "forward", no_full_forward)
    monkeypatch.setattr(teacher, "forward", no_full_forward)
    got, got_grads = step_grads(module, {**batch, "index": torch.arange(batch["labels"].shape[0])})
    torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-10, atol=1e-12, msg=key)


def test_the_teacher_cache_rows_are_selected_like_the_logits(tokenizer):
    student, teacher = llama(tokenizer, 16, padded_rows=3), llama(tokenizer, 24, seed=1)
    batch = step_batch(tokenizer, seed=2)
    with torch.no_grad():
        signals = sparse_teacher(DistillModule(student, teacher, None, tokenizer, vocab_size=len(tokenizer)).teacher_logits(batch), 8)
    module = DistillModule(
        student, teacher, build("fkl", temperature=1.0), tokenizer, vocab_size=len(tokenizer), teacher_signals=InMemorySignals(signals)
    )
    value, grads = reference_step(module, batch, teacher_signals=signals)
    got, got_grads = step_grads(module, {**batch, "index": torch.arange(batch["labels"].shape[0])})
    torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-10, atol=1e-12, msg=key)


def test_the_head_sees_only_the_labelled_rows(tokenizer, monkeypatch):
    model = llama(tokenizer, 16)
    batch = step_batch(tokenizer)
    mask = batch["labels"] != IGNORE_INDEX
    rows = []
    original = model.base_model.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        rows.append(out.last_hidden_state.shape[:2])
        return out

    monkeypatch.setattr(model.base_model, "forward", spy)
    monkeypatch.setattr(model, "forward", no_full_forward)
    logits = labelled_logits(model, batch, mask, len(tokenizer))
    assert logits.shape == (1, int(mask.sum()), len(tokenizer)) and int(mask.sum()) < mask.numel() / 2
    assert rows == [batch["input_ids"].shape]  # one base forward; the head then ran on the selected rows
    # the model's own forward with the rows selected after (as under FSDP) gives the same logits
    monkeypatch.undo()
    full = labelled_logits(model, batch, mask, len(tokenizer), through_head=False)
    torch.testing.assert_close(logits, full, rtol=1e-12, atol=1e-12)


def test_a_model_that_transforms_its_logits_gets_its_own_forward(tokenizer):
    """Gemma 2 soft-caps its logits: the plain head would give other values, so its forward runs."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=32, head_dim=8, final_logit_softcapping=2.0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    assert "final_logit_softcapping" in head_problem(model)
    batch = step_batch(tokenizer)
    mask = batch["labels"] != IGNORE_INDEX
    got = labelled_logits(model, batch, mask, len(tokenizer))
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask].unsqueeze(0)
    plain = model.get_output_embeddings()(model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[mask]).unsqueeze(0)
    torch.testing.assert_close(got, own, rtol=1e-12, atol=1e-12)
    assert (plain - own).abs().max() > 1e-3  # the cap is active: taking the plain head would be wrong


def test_an_all_masked_batch_gives_zero_and_no_nan(tokenizer):
    module = DistillModule(llama(tokenizer, 16), llama(tokenizer, 24, seed=1), build("jsd", 4), tokenizer, vocab_size=len(tokenizer))
    batch = step_batch(tokenizer)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(p.grad).all() for p in module.student.parameters() if p.grad is not None)
