"""The teacher signal cache (teacher_cache.k) and the sparse teacher view it feeds the objectives.

The view's maths (kdlab/losses/sparse.py) is checked against brute force on tiny vocabularies and,
at k = V, against the dense objectives in float64; the cache (kdlab/teacher_cache.py) against a
direct teacher forward on the same records, across runs, keys, corruption and refusals.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdlab import teacher_cache
from kdlab.build import build_model
from kdlab.cache import MANIFEST
from kdlab.data.datamodule import split_batch
from kdlab.losses.base import IGNORE_INDEX, KDBatch, Needs
from kdlab.losses.chunked import valid_rows
from kdlab.losses.divergences import loss_config
from kdlab.losses.sparse import SparseTeacher, coarsen, sparse_teacher, teacher_values_at
from kdlab.module import DistillModule
from kdlab.train import run
from tests.conftest import compose_tiny

# every token-level objective, with the settings that change what it computes
OBJECTIVES = {
    "fkl": ("fkl", {}),
    "rkl": ("rkl", {}),
    "jsd": ("jsd", {}),
    "jsd-0.9": ("jsd", {"divergence.beta": 0.9}),
    "skl": ("skl", {}),
    "srkl": ("srkl", {}),
    "tvd": ("tvd", {}),
    "fkl+ce": ("fkl", {"ce_weight": 0.5}),
    "rlkd": ("rlkd", {"k": 4}),
    "rlkd-alone": ("rlkd", {"base": "none", "k": 4}),
    "rlkd-authors": ("rlkd", {"k": 4, "rank_logits": True, "dedupe_union": False}),
    "rlkd-dynamic": ("rlkd", {"k": 4, "dynamic_weighting": True}),
}
TEMPERED = [name for name in OBJECTIVES if not name.startswith("rlkd")]


def build_loss(name, chunk_size=None, **overrides):
    file, settings = OBJECTIVES[name]
    cfg = loss_config(file)
    cfg.chunk_size = chunk_size
    for key, value in {**settings, **overrides}.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg)


def logits(seed=0, b=3, t=7, v=50, masked_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < masked_fraction] = IGNORE_INDEX
    return student, teacher, labels


def value_and_grad(loss, student, labels, teacher=None, sparse=None, select=False):
    student.grad = None
    kd = KDBatch(student, teacher, labels, num_tokens=(labels != IGNORE_INDEX).sum(), teacher_sparse=sparse)
    out = loss(valid_rows(kd) if select else kd)
    out.loss.backward()
    return out, student.grad.clone()


# -- the sparse view and the coarsened partition --------------------------------------------------
def test_the_sparse_view_holds_the_top_k_the_normaliser_and_the_tail_mass():
    _, teacher, _ = logits()
    for temperature in (1.0, 2.5):
        view = sparse_teacher(teacher, 6, temperature)
        p = torch.softmax(teacher / temperature, -1)
        order = p.argsort(-1, descending=True)
        assert torch.equal(view.indices, order[..., :6])
        torch.testing.assert_close(view.values, teacher.gather(-1, order[..., :6]))
        torch.testing.assert_close(view.log_probs().exp(), p.gather(-1, order[..., :6]), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(view.log_tail.exp(), p.gather(-1, order[..., 6:]).sum(-1), rtol=1e-12, atol=1e-15)
    assert torch.isinf(sparse_teacher(teacher, teacher.shape[-1]).log_tail).all()
    with pytest.raises(ValueError, match="1 <= k <= V"):
        sparse_teacher(teacher, 51)


@pytest.mark.parametrize("name, temperature", [(n, 1.0) for n in OBJECTIVES] + [(n, 2.5) for n in TEMPERED])  # RLKD ranks at τ = 1
def test_with_k_equal_to_v_every_objective_equals_the_dense_one(name, temperature):
    settings = {"temperature": temperature} if name in TEMPERED else {}
    student, teacher, labels = logits()
    dense, dense_grad = value_and_grad(build_loss(name, **settings), student, labels, teacher=teacher)
    full = sparse_teacher(teacher, teacher.shape[-1], temperature)
    for chunk in (None, 4):
        for select in (False, True):
            out, grad = value_and_grad(build_loss(name, chunk, **settings), student, labels, sparse=full, select=select)
            torch.testing.assert_close(out.loss, dense.loss, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-10)
            assert out.logs.keys() == dense.logs.keys()
            for key in dense.logs:
                torch.testing.assert_close(out.logs[key], dense.logs[key], rtol=1e-10, atol=1e-10)


def _coarse(dist, ids):
    """Brute force: a distribution (list of floats) on the k ids, then everything else."""
    return [dist[i] for i in ids] + [sum(x for i, x in enumerate(dist) if i not in ids)]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


BRUTE = {
    "fkl": lambda p, q: _kl(p, q),
    "rkl": lambda p, q: _kl(q, p),
    "jsd": lambda p, q: 0.5 * _kl(p, _mix(p, q, 0.5)) + 0.5 * _kl(q, _mix(p, q, 0.5)),
    "jsd-0.9": lambda p, q: 0.9 * _kl(p, _mix(p, q, 0.9)) + 0.1 * _kl(q, _mix(p, q, 0.9)),
    "skl": lambda p, q: _kl(p, _mix(p, q, 0.1)),
    "srkl": lambda p, q: _kl(q, _mix(q, p, 0.1)),
    "tvd": lambda p, q: 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
}


@pytest.mark.parametrize("name", BRUTE)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_coarsened_divergences_equal_brute_force_on_a_tiny_vocabulary(name, temperature):
    v, k = 6, 2
    student, teacher, _ = logits(seed=3, b=1, t=5, v=v)
    labels = torch.zeros(1, 5, dtype=torch.long)
    view = sparse_teacher(teacher, k, temperature)
    out = build_loss(name, temperature=temperature)(KDBatch(student, None, labels, teacher_sparse=view))
    for t in range(5):
        p = torch.softmax(teacher[0, t] / temperature, -1).tolist()
        q = torch.softmax(student[0, t].detach() / temperature, -1).tolist()
        ids = sorted(range(v), key=lambda i: -p[i])[:k]
        assert out.per_token[0, t].item() == pytest.approx(BRUTE[name](_coarse(p, ids), _coarse(q, ids)), rel=1e-12, abs=1e-14)
    # the gradient is that of the value (autograd against finite differences of the coarsened objective)
    loss = build_loss(name, temperature=temperature)
    assert torch.autograd.gradcheck(lambda s: loss(KDBatch(s, None, labels, teacher_sparse=view)).loss, (student,))


@pytest.mark.parametrize("name", BRUTE)
def test_the_coarsened_value_is_a_lower_bound_that_grows_with_k(name):
    """Data processing: each §1 divergence is an f-divergence, and the top-k partitions are nested."""
    student, teacher, labels = logits(seed=1, v=12, masked_fraction=0)
    loss = build_loss(name)
    values = [loss(KDBatch(student, None, labels, teacher_sparse=sparse_teacher(teacher, k))).per_token for k in range(1, 13)]
    dense = loss(KDBatch(student, teacher, labels)).per_token
    for smaller, larger in zip(values, values[1:]):
        assert (smaller <= larger + 1e-12).all()
    torch.testing.assert_close(values[-1], dense, rtol=1e-10, atol=1e-12)
    assert (values[0] < dense - 1e-6).any()  # a real approximation below k = V


def test_rlkd_gives_uncached_ids_the_tail_mass_spread_evenly():
    v, k = 8, 3
    _, teacher, _ = logits(seed=2, b=1, t=4, v=v)
    view = sparse_teacher(teacher, k)
    p = torch.softmax(teacher, -1)
    ids = torch.arange(v).expand(1, 4, v)
    tail = 1 - p.gather(-1, view.indices).sum(-1, keepdim=True)
    cached = (ids.unsqueeze(-1) == view.indices.unsqueeze(-2)).any(-1)
    expected = torch.where(cached, p, tail / (v - k))
    torch.testing.assert_close(teacher_values_at(view, ids, v, rank_logits=False), expected, rtol=1e-12, atol=1e-15)
    log_z = torch.logsumexp(teacher, -1, keepdim=True)
    expected_logits = torch.where(cached, teacher, (tail / (v - k)).log() + log_z)
    torch.testing.assert_close(teacher_values_at(view, ids, v, rank_logits=True), expected_logits, rtol=1e-12, atol=1e-12)
    # never above the k-th cached probability: uncached ids rank below every cached one
    assert ((tail / (v - k)).squeeze(-1) <= view.log_probs()[..., -1].exp() + 1e-15).all()
    with pytest.raises(ValueError, match="teacher_cache.k >= 5"):
        build_loss("rlkd", k=5)(KDBatch(teacher.clone().requires_grad_(True), None, torch.zeros(1, 4, dtype=torch.long), teacher_sparse=view))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_the_chunked_path_takes_the_sparse_view(name):
    student, teacher, labels = logits(seed=4)
    view = sparse_teacher(teacher, 8)
    dense, dense_grad = value_and_grad(build_loss(name), student, labels, sparse=view)
    for chunk in (1, 4, 1000):
        out, grad = value_and_grad(build_loss(name, chunk), student, labels, sparse=view, select=True)
        torch.testing.assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_a_view_at_another_temperature_is_refused():
    student, teacher, labels = logits()
    with pytest.raises(ValueError, match="computed at temperature 1.0, the objective uses 2.0"):
        coarsen(student, sparse_teacher(teacher, 4), 2.0)


# -- the cache --------------------------------------------------------------------------------------
@pytest.fixture
def tiny_parts(tiny_cfg):
    """Tokenizer, data and the (session-cached) tiny teacher of the tiny config."""
    cfg = tiny_cfg()
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    return cfg, tok, dm, build_model(cfg, "teacher", tok, dm)


def prepare(k, tok, dm, teacher, cache, loss="fkl", **kwargs):
    return teacher_cache.prepare(k, build_loss(loss), teacher, tok, dm, len(tok), cache, **kwargs)


def direct_view(teacher, batch, k, temperature=1.0):
    with torch.no_grad():
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sparse_teacher(z[batch["labels"] != IGNORE_INDEX], k, temperature)


def assert_view_matches(cached: SparseTeacher, direct: SparseTeacher):
    """The cache stores each row's logits shifted by its largest, in float16 (kdlab/teacher_cache.py):
    the shifted values to float16's relative precision (2^-11), and the top-k log-probabilities
    z/τ − log_norm to that precision of the largest shifted value."""
    assert torch.equal(cached.indices, direct.indices)
    shifted = direct.values - direct.values[..., :1]
    assert (cached.values[..., 0] == 0).all()
    torch.testing.assert_close(cached.values, shifted, rtol=2**-11, atol=1e-6)
    tau = direct.temperature
    log_p = lambda v: v.values / tau - v.log_norm.unsqueeze(-1)  # noqa: E731
    bound = 2**-11 * shifted.abs().max().item() / tau + 1e-5
    assert (log_p(cached) - log_p(direct)).abs().max() <= bound
    torch.testing.assert_close(cached.log_tail, direct.log_tail, rtol=1e-4, atol=1e-5)
    assert cached.temperature == direct.temperature


def test_the_cache_round_trips_a_direct_teacher_forward_on_the_same_records(tiny_parts, tmp_path):
    cfg, tok, dm, teacher = tiny_parts
    for temperature in (1.0, 2.0):
        signals = teacher_cache.prepare(7, build_loss("fkl", temperature=temperature), teacher, tok, dm, len(tok), tmp_path)
        assert signals.temperature == temperature
        batches = iter(dm.train_dataloader())
        for _ in range(3):
            batch = next(batches)
            mask = batch["labels"] != IGNORE_INDEX
            cached = signals.view(batch["index"], batch["labels"])
            assert cached.values.shape == (*batch["labels"].shape, 7)
            assert_view_matches(cached[mask], direct_view(teacher, batch, 7, temperature))
        # micro-batches (gradient accumulation) find their rows by their records, laid out like their labels
        for micro in split_batch(batch, 2):
            view = signals.view(micro["index"], micro["labels"])
            assert view.values.shape[:2] == micro["labels"].shape
            assert_view_matches(view[micro["labels"] != IGNORE_INDEX], direct_view(teacher, micro, 7, temperature))
    assert len(list((tmp_path / "teacher_signals").iterdir())) == 2  # one entry per temperature


def test_the_cache_rows_of_file_data_match_the_teacher(tmp_path):
    """data=files: its records carry the same index into records["train"]; a gpt2-family pair."""
    from transformers import AutoModelForCausalLM

    from examples.tiny_pair import build, tokenizer
    from kdlab.data.files import FilesDataModule

    tok = tokenizer("gpt2")
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "response": f" {2 * i}", "domain": "ab"[i % 2]} for i in range(24)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = FilesDataModule(tok, train=str(path), batch_size=4, max_length=32, holdout_fraction=0.2)
    teacher = AutoModelForCausalLM.from_pretrained(build("gpt2", tmp_path / "pair")[0]).eval()
    signals = teacher_cache.prepare(8, build_loss("rkl"), teacher, tok, dm, len(tok), tmp_path / "cache")
    for batch, _ in zip(dm.train_dataloader(), range(2)):
        mask = batch["labels"] != IGNORE_INDEX
        assert_view_matches(signals.view(batch["index"], batch["labels"])[mask], direct_view(teacher, batch, 8))


def test_the_key_changes_with_k_the_data_the_temperature_and_the_teacher(tiny_parts, tiny_cfg):
    cfg, tok, dm, teacher = tiny_parts

    def key(dm=dm, teacher=teacher, k=8, temperature=1.0, precision="32-true"):
        return teacher_cache.signal_key(teacher, tok, dm, k, len(tok), temperature, precision, cfg.model.teacher)

    assert key() == key()
    other_data = instantiate(tiny_cfg("data.splits.n_train=41").data, tokenizer=tok)
    changed_teacher = build_model(cfg, "teacher", tok, dm)
    with torch.no_grad():
        changed_teacher.lm_head.weight.mul_(1.01)
    assert len({key(), key(k=16), key(dm=other_data), key(temperature=2.0), key(precision="bf16-mixed"), key(teacher=changed_teacher)}) == 6


def test_a_corrupted_or_half_written_entry_is_rebuilt(tiny_parts, tmp_path, caplog):
    cfg, tok, dm, teacher = tiny_parts
    first = prepare(5, tok, dm, teacher, tmp_path)
    original = np.array(first.arrays["values"])
    path = first.path
    with open(path / "values.npy", "r+b") as f:  # flip bytes in the middle of the values
        f.seek((path / "values.npy").stat().st_size // 2)
        f.write(b"\x7f\x7f\x7f\x7f")
    with caplog.at_level(logging.INFO):
        again = prepare(5, tok, dm, teacher, tmp_path)
    assert "is not used: its files do not match the checksums" in caplog.text
    assert "Computing the teacher's top-5" in caplog.text
    np.testing.assert_array_equal(np.array(again.arrays["values"]), original)
    (path / MANIFEST).unlink()  # an interrupted write: no manifest
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare(5, tok, dm, teacher, tmp_path)
    assert "it has no manifest" in caplog.text and (path / MANIFEST).is_file()


def test_a_cache_that_is_not_the_batch_records_stops_the_run(tiny_parts, tmp_path):
    cfg, tok, dm, teacher = tiny_parts
    signals = prepare(5, tok, dm, teacher, tmp_path)
    batch = dm.collate(dm._dataset("train")[:4])
    signals.view(batch["index"], batch["labels"])  # its own records: fine
    with pytest.raises(RuntimeError, match="does not belong to these training records"):
        signals.view(batch["index"].roll(1), batch["labels"])


# -- runs -------------------------------------------------------------------------------------------
def test_two_jobs_share_one_cache_and_run_no_teacher_forward_in_training(tmp_path, cache_dir, monkeypatch, caplog):
    def no_teacher_forward(self, *args):
        raise AssertionError("the teacher ran in a training step although the teacher cache serves it")

    labelled = DistillModule.labelled_logits
    monkeypatch.setattr(DistillModule, "teacher_logits", no_teacher_forward)  # train_only: no validation either
    monkeypatch.setattr(DistillModule, "labelled_logits",
                        lambda self, model, *a: no_teacher_forward(self) if model is self.teacher else labelled(self, model, *a))
    builds = []
    original = teacher_cache.build
    monkeypatch.setattr(teacher_cache, "build", lambda *a, **kw: builds.append(a[0]) or original(*a, **kw))
    caplog.set_level(logging.INFO, logger="kdlab.teacher_cache")
    caplog.set_level(logging.INFO, logger="kdlab.cache")
    first = run(compose_tiny(tmp_path / "job0", cache_dir, ["loss=fkl", "teacher_cache.k=6", "train_only=true"]))
    assert len(builds) == 1 and "Computing the teacher's top-6" in caplog.text
    manifest = builds[0] / MANIFEST
    written = manifest.stat().st_mtime_ns
    assert sum("sees an approximation of the teacher" in r.getMessage() for r in caplog.records) == 1  # once per run
    caplog.clear()
    second = run(compose_tiny(tmp_path / "job1", cache_dir, ["loss=rkl", "teacher_cache.k=6", "train_only=true"]))
    assert len(builds) == 1, "the second job rebuilt the cache"
    assert f"Loading the cached teacher signals from {builds[0]}" in caplog.text
    assert manifest.stat().st_mtime_ns == written
    assert math.isfinite(first["train/loss"]) and math.isfinite(second["train/loss"])


def test_a_dense_run_still_runs_the_teacher(tiny_cfg, monkeypatch):
    calls = []
    original = DistillModule.labelled_logits

    def spy(self, model, batch, mask):
        calls.append(model is self.teacher)
        return original(self, model, batch, mask)

    monkeypatch.setattr(DistillModule, "labelled_logits", spy)
    run(tiny_cfg("loss=fkl", "train_only=true", "trainer.max_steps=2"))
    assert calls.count(True) == 2  # one teacher forward per training step


class _DenseOnly:
    needs = Needs(teacher=True)


class _Fused:
    needs = Needs(teacher=True, sparse_teacher=True, fused_head=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=minillm"], r"trains on the student's own samples \(rollouts\).*teacher_cache.k=null for rollout losses"),
        (["loss=onpolicy"], r"OnPolicyKD trains on the student's own samples \(rollouts\)"),
        (["teacher_cache.k=46"], r"covers the tokenizer's whole vocabulary \(46 tokens\).*teacher_cache.k=null to use the dense teacher"),
        (["teacher_cache.k=0"], r"teacher_cache.k=0 must be an integer >= 1"),
        (["loss=rlkd", "loss.k=15"], r"loss.k=15: RLKD ranks the teacher's top-15 ids.*set teacher_cache.k >= 15"),
    ],
)
def test_refusals_come_before_any_model_is_built(tiny_cfg, monkeypatch, overrides, message):
    monkeypatch.setattr("kdlab.train.build_model", lambda *a: pytest.fail("a model was built before the refusal"))
    cfg = tiny_cfg(*(["teacher_cache.k=8"] if not any(o.startswith("teacher_cache") for o in overrides) else []), *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_losses_the_cache_cannot_serve_are_named():
    settings = {"k": 8}
    with pytest.raises(ValueError, match="_DenseOnly reads the teacher's dense logits"):
        teacher_cache.check_request(settings, _DenseOnly(), 1000)
    with pytest.raises(ValueError, match="loss.fused_head=true both replace the teacher's logits"):
        teacher_cache.check_request(settings, _Fused(), 1000)
    with pytest.raises(ValueError, match=r"reads the teacher at two temperatures \(loss=rlkd ranks its probabilities at temperature 1"):
        teacher_cache.check_request(settings, build_loss("rlkd", base=OmegaConf.merge(loss_config("fkl"), {"temperature": 2.0})), 1000)
    assert teacher_cache.check_request(settings, build_loss("fkl"), 1000) == 8
    assert teacher_cache.check_request({"k": None}, build_loss("fkl"), 1000) is None
    assert teacher_cache.check_request(settings, instantiate(loss_config("ce")), 1000) is None  # no teacher
    with pytest.raises(ValueError, match=r"covers the whole distillation vocabulary \(64 tokens\)"):
        teacher_cache.check_vocabulary(64, 64)
