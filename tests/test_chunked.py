"""Chunked objectives and valid-row selection: the dense path's values and gradients, in float64."""


import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdlab.losses.base import IGNORE_INDEX, KDBatch
from kdlab.losses.chunked import valid_rows
from kdlab.losses.divergences import loss_config

OBJECTIVES = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]


def build(name, chunk_size, **overrides):
    cfg = loss_config(name)
    cfg.chunk_size = chunk_size
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg)


def batch(masked_fraction=0.3, seed=0, b=3, t=7, v=50):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < masked_fraction] = IGNORE_INDEX
    return student, teacher, labels


def value_and_grad(loss, student, teacher, labels, select=False):
    student.grad = None
    kd = KDBatch(student_logits=student, teacher_logits=teacher, labels=labels, num_tokens=(labels != IGNORE_INDEX).sum())
    out = loss(valid_rows(kd) if select else kd)
    out.loss.backward()
    return out, student.grad.clone()


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_and_selected_rows_equal_the_dense_path(name, temperature):
    overrides = {"temperature": temperature} if name not in ("ce", "rlkd") else {}
    if name == "rlkd":
        overrides = {"k": 4}
    student, teacher, labels = batch()
    dense, dense_grad = value_and_grad(build(name, None, **overrides), student, teacher, labels)
    for chunk in (1, 4, 5, 1000):
        for select in (False, True):
            out, grad = value_and_grad(build(name, chunk, **overrides), student, teacher, labels, select)
            torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)
            assert out.logs.keys() == dense.logs.keys()
            for key in dense.logs:
                torch.testing.assert_close(out.logs[key], dense.logs[key], rtol=1e-10, atol=1e-12)
    assert dense_grad[labels == IGNORE_INDEX].abs().max() == 0  # masked rows get no gradient


@pytest.mark.parametrize("name", OBJECTIVES)
def test_an_all_masked_batch_gives_zero_and_no_gradient(name):
    student, teacher, labels = batch(masked_fraction=1.1)
    for chunk in (None, 4):
        out, grad = value_and_grad(build(name, chunk, **({"k": 4} if name == "rlkd" else {})), student, teacher, labels)
        assert out.loss.item() == 0.0 and grad.abs().max() == 0


def test_auto_chunks_by_logits_and_leaves_small_vocabularies_dense(monkeypatch):
    import kdlab.losses.chunked as chunked

    loss = build("jsd", "auto")
    assert loss.rows_per_chunk(151_936) == 55 and loss.rows_per_chunk(45) == 2**23 // 45
    student, teacher, labels = batch()
    dense, dense_grad = value_and_grad(build("jsd", None), student, teacher, labels)
    applied = []
    original = chunked._Chunked.apply
    monkeypatch.setattr(chunked._Chunked, "apply", lambda *a: applied.append(a[5]) or original(*a))
    value_and_grad(loss, student, teacher, labels)
    assert applied == []  # 21 rows of 50 logits fit in one chunk: dense
    monkeypatch.setattr(chunked, "AUTO_CHUNK_ELEMENTS", 200)  # 4 rows of 50 logits per chunk
    out, grad = value_and_grad(loss, student, teacher, labels)
    assert applied == [4]
    torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_non_token_sum_settings_run_densely():
    loss = build("rlkd", 2, k=4, dynamic_weighting=True)
    assert not loss.chunkable
    student, teacher, labels = batch()
    dense, grad = value_and_grad(build("rlkd", None, k=4, dynamic_weighting=True), student, teacher, labels)
    out, grad2 = value_and_grad(loss, student, teacher, labels)
    torch.testing.assert_close(out.loss, dense.loss)
    with pytest.raises(InstantiationException, match="loss.chunk_size must be auto, rows per chunk"):
        build("fkl", -1)
