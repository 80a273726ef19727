"""The fused head (kdlab/losses/fused.py): the dense path's values and gradients in float64, with no logits."""


from dataclasses import replace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, LlamaConfig, LlamaModel, Qwen2Config

from kdlab.data.suite import build_tokenizer
from kdlab.heads import plain_head
from kdlab.losses.base import IGNORE_INDEX, KDBatch, needs_of
from kdlab.losses.chunked import RowwiseLoss, valid_rows
from kdlab.losses.divergences import available_losses, load_loss, loss_config
from kdlab.losses.fused import fused_head_loss
from kdlab.module import DistillModule

OBJECTIVES = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]
V, V_STUDENT, V_TEACHER, H, H_TEACHER = 11, 14, 12, 6, 5  # both heads have rows past the shared vocabulary, the student more


def build(name, chunk_size=None, **overrides):
    cfg = loss_config(name)
    cfg.chunk_size = chunk_size
    for key, value in {**settings(name), **overrides}.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg)


def settings(name):
    """A temperature != 1, an added ce term and τ² scaling where the objective takes them."""
    if name == "ce":
        return {}
    if name == "rlkd":
        return {"k": 4}
    return {"temperature": 2.5, "ce_weight": 0.3, "scale_by_temperature_squared": True}


def inputs(masked_fraction=0.3, bias=True, seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    x = {
        "hidden": torch.randn(b, t, H, generator=g, dtype=torch.float64).requires_grad_(True),
        "weight": torch.randn(V_STUDENT, H, generator=g, dtype=torch.float64).requires_grad_(True),
        "bias": torch.randn(V_STUDENT, generator=g, dtype=torch.float64).requires_grad_(True) if bias else None,
        "teacher_hidden": torch.randn(b, t, H_TEACHER, generator=g, dtype=torch.float64),
        "teacher_weight": torch.randn(V_TEACHER, H_TEACHER, generator=g, dtype=torch.float64),
        "teacher_bias": torch.randn(V_TEACHER, generator=g, dtype=torch.float64),
    }
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < masked_fraction] = IGNORE_INDEX
    return x, labels


def trainable(x):
    return [x[k] for k in ("hidden", "weight", "bias") if x[k] is not None]


def dense_path(loss, x, labels):
    """The module's path: full logits of both models, truncated to V, labelled rows selected."""
    student = torch.nn.functional.linear(x["hidden"], x["weight"], x["bias"])[..., :V]
    teacher = torch.nn.functional.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])[..., :V]
    kd = KDBatch(student_logits=student, teacher_logits=teacher, labels=labels, num_tokens=(labels != IGNORE_INDEX).sum())
    return loss(valid_rows(kd))


def fused_path(loss, x, labels):
    mask = labels != IGNORE_INDEX
    return fused_head_loss(
        loss,
        x["hidden"][mask],
        x["weight"],
        labels[mask],
        mask.sum(),
        bias=x["bias"],
        teacher_hidden=x["teacher_hidden"][mask],
        teacher_weight=x["teacher_weight"],
        teacher_bias=x["teacher_bias"],
        vocab_size=V,
    )


def value_and_grads(path, loss, x, labels, scale=3.0):
    """The output and the gradients of scale × loss (scale != 1 checks that backward multiplies by grad_output)."""
    for p in trainable(x):
        p.grad = None
    out = path(loss, x, labels)
    (scale * out.loss).backward()
    return out, [p.grad.clone() for p in trainable(x)]


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_the_dense_path(name, bias):
    x, labels = inputs(bias=bias)
    dense, dense_grads = value_and_grads(dense_path, build(name), x, labels)
    assert all(g.abs().max() > 0 for g in dense_grads)  # the comparison below is not between zeros
    for chunk in (1, 4, 1000, None):  # None: one chunk of all rows
        out, grads = value_and_grads(fused_path, build(name, chunk), x, labels)
        torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)
        for grad, dense_grad in zip(grads, dense_grads, strict=True):
            torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)
        assert out.logs.keys() == dense.logs.keys()
        for key in dense.logs:
            torch.testing.assert_close(out.logs[key], dense.logs[key], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.per_token, dense.per_token.reshape(-1), rtol=1e-10, atol=1e-12)
    hidden_grad, weight_grad = grads[0], grads[1]
    assert hidden_grad[labels == IGNORE_INDEX].abs().max() == 0  # prompt / padding rows get no gradient
    assert weight_grad[V:].abs().max() == 0  # nor the head rows past the shared vocabulary


@pytest.mark.parametrize("name", OBJECTIVES)
def test_an_all_masked_batch_gives_zero_and_no_gradient(name):
    x, labels = inputs(masked_fraction=1.1)
    out, grads = value_and_grads(fused_path, build(name, 4), x, labels)
    assert out.loss.item() == 0.0 and all(g.abs().max() == 0 for g in grads)


def test_the_teacher_free_objective_needs_no_teacher_head():
    x, labels = inputs()
    mask = labels != IGNORE_INDEX
    dense, dense_grads = value_and_grads(dense_path, build("ce"), x, labels)
    out = fused_head_loss(build("ce", 2), x["hidden"][mask], x["weight"], labels[mask], mask.sum(), bias=x["bias"], vocab_size=V)
    torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)


# -- through DistillModule.training_step with real transformers models -------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def llama(tokenizer, hidden, padded_rows=0, tie=True, seed=0):
    """A float64 Llama whose embedding matrix may be padded past the tokenizer (vocab truncation)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + padded_rows,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).double()


def step_batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.roll(-1, 1)
    labels[:, :4] = IGNORE_INDEX  # the prompt
    labels[:, -1] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "domain": torch.zeros(3, dtype=torch.long)}


def step_grads(module, batch):
    module.student.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()}


@pytest.mark.parametrize("name", ["fkl", "ce", "rlkd"])
def test_training_step_with_tied_embeddings_equals_the_logits_path(tokenizer, name, monkeypatch):
    student = llama(tokenizer, 16, padded_rows=5, tie=True)
    teacher = llama(tokenizer, 24, padded_rows=2, tie=False, seed=1)
    head = student.get_output_embeddings().weight
    assert head is student.get_input_embeddings().weight  # tied: one Parameter, two uses
    batch = step_batch(tokenizer)
    dense = DistillModule(student, teacher, build(name), tokenizer, vocab_size=len(tokenizer))
    value, grads = step_grads(dense, batch)

    fused = DistillModule(student, teacher, build(name, 4, fused_head=True), tokenizer, vocab_size=len(tokenizer))

    def no_logits(*args, **kwargs):
        raise AssertionError("the fused head must not compute the model's logits")

    monkeypatch.setattr(student, "forward", no_logits)
    monkeypatch.setattr(teacher, "forward", no_logits)
    fused_value, fused_grads = step_grads(fused, batch)
    torch.testing.assert_close(fused_value, value, rtol=1e-12, atol=1e-12)
    assert fused_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-10, atol=1e-12, msg=key)
    # the tied matrix's gradient has both parts: head rows of tokens never in the batch's inputs still
    # get a gradient (through the softmax), and the padded rows past the vocabulary get none
    tied = fused_grads["model.embed_tokens.weight"]
    unseen = sorted(set(range(len(tokenizer))) - set(batch["input_ids"].flatten().tolist()))
    assert tied[unseen].abs().max() > 0 and tied[len(tokenizer) :].abs().max() == 0


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        Qwen2Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32),
        GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32),
    ],
    ids=["llama", "qwen2", "gpt2"],
)
def test_supported_families_logits_are_the_head_of_the_base_models_output(config):
    """What the fused path assumes of the families kdlab ships (Llama, Qwen2, GPT-2)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ids = torch.randint(0, 40, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    head = plain_head(model, "student")
    hidden = model.base_model(**batch).last_hidden_state
    torch.testing.assert_close(head(hidden), model(**batch).logits, rtol=1e-12, atol=1e-12)


# -- refusals ------------------------------------------------------------------------------------------
TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)


@pytest.mark.parametrize(
    "model, cause",
    [
        (lambda: AutoModelForCausalLM.from_config(Gemma2Config(**TINY, head_dim=8)), "final_logit_softcapping=30.0"),
        (lambda: AutoModelForCausalLM.from_config(CohereConfig(**TINY)), "logit_scale=0.0625"),
        (lambda: LlamaModel(LlamaConfig(**TINY)), "linear head on a base model"),
    ],
    ids=["softcapping", "logit-scale", "no-head"],
)
def test_models_whose_logits_are_not_a_plain_head_are_refused(model, cause):
    with pytest.raises(ValueError, match=cause) as error:
        plain_head(model(), "teacher")
    assert "loss.fused_head=false" in str(error.value) and "teacher" in str(error.value)


def test_a_plain_head_is_accepted():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    assert plain_head(model, "student") is model.lm_head


def test_rollout_losses_are_refused_when_the_module_is_built(tokenizer):
    loss = load_loss("onpolicy")
    loss.needs = replace(loss.needs, fused_head=True)  # e.g. a custom on-policy loss that declares it
    with pytest.raises(ValueError, match="trains on rollouts.*set loss.fused_head=false"):
        DistillModule(llama(tokenizer, 16), llama(tokenizer, 16, seed=1), loss, tokenizer)


def test_the_fused_head_and_the_teacher_cache_are_refused_together(tokenizer):
    with pytest.raises(ValueError, match="teacher_cache.k is set.*set loss.fused_head=false or teacher_cache.k=null"):
        DistillModule(llama(tokenizer, 16), llama(tokenizer, 16, seed=1), build("fkl", fused_head=True), tokenizer, teacher_signals=object())


def test_non_token_sum_settings_and_bad_values_are_refused():
    with pytest.raises(InstantiationException, match="dynamic_weighting and loss.authors_combination use batch-wide averages"):
        build("rlkd", fused_head=True, dynamic_weighting=True)
    with pytest.raises(InstantiationException, match="loss.fused_head must be true or false"):
        build("fkl", fused_head="yes")
    x, labels = inputs()
    mask = labels != IGNORE_INDEX
    with pytest.raises(ValueError, match="heads of different sizes need module.vocab_size"):
        fused_head_loss(
            build("fkl"), x["hidden"][mask], x["weight"], labels[mask], mask.sum(),
            teacher_hidden=x["teacher_hidden"][mask], teacher_weight=x["teacher_weight"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs a token-sum objective"):
        fused_head_loss(load_loss("onpolicy"), x["hidden"][mask], x["weight"], labels[mask], mask.sum(), vocab_size=V)


def test_every_rowwise_config_has_the_switch_off_and_the_rollout_losses_still_build():
    for name in available_losses():
        loss = load_loss(name)
        cfg = loss_config(name)
        assert not needs_of(loss).fused_head, name
        if isinstance(loss, RowwiseLoss):
            assert cfg.fused_head is False and loss.fused_head is False, name
        elif needs_of(loss).aligned:  # uld, gold: the shared settings, the switch off (and refused on)
            assert cfg.fused_head is False, name
        else:
            assert "fused_head" not in cfg, name


def test_the_switch_reaches_the_loss():
    assert all(build(name, fused_head=True).fused_head for name in OBJECTIVES)


def test_a_run_with_the_switch_on_trains_through_the_fused_path(tiny_cfg, monkeypatch):
    import kdlab.steps
    from kdlab.train import run

    calls = []
    original = kdlab.steps.fused_head_loss
    monkeypatch.setattr(kdlab.steps, "fused_head_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = tiny_cfg("loss=jsd", "loss.fused_head=true", "loss.temperature=2.0", "trainer.max_steps=2", "trainer.val_check_interval=2")
    metrics = run(cfg)
    assert len(calls) == 2 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
