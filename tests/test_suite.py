"""Tests of the built-in task suite, its exact checkers, the grammar's true distribution and the tokenizer."""

import math
import random
from collections import Counter

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdlab.data.suite import (
    DEFAULT_DOMAINS,
    DOMAINS,
    EOS,
    Domain,
    Example,
    Grammar,
    Story,
    build_domains,
    build_suite,
    build_tokenizer,
)

SMALL = dict(n_train=200, n_val=16, n_test=32)


@pytest.fixture(scope="module")
def suite():
    return build_suite(DEFAULT_DOMAINS, **SMALL, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_sizes_interleaving_and_length(suite):
    for split, n in (("train", 200), ("val", 16), ("test", 32)):
        exs = suite[split]
        assert len(exs) == n * len(DEFAULT_DOMAINS)
        assert [e.domain for e in exs[: len(DEFAULT_DOMAINS)]] == list(DEFAULT_DOMAINS)
        assert Counter(e.domain for e in exs) == {d: n for d in DEFAULT_DOMAINS}
        assert all(e.prompt.split()[-1] == "=" and len(e.text.split()) <= 22 for e in exs)


def test_deterministic_under_seed(suite):
    assert build_suite(DEFAULT_DOMAINS, **SMALL, seed=0) == suite
    assert build_suite(DEFAULT_DOMAINS, **SMALL, seed=1)["train"] != suite["train"]


def test_held_out_stable_when_train_size_or_domains_change(suite):
    other = build_suite(("add", "copy"), n_train=50, n_val=16, n_test=32, seed=0)
    for split in ("val", "test"):
        assert [e for e in other[split] if e.domain == "add"] == [e for e in suite[split] if e.domain == "add"]


def test_splits_disjoint(suite):
    def keys(split, domain):
        dom = DOMAINS[domain]()
        return [dom.split_key(e) for e in suite[split] if e.domain == domain]

    for d in DEFAULT_DOMAINS:
        train, val, test = keys("train", d), keys("val", d), keys("test", d)
        assert len(set(val)) == len(val) and len(set(test)) == len(test)
        assert not set(val) & set(test)
        assert not (set(val) | set(test)) & set(train)
    train_prompts = {e.prompt for e in suite["train"] if e.domain != "grammar"}
    assert not train_prompts & {e.prompt for e in suite["test"] if e.domain != "grammar"}


class _Coin(Domain):
    """A domain with only two prompts, to exhaust the held-out space."""

    name, op = "coin", "flip"

    def sample(self, rng):
        side = rng.choice("ab")
        return Example(self.name, f"flip {side} =", side)

    def solve(self, prompt):
        return self._items(prompt)[0]

    def symbols(self):
        return ["flip", "=", "a", "b"]


def test_small_space_error_names_cause(monkeypatch):
    monkeypatch.setitem(DOMAINS, "coin", _Coin)
    assert len(build_suite(("coin",), n_train=0, n_val=1, n_test=1)["val"]) == 1
    with pytest.raises(ValueError, match="'coin'.*too small"):
        build_suite(("coin",), n_train=0, n_val=1, n_test=2)
    with pytest.raises(ValueError, match="'coin'.*too small"):
        build_suite(("coin",), n_train=1, n_val=1, n_test=1)  # train cannot avoid the held-out prompts


@pytest.mark.parametrize(
    "domain, prompt, good, bad",
    [
        ("copy", "copy a b c d =", "a b c d", ["a b c", "a b c d d", "d c b a", ""]),
        ("reverse", "rev a b c d =", "d c b a", ["a b c d", "d c b", "d c b a a"]),
        ("sort", "sort 3 1 2 =", "1 2 3", ["3 2 1", "1 2", "1 2 3 3"]),
        ("add", "add 4 7 + 5 8 =", "1 0 5", ["1 0 4", "1 0 5 5", "0 1 5", "105"]),
        ("add", "add 0 + 9 =", "9", ["0 9", "1 0"]),
        ("add", "add 9 9 9 + 9 9 9 =", "1 9 9 8", ["9 9 8"]),
        ("grammar", "say the big =", "cat sees a dog .", ["cat sees a dog", "cat sees a dog . .", "big cat sees a ."]),
        ("grammar", "say a =", "dog likes the red bird and sees a cat .", ["dog likes a and .", "cat sees ."]),
    ],
)
def test_checker_hand_cases(domain, prompt, good, bad):
    dom = DOMAINS[domain]()
    assert dom.check(prompt, good)
    assert dom.check(prompt, f"  {good} ")  # callers strip, but extra spaces must not matter
    for b in bad:
        assert not dom.check(prompt, b), b


def test_checker_accepts_references_and_rejects_corruptions(suite):
    doms = {d.name: d for d in build_domains(DEFAULT_DOMAINS)}
    for e in suite["test"]:
        dom, words = doms[e.domain], e.answer.split()
        assert dom.check(e.prompt, e.answer)
        assert not dom.check(e.prompt, " ".join(words + [words[-1]]))
        assert not dom.check(e.prompt, " ".join(words[:-1]))


def test_malformed_prompt_raises():
    with pytest.raises(ValueError, match="malformed"):
        DOMAINS["add"]().check("add 4 7 5 8 =", "1 0 5")
    with pytest.raises(ValueError, match="say"):
        Grammar().check("the big =", "cat sees a dog .")


def test_grammar_hand_computed_distribution():
    g = Grammar()
    assert g.next_token_distribution([]) == pytest.approx({"the": 0.6, "a": 0.4})
    after_det = g.next_token_distribution(["the"])
    assert after_det == pytest.approx(
        {"big": 0.1, "small": 0.1, "red": 0.1, "young": 0.1, "cat": 0.18, "dog": 0.18, "bird": 0.12, "fox": 0.12}
    )
    assert g.next_token_distribution("the cat sees a dog".split()) == pytest.approx({".": 0.6, "and": 0.4})
    assert g.next_token_distribution("a big dog likes the fox and sees a cat".split()) == {".": 1.0}
    assert g.next_token_distribution("the cat sees a dog .".split()) == {EOS: 1.0}
    p = 0.6 * 0.18 * 0.4 * 0.4 * 0.18 * 0.6
    assert g.sentence_probability("the cat sees a dog .".split()) == pytest.approx(p)
    assert g.sentence_probability("the cat sees a dog".split()) == 0.0
    with pytest.raises(ValueError, match="cannot follow"):
        g.next_token_distribution(["the", "sees"])


def test_grammar_distribution_sums_to_one_and_is_multimodal():
    g, rng = Grammar(), random.Random(0)
    multimodal = False
    for _ in range(200):
        words = g.sample_sentence(rng)
        for i in range(len(words) + 1):
            dist = g.next_token_distribution(words[:i])
            assert math.isclose(sum(dist.values()), 1.0)
            multimodal |= sum(p >= 0.2 for p in dist.values()) >= 2
    assert multimodal


def test_grammar_prefix_helper():
    g = Grammar()
    assert g.prefix("say the big = cat sees") == ["the", "big", "cat", "sees"]
    assert g.prefix(["say", "a", "="]) == ["a"]


def test_grammar_sampling_matches_sentence_probability():
    g, rng, n = Grammar(), random.Random(123), 20_000
    counts = Counter(tuple(g.sample_sentence(rng)) for _ in range(n))
    assert all(g.is_valid(s) for s in counts)
    for sentence, c in counts.most_common(10):
        p = g.sentence_probability(sentence)
        assert abs(c - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (sentence, c, n * p)
    # Marginal check over a whole event, so the test is not only about the most common sentences.
    with_and = sum(c for s, c in counts.items() if "and" in s) / n
    assert abs(with_and - 0.4) <= 4 * math.sqrt(0.4 * 0.6 / n)


def test_tokenizer_round_trip_without_unk(suite, tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    texts = [e.text for split in suite.values() for e in split]
    ids = tok(texts)["input_ids"]
    for text, row in zip(texts, ids):
        assert tok.unk_token_id not in row
        assert len(row) == len(text.split())  # one token per word, no bos/eos added
        assert tok.decode(row, skip_special_tokens=True) == text
    for e in suite["test"]:
        assert tok.decode(tok(e.answer)["input_ids"], skip_special_tokens=True) == e.answer
    wrapped = [tok.bos_token_id, *tok("say a =")["input_ids"], tok.eos_token_id]
    assert tok.decode(wrapped, skip_special_tokens=True) == "say a ="


def test_tokenizer_covers_every_domain_and_specials(tok):
    vocab = tok.get_vocab()
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert [vocab[t] for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    for cls in DOMAINS.values():
        assert set(cls().symbols()) <= set(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert build_tokenizer().get_vocab() == vocab


def test_tokenizer_save_load(tmp_path, suite, tok):
    tok.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = [e.text for e in suite["val"]] + ["say the <unk> ="]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert all(loaded.decode(loaded(t)["input_ids"]) == t for t in texts[:-1])  # grammar's " ." survives
    assert AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"] == tok(texts)["input_ids"]


def test_build_domains_errors():
    assert [d.name for d in build_domains(["add", "copy"])] == ["add", "copy"]
    with pytest.raises(ValueError, match="valid names.*'add'.*'grammar'"):
        build_domains(["add", "multiply"])
    with pytest.raises(ValueError, match="twice"):
        build_domains(["add", "add"])
    with pytest.raises(ValueError, match="non-empty"):
        build_domains([])
    with pytest.raises(ValueError, match="n_val"):
        build_suite(n_val=-1)


def test_example_is_frozen():
    e = Example("copy", "copy a b c =", "a b c")
    with pytest.raises(AttributeError):
        e.answer = "x"  # type: ignore[misc]


def test_story_is_two_sentences_and_long():
    story = Story()
    assert story.check("tell the =", "cat sees a dog . a bird likes the fox .")
    assert story.check("tell a red =", "fox chases the cat and likes a dog . the dog sees a cat .")
    assert not story.check("tell the =", "cat sees a dog .")  # one sentence
    assert not story.check("tell the =", "cat sees a dog . a bird likes the fox . the cat sees a dog .")  # three
    assert not story.check("tell the =", "cat sees a dog . a bird likes the fox")  # unfinished
    assert not story.check("tell the =", "cat sees a dog . bird likes the fox .")  # second sentence invalid
    examples = build_suite(("story",), n_train=300, n_val=8, n_test=8, seed=0)["train"]
    assert all(story.check(e.prompt, e.answer) for e in examples)
    lengths = [len(e.answer.split()) for e in examples]
    assert max(lengths) >= 20 and min(lengths) >= 8  # 3x the other domains' answers


def test_adding_story_keeps_every_other_token_id(tok):
    # the story domain's only new symbol is appended: ids of the five default domains are unchanged
    assert tok.convert_tokens_to_ids("tell") == len(tok) - 1
    assert "story" not in DEFAULT_DOMAINS
