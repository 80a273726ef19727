"""The DataModule's tokenised layout and the domain mixture sampler."""

import pytest
import torch

from kdlab.data.datamodule import KDDataModule
from kdlab.data.sampler import DomainMixtureSampler
from kdlab.data.suite import Example, SuiteDataModule, build_tokenizer, encode
from kdlab.data.suite_eval import SuiteChecker
from kdlab.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def encoded(splits, tokenizer):
    return {name: [encode(example, tokenizer) for example in examples] for name, examples in splits.items()}


def test_labels_are_the_answer_aligned_with_logits(tokenizer):
    ex, held_out = Example("copy", "copy a b =", "a b"), Example("copy", "copy b =", "b")
    dm = KDDataModule(encoded({"train": [ex], "val": [held_out], "test": [held_out]}, tokenizer), tokenizer, batch_size=1)
    batch = dm.collate(dm._dataset("train"))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["<bos>", "copy", "a", "b", "=", "a", "b", "<eos>"]
    counted = [(t, tokenizer.convert_ids_to_tokens(int(labels[t]))) for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
    # position t predicts token t+1: "=" (t=4) predicts the first answer token, the last answer token predicts <eos>
    assert counted == [(4, "a"), (5, "b"), (6, "<eos>")]
    assert all(labels[t] == ids[t + 1] for t, _ in counted)


def test_prompts_are_left_padded_for_generation(tokenizer):
    short, long = Example("copy", "copy a =", "a"), Example("copy", "copy a b c =", "a b c")
    held_out = Example("copy", "copy b =", "b")
    dm = KDDataModule(encoded({"train": [short, long], "val": [held_out], "test": [held_out]}, tokenizer), tokenizer)
    batch = dm.collate(dm._dataset("train"))
    pad = tokenizer.pad_token_id
    assert batch["prompt_ids"][0, :2].tolist() == [pad, pad] and batch["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch["prompt_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("=")] * 2


def test_domain_without_eval_data_is_a_clear_error(tokenizer):
    train = [Example("copy", "copy a =", "a"), Example("sort", "sort 2 1 =", "1 2")]
    with pytest.raises(ValueError, match=r"\['sort'\] have training data but no val data"):
        KDDataModule(encoded({"train": train, "val": train[:1], "test": train}, tokenizer), tokenizer)


def test_suite_checker_uses_each_domain_checker():
    checker = SuiteChecker(["add", "copy"])
    assert checker(Example("add", "add 4 7 + 5 8 =", "1 0 5"), "1 0 5")
    assert not checker(Example("add", "add 4 7 + 5 8 =", "1 0 5"), "1 0 4")


def test_sampler_frequencies_match_weights():
    """Chi-square goodness of fit of the drawn domains to the weights (df = 2, 0.999 quantile 13.8)."""
    sampler = DomainMixtureSampler({"a": range(0, 10), "b": range(10, 15), "c": range(15, 100)}, {"a": 0.2, "b": 0.5, "c": 0.3}, seed=1)
    n = 0
    counts = torch.zeros(3)
    while n < 30000:
        for index in sampler:
            counts[0 if index < 10 else 1 if index < 15 else 2] += 1
            n += 1
    expected = torch.tensor([0.2, 0.5, 0.3]) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8, (counts, chi2)
    assert sum(sampler.take_counts().values()) == n and sum(sampler.take_counts().values()) == 0


def test_weight_change_takes_effect_at_the_next_draw_and_small_domains_cycle():
    sampler = DomainMixtureSampler({"a": [0, 1], "b": [2, 3], "c": [4, 5, 6, 7]}, {"a": 1.0, "b": 0.0}, seed=0)
    stream = iter(sampler)  # one epoch = 8 draws
    first = [next(stream) for _ in range(4)]
    assert sorted(first) == [0, 0, 1, 1]  # domain "a" (2 examples) cycled, each once per pass
    sampler.set_weights({"b": 1.0})
    assert {next(stream) for _ in range(4)} == {2, 3}  # mid-epoch: the very next draws follow the new weights


def test_sampler_is_deterministic_and_continues_across_epochs():
    def make():
        return DomainMixtureSampler({"a": range(50), "b": range(50, 100)}, seed=3)

    s1, s2 = make(), make()
    epoch1, epoch2 = list(s1), list(s1)
    assert epoch1 == list(s2) and epoch2 == list(s2)
    assert epoch1 != epoch2  # the second epoch continues the stream, it does not replay the first


def test_ranks_split_one_stream():
    full = list(DomainMixtureSampler({"a": range(20), "b": range(20, 40)}, seed=5))
    parts = [list(DomainMixtureSampler({"a": range(20), "b": range(20, 40)}, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert full[0::2] == parts[0] and full[1::2] == parts[1]


def test_sampler_rejects_bad_weights_and_empty_domains():
    with pytest.raises(ValueError, match="no training examples"):
        DomainMixtureSampler({"a": [], "b": [1]})
    sampler = DomainMixtureSampler({"a": [0], "b": [1]})
    with pytest.raises(ValueError, match="not all 0"):
        sampler.set_weights({"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="unknown domain"):
        sampler.set_weights({"zzz": 1.0})


def test_suite_datamodule_builds_every_split(tokenizer):
    dm = SuiteDataModule(tokenizer, splits=dict(n_train=20, n_val=4, n_test=4))
    assert dm.domains == sorted(["copy", "reverse", "sort", "add", "grammar"])
    assert len(dm.val_dataloader().dataset) == 20 and dm.max_new_tokens >= 2


def test_static_weights_name_the_domains_of_the_data(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg("data/mixing=static", "data.mixing={add: 3, copy: 1}")
    dm = instantiate(cfg.data, tokenizer=instantiate(cfg.model.tokenizer))
    assert dm.sampler.weight_dict == pytest.approx({"add": 0.75, "copy": 0.25, "grammar": 0.0, "reverse": 0.0, "sort": 0.0})
