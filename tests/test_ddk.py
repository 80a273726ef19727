"""DDK (docs/methods.md §4): Eq. 1 and Eq. 2 by hand, the reweighting callback, its configs, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn

from kdlab.callbacks.ddk import DDKReweighting, discrepancy_factor, smooth_update
from kdlab.data.sampler import DomainMixtureSampler
from kdlab.losses.base import KDBatch
from kdlab.losses.divergences import TokenKD, cross_entropy, forward_kl
from kdlab.train import run
from tests.conftest import CONF_DIR

E = math.e


# -- Eq. 1 and Eq. 2 against hand computations ---------------------------------------------------
def test_eq1_is_softmax_of_perplexity_ratios():
    # ratios ℓ_S/ℓ_T = 4/2, 2/2, 3/1 = 2, 1, 3; softmax = e^2, e^1, e^3 over e^2 + e + e^3 = 30.19287485
    r = discrepancy_factor([4.0, 2.0, 3.0], [2.0, 2.0, 1.0])
    assert r.tolist() == pytest.approx([7.38905610 / 30.19287485, 2.71828183 / 30.19287485, 20.08553692 / 30.19287485])
    assert r.tolist() == pytest.approx([0.24472847, 0.09003057, 0.66524096])
    assert r.dtype == torch.float64 and r.sum().item() == pytest.approx(1.0)


def test_eq2_smooth_update_by_hand():
    # r_t = (0.5, 0.3, 0.2), ratios (2/2, 4/2, 3/3) = (1, 2, 1):
    # ψ = (0.5e, 0.3e², 0.2e) = (1.35914091, 2.21671683, 0.54365637), Σψ = 4.11951411
    # r_{t+1} = 0.5·ψ/Σψ + 0.5/3 = 0.5·(0.32992748, 0.53810153, 0.13197099) + 0.16666667
    r = smooth_update([0.5, 0.3, 0.2], [2.0, 4.0, 3.0], [2.0, 2.0, 3.0], alpha=0.5)
    assert r.tolist() == pytest.approx([0.33163041, 0.43571743, 0.23265216])
    assert r.sum().item() == pytest.approx(1.0)


def test_eq2_floor_is_one_minus_alpha_over_n():
    # one domain lags enormously: ψ/Σψ → (1, 0, 0, 0); r = α·that + (1−α)/N, N = 4
    for alpha in (0.5, 0.2):
        r = smooth_update([0.25] * 4, [1000.0, 1.0, 1.0, 1.0], [1.0] * 4, alpha=alpha)  # exp(1000) must not overflow
        floor = (1 - alpha) / 4
        assert r.tolist() == pytest.approx([alpha + floor, floor, floor, floor])
    # random inputs: never below the floor, always a distribution
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        prev = torch.rand(5, generator=g, dtype=torch.float64).softmax(0)
        r = smooth_update(prev, 1 + 9 * torch.rand(5, generator=g), 1 + torch.rand(5, generator=g), alpha=0.5)
        assert r.min().item() >= 0.1 - 1e-12 and r.sum().item() == pytest.approx(1.0)
    # α = 1: no floor, plain renormalised ψ
    assert smooth_update([0.5, 0.5], [1.0, 2.0], [1.0, 1.0], alpha=1.0).tolist() == pytest.approx(
        [E / (E + E**2), E**2 / (E + E**2)]
    )
    with pytest.raises(ValueError, match="alpha"):
        smooth_update([0.5, 0.5], [1.0, 1.0], [1.0, 1.0], alpha=0.0)


def test_update_uses_eq1_first_then_eq2_and_the_ablation_eq1_every_time():
    s1, s2, t = torch.tensor([4.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    smooth, ablation = DDKReweighting(alpha=0.5), DDKReweighting(smoothing=False)
    for cb in (smooth, ablation):
        assert torch.equal(cb.update(s1, t), discrepancy_factor(s1, t))  # first update: Eq. 1
    r0 = discrepancy_factor(s1, t)
    assert torch.allclose(smooth.update(s2, t), smooth_update(r0, s2, t, 0.5))
    assert torch.allclose(ablation.update(s2, t), discrepancy_factor(s2, t))


# -- the callback on fabricated metrics ----------------------------------------------------------
class RecordingLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def fake_trainer(sampler, student_ppl, step=100):
    """Just what DDKReweighting reads from a Trainer, single process."""
    return SimpleNamespace(
        datamodule=SimpleNamespace(sampler=sampler),
        callback_metrics={f"val/{d}/ppl": torch.tensor(v) for d, v in student_ppl.items()},
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj, reduce=lambda t, reduce_op=None: t),
        loggers=[RecordingLogger()],
        global_step=step,
    )


def test_callback_moves_weights_toward_the_lagging_domain_and_logs():
    sampler = DomainMixtureSampler({"a": range(10), "b": range(10, 20), "c": range(20, 30)}, seed=0)
    cb, module = (
        DDKReweighting(),
        SimpleNamespace(teacher_val_ppl={"a": 2.0, "b": 2.0, "c": 1.0}, device=torch.device("cpu")),
    )
    drawn = [i for _, i in zip(range(12), iter(sampler))]
    assert len(drawn) == 12
    trainer = fake_trainer(sampler, {"a": 4.0, "b": 2.0, "c": 3.0})
    cb.on_validation_end(trainer, module)
    assert sampler.weights.tolist() == pytest.approx([0.24472847, 0.09003057, 0.66524096])  # Eq. 1 (hand values above)
    step, logged = trainer.loggers[0].rows[-1]
    assert step == 100
    assert logged["data/weight/c"] == pytest.approx(0.66524096) and logged["data/ppl_ratio/a"] == 2.0
    assert sum(logged[f"data/sampled/{d}"] for d in "abc") == 12  # the draws since the last update
    # the next validation: c caught up, a lags most now → Eq. 2 moves weight toward a
    trainer = fake_trainer(sampler, {"a": 8.0, "b": 2.0, "c": 1.0}, step=200)
    cb.on_validation_end(trainer, module)
    expected = smooth_update([0.24472847, 0.09003057, 0.66524096], [8.0, 2.0, 1.0], [2.0, 2.0, 1.0])
    assert sampler.weights.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert sampler.weights[0] > 0.24472847 and sampler.weights.min() >= 0.5 / 3
    assert sum(trainer.loggers[0].rows[-1][1][f"data/sampled/{d}"] for d in "abc") == 0
    # a resumed callback continues from the saved r_t
    resumed = DDKReweighting()
    resumed.load_state_dict(cb.state_dict())
    assert torch.allclose(resumed.factor, cb.factor)


def test_callback_ignores_sanity_checks_and_validation_outside_fit():
    sampler = DomainMixtureSampler({"a": [0], "b": [1]})
    module = SimpleNamespace(teacher_val_ppl={"a": 1.0, "b": 1.0}, device=torch.device("cpu"))
    for change in ({"sanity_checking": True}, {"state": SimpleNamespace(fn=TrainerFn.VALIDATING)}):
        trainer = fake_trainer(sampler, {"a": 9.0, "b": 1.0})
        vars(trainer).update(change)
        DDKReweighting().on_validation_end(trainer, module)
        assert sampler.weights.tolist() == [0.5, 0.5]


def test_missing_validation_metrics_name_the_domain_and_the_fix():
    sampler = DomainMixtureSampler({"add": [0], "sort": [1]})
    module = SimpleNamespace(teacher_val_ppl={"add": 1.0, "sort": 1.0}, device=torch.device("cpu"))
    for student in ({"add": 2.0}, {"add": 2.0, "sort": float("nan")}):  # no val data: absent or NaN
        with pytest.raises(RuntimeError, match=r"domain 'sort'.*give domain 'sort' some in the data's val split"):
            DDKReweighting().on_validation_end(fake_trainer(sampler, student), module)
    module.teacher_val_ppl = {"add": 1.0}
    with pytest.raises(RuntimeError, match=r"domain 'sort'"):
        DDKReweighting().on_validation_end(fake_trainer(sampler, {"add": 2.0, "sort": 2.0}), module)
    module.teacher_val_ppl = None
    with pytest.raises(RuntimeError, match=r"teacher's per-domain validation perplexities"):
        DDKReweighting().on_validation_end(fake_trainer(sampler, {"add": 2.0, "sort": 2.0}), module)
    with pytest.raises(RuntimeError, match=r"DataModule with a domain mixture sampler"):
        DDKReweighting().on_train_start(SimpleNamespace(datamodule=None), module)


def test_weight_change_takes_effect_at_the_next_batch(tiny_cfg):
    cfg = tiny_cfg("data/mixing=ddk", "data.batch_size=8")
    datamodule = instantiate(cfg.data, tokenizer=instantiate(cfg.model.tokenizer))
    batches = iter(datamodule.train_dataloader())
    assert len(set(next(batches)["domain"].tolist())) > 1  # uniform at first
    domains = datamodule.domains
    lag = {d: (40.0 if d == "add" else 1.0) for d in domains}  # ratio 40 vs 1: Eq. 1 gives add ≈ 1 − 4e−17
    module = SimpleNamespace(teacher_val_ppl={d: 1.0 for d in domains}, device=torch.device("cpu"))
    DDKReweighting().on_validation_end(fake_trainer(datamodule.sampler, lag), module)
    assert set(next(batches)["domain"].tolist()) == {domains.index("add")}


# -- end to end ----------------------------------------------------------------------------------
def test_ddk_run_logs_weights_that_follow_eq1_and_eq2_with_two_workers(tiny_cfg):
    """A tiny `data/mixing=ddk` run with data.num_workers=2: the logged weights are Eq. 1 then
    Eq. 2 of the logged ratios, and the sampled counts (drawn in the main process) add up."""
    # 5 × 48 examples = 15 whole batches of 16 per epoch: 9 steps and what the workers prefetch
    # stay inside the first epoch (no drop_last remainder to count)
    cfg = tiny_cfg(
        "data/mixing=ddk",
        "data.num_workers=2",
        "data.splits.n_train=48",
        "trainer.max_steps=9",
        "trainer.val_check_interval=3",
    )
    run(cfg)
    df = pd.read_csv(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    domains = sorted(cfg.data.splits.domains)
    logged = df.groupby("step").first()
    weights = logged[[f"data/weight/{d}" for d in domains]].dropna()
    # the starting weights, then one update per validation, at the steps Lightning logs val/* at
    # (after 3, 6, 9 optimizer steps: 2, 5, 8)
    steps = [2, 5, 8]
    assert weights.index.tolist() == [0, *steps]
    assert weights.loc[0].tolist() == pytest.approx([0.2] * 5)
    ratios = logged.loc[steps, [f"data/ppl_ratio/{d}" for d in domains]]
    for step in steps:  # the logged ratio is the logged student ppl over the teacher's
        for d in domains:
            assert ratios.loc[step, f"data/ppl_ratio/{d}"] == pytest.approx(
                logged.loc[step, f"val/{d}/ppl"] / logged.loc[step, f"val/{d}/teacher_ppl"], rel=1e-5
            )
    r = discrepancy_factor(ratios.loc[2].tolist(), [1.0] * 5)
    assert weights.loc[2].tolist() == pytest.approx(r.tolist())
    # the most weight where the student lags most
    assert weights.loc[2].idxmax() == ratios.loc[2].idxmax().replace("ppl_ratio", "weight")
    for step in steps[1:]:
        r = smooth_update(r, ratios.loc[step].tolist(), [1.0] * 5, 0.5)
        assert weights.loc[step].tolist() == pytest.approx(r.tolist())
        assert weights.loc[step].min() >= 0.1 - 1e-9
    sampled = logged.loc[steps, [f"data/sampled/{d}" for d in domains]].sum(axis=1)
    batch = cfg.data.batch_size
    # every training example counted once, in whole batches; the loader may draw a few batches
    # ahead (2 workers × prefetch_factor 2 + 1), never fewer than were trained on
    assert (sampled % batch == 0).all()
    for trained, drawn in zip((3, 6, 9), sampled.cumsum()):
        assert trained * batch <= drawn <= (trained + 5) * batch, (trained, drawn)

    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from kdlab.plots import plot_domain_weights

    fig = plot_domain_weights(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    lines = fig.axes[0].get_lines()
    assert sorted(line.get_label() for line in lines) == domains
    assert list(lines[0].get_xdata()) == [0, *steps]
    with pytest.raises(ValueError, match="data/weight"):
        plot_domain_weights(pd.DataFrame({"step": [0], "val/loss": [1.0]}))


# -- configs and the DDK loss --------------------------------------------------------------------
def test_configs_compose_every_variant():
    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))

    plain = cfg("data/mixing=ddk")
    assert plain.data.mixing is None and plain.callbacks.ddk.smoothing is True and plain.callbacks.ddk.alpha == 0.5
    assert "model_checkpoint" in plain.callbacks  # added beside the defaults, not instead
    assert plain.trainer.use_distributed_sampler is False
    ddk = cfg("experiment=ddk")
    assert ddk.callbacks.ddk.smoothing is True
    assert (ddk.loss.ce_weight, ddk.loss.kd_weight, ddk.loss.temperature) == (1.0, 0.2, 1.0)
    assert ddk.loss.divergence._target_.endswith("forward_kl")
    assert "ddk" not in cfg("experiment=ddk", "data/mixing=uniform").callbacks
    assert cfg("experiment=ddk", "data/mixing=ddk_no_smoothing").callbacks.ddk.smoothing is False
    assert cfg("experiment=ddk", "callbacks.ddk.smoothing=false").callbacks.ddk.smoothing is False


def test_ddk_loss_is_ce_plus_gamma_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    batch = KDBatch(student_logits=s, teacher_logits=t, labels=labels)
    mask = labels != -100
    kl = forward_kl(s, t, labels)[mask].mean()
    ce = cross_entropy(s, labels)[mask].mean()
    out = TokenKD(forward_kl, ce_weight=1.0, kd_weight=0.2)(batch)
    assert out.loss.item() == pytest.approx((ce + 0.2 * kl).item(), rel=1e-6)
    assert out.logs["kd"].item() == pytest.approx(kl.item(), rel=1e-6)  # logged unweighted
    assert TokenKD(forward_kl)(batch).loss.item() == pytest.approx(kl.item(), rel=1e-6)  # kd_weight defaults to 1
    with pytest.raises(ValueError, match="kd_weight"):
        TokenKD(forward_kl, kd_weight=-1.0)


# -- DDP, in a process of its own ----------------------------------------------------------------
@pytest.mark.slow
def test_ddp_ranks_sample_with_the_same_weights_and_disjoint_examples(tmp_path, cache_dir):
    script = Path(__file__).with_name("ddk_ddp_run.py")
    env = dict(os.environ, KDLAB_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(cache_dir)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the same weights on both ranks at every batch and after every DDK update, and DDK acted
    assert [b["weights"] for b in ranks[0]["batches"]] == [b["weights"] for b in ranks[1]["batches"]]
    assert ranks[0]["updates"] == ranks[1]["updates"] and len(ranks[0]["updates"]) == 3
    assert ranks[0]["updates"][0] != ranks[0]["batches"][0]["weights"]
    # one stream split between the ranks: no example twice (no domain cycles in this run)
    seen = [[i for b in r["batches"] for i in b["index"]] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 * 16
    assert len(set(seen[0]) | set(seen[1])) == 2 * 6 * 16
    # the logged counts are summed over ranks
    df = pd.read_csv(out / "csv" / "metrics.csv").groupby("step").first()
    sampled = df[[c for c in df.columns if c.startswith("data/sampled/")]].dropna().sum(axis=1)
    assert sampled.sum() >= 2 * 6 * 16 and (sampled % 16 == 0).all()
