"""bench/reproduce.py: the paired confidence interval, the verdicts and DDK's gap, by hand."""

import math

import pytest

from bench.reproduce import PROTOCOLS, ddk_gaps, paired_ci, t_quantile, table, verdict


def test_paired_interval_by_hand():
    mean, low, high = paired_ci([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) · sd / √n, sd² = 2.5
    assert mean == 3.0 and low == pytest.approx(3.0 - half) and high == pytest.approx(3.0 + half)
    # pairing: a constant offset between the arms is certain, however noisy each arm is
    mean, low, high = paired_ci([10.0, -5.0, 3.0], [9.0, -6.0, 2.0])
    assert (mean, low, high) == pytest.approx((1.0, 1.0, 1.0))
    assert t_quantile(4) == 2.776 and t_quantile(22) == 2.086 and t_quantile(100) == 1.96


def test_verdicts():
    assert verdict(0.1, 0.5, higher_is_better=True) == "reproduced"
    assert verdict(0.1, 0.5, higher_is_better=False) == "not reproduced"
    assert verdict(-0.5, -0.1, higher_is_better=False) == "reproduced"
    assert verdict(-0.1, 0.2, higher_is_better=True) == "inconclusive"
    assert verdict(float("nan"), float("nan"), True).startswith("inconclusive")


def test_ddk_gap_is_the_perplexity_ratio_mean_and_worst():
    metrics = {"test/a/ppl": 2.0, "test/a/teacher_ppl": 1.0, "test/b/ppl": 3.0, "test/b/teacher_ppl": 2.0, "test/ppl": 9.0, "test/teacher_ppl": 4.0}
    gaps = ddk_gaps(metrics)
    assert gaps["gap/a"] == 2.0 and gaps["gap/b"] == 1.5 and gaps["gap/mean"] == 1.75 and gaps["gap/worst"] == 2.0


def test_every_claim_names_a_variant_and_a_metric_of_its_protocol():
    for protocol in PROTOCOLS.values():
        for claim in protocol.claims:
            assert claim.variant in protocol.variants and claim.baseline in protocol.variants
            assert claim.metric in protocol.metrics.values(), claim


def test_table_reports_each_claim_with_its_verdict():
    protocol = PROTOCOLS["main"]
    results = {v: [{"seed": s, **{k: (1.0 if v == "ce" else 2.0) + 0.1 * s for k in protocol.metrics.values()}} for s in range(3)]
               for v in protocol.variants}
    text = table("main", protocol, results, [0, 1, 2])
    assert text.count("| reproduced |") == len(protocol.claims)  # every distilled row is +1.0 over ce, on every seed
    assert "+1.0000 [+1.0000, +1.0000]" in text


def test_exposure_uses_the_protocols_teacher_and_the_story_prompts():
    """The teacher's cache key hashes the data: it must come from the protocol's six-domain config
    (the teacher the runs distilled), only the prompts from the story-only one."""
    from omegaconf import OmegaConf

    from bench.reproduce import exposure_configs

    cfg, story = exposure_configs()
    assert list(cfg.data.splits.domains) == ["copy", "reverse", "sort", "add", "grammar", "story"]
    assert list(story.data.splits.domains) == ["story"]
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(story.model)
    def splits_but_domains(c):
        return {k: v for k, v in OmegaConf.to_container(c.data.splits).items() if k != "domains"}

    assert splits_but_domains(cfg) == splits_but_domains(story)


def test_the_real_chat_protocol_composes_every_variant_from_one_sft_student():
    from hydra import compose, initialize_config_dir

    from kdlab import CONF_DIR

    protocol = PROTOCOLS["real_minillm"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfgs = {v: compose("train", overrides=[f"experiment={protocol.experiment}", "data.train=/x/chat.jsonl", *o])
                for v, o in protocol.variants.items()}
    assert {v: c.loss._target_.rsplit(".", 1)[1] for v, c in cfgs.items()} == {"SFT": "CrossEntropy", "KD": "TokenKD", "MiniLLM": "MiniLLM"}
    assert len({str(c.model.student_training) for c in cfgs.values()}) == 1  # one warm start for every variant
    assert len({c.trainer.max_steps for c in cfgs.values()}) == 1 and cfgs["SFT"].data.train == "/x/chat.jsonl"
    assert cfgs["MiniLLM"].module.lr == cfgs["KD"].module.lr / 100  # the paper's ratio, 5e-6 vs 5e-4
    assert cfgs["MiniLLM"].loss.rollout.mini_batch_size == cfgs["MiniLLM"].data.batch_size
