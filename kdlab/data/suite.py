"""The built-in multi-domain task suite and its word-level tokenizer.

Every text is whitespace-separated tokens, so the tokenizer is one word per token and needs
no download. A prompt ends with the marker ``=``; the model continues after it:

    copy a b c d =          -> a b c d
    rev a b c d =           -> d c b a
    sort 3 1 2 =            -> 1 2 3
    add 4 7 + 5 8 =         -> 1 0 5
    say the big =           -> cat sees a dog .
    tell the =              -> fox likes a cat . a bird sees the dog .     (``story``, optional)

``grammar`` samples sentences from a probabilistic finite automaton, so its true next-token
distribution is known exactly (``Grammar.next_token_distribution``) and is multi-modal.
``story`` continues two sentences of the same grammar: the suite's only long answers (up to 25
tokens, 3x the others), for MiniLLM's claims about long responses and exposure bias. It is not
in the default mixture.

    suite = build_suite(("copy", "add", "grammar"), n_train=2000, seed=0)
    tok = build_tokenizer()
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdlab.data.datamodule import KDDataModule
from kdlab.data.records import Record, prompt_answer_record

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
MARKER = "="
LETTERS = tuple("abcdefghij")
DIGITS = tuple("0123456789")
DEFAULT_DOMAINS = ("copy", "reverse", "sort", "add", "grammar")


@dataclass(frozen=True)
class Example:
    """One task instance: the model sees ``prompt`` and should continue with ``answer``."""

    domain: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """Prompt and answer as one space-separated string."""
        return f"{self.prompt} {self.answer}"


class Domain:
    """A task family: samples examples, checks generations exactly, lists its symbols."""

    name: str = ""
    op: str = ""  # first prompt token

    def sample(self, rng: random.Random) -> Example:
        """Draw one example using only ``rng`` (so suites are reproducible)."""
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        """The unique correct answer to ``prompt`` (deterministic domains only)."""
        raise NotImplementedError

    def check(self, prompt: str, output: str) -> bool:
        """True iff ``output`` (decoded text after the prompt) is a correct continuation."""
        return output.split() == self.solve(prompt).split()

    def symbols(self) -> list[str]:
        """Every token this domain can emit, in a fixed order."""
        raise NotImplementedError

    def split_key(self, ex: Example) -> str:
        """What must not repeat across train/val/test: the prompt, for deterministic tasks."""
        return ex.prompt

    def _items(self, prompt: str) -> list[str]:
        toks = prompt.split()
        if len(toks) < 2 or toks[0] != self.op or toks[-1] != MARKER:
            raise ValueError(f"{self.name}: malformed prompt {prompt!r}; expected '{self.op} ... {MARKER}'")
        return toks[1:-1]


class _ListDomain(Domain):
    """A list of 3-6 symbols in, a transformed list out."""

    op: str
    alphabet: tuple[str, ...]

    def transform(self, items: list[str]) -> list[str]:
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Example:
        items = [rng.choice(self.alphabet) for _ in range(rng.randint(3, 6))]
        return Example(self.name, " ".join([self.op, *items, MARKER]), " ".join(self.transform(items)))

    def solve(self, prompt: str) -> str:
        return " ".join(self.transform(self._items(prompt)))

    def symbols(self) -> list[str]:
        return [self.op, MARKER, *self.alphabet]


class Copy(_ListDomain):
    """``copy a b c =`` -> ``a b c``: the easiest domain."""

    name, op, alphabet = "copy", "copy", LETTERS

    def transform(self, items: list[str]) -> list[str]:
        return list(items)


class Reverse(_ListDomain):
    """``rev a b c =`` -> ``c b a``."""

    name, op, alphabet = "reverse", "rev", LETTERS

    def transform(self, items: list[str]) -> list[str]:
        return items[::-1]


class Sort(_ListDomain):
    """``sort 3 1 2 =`` -> ``1 2 3`` (digits, repeats allowed)."""

    name, op, alphabet = "sort", "sort", DIGITS

    def transform(self, items: list[str]) -> list[str]:
        return sorted(items)


class Add(Domain):
    """``add 4 7 + 5 8 =`` -> ``1 0 5``: sum of two 1-3 digit numbers, one digit per token."""

    name, op = "add", "add"

    @staticmethod
    def _number(rng: random.Random) -> int:
        # Draw the digit count first so short and long operands are equally common.
        n = rng.randint(1, 3)
        return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n)

    def sample(self, rng: random.Random) -> Example:
        a, b = self._number(rng), self._number(rng)
        prompt = " ".join([self.op, *str(a), "+", *str(b), MARKER])
        return Example(self.name, prompt, " ".join(str(a + b)))

    def solve(self, prompt: str) -> str:
        items = self._items(prompt)
        if items.count("+") != 1 or not all(t in DIGITS for t in items if t != "+"):
            raise ValueError(f"add: malformed prompt {prompt!r}; expected 'add D.. + D.. ='")
        i = items.index("+")
        a, b = "".join(items[:i]), "".join(items[i + 1 :])
        if not a or not b:
            raise ValueError(f"add: malformed prompt {prompt!r}; an operand is empty")
        return " ".join(str(int(a) + int(b)))

    def symbols(self) -> list[str]:
        return [self.op, MARKER, "+", *DIGITS]


# Word classes of the grammar with their probabilities within the class.
_DET = {"the": 0.6, "a": 0.4}
_ADJ = {"big": 0.25, "small": 0.25, "red": 0.25, "young": 0.25}
_NOUN = {"cat": 0.3, "dog": 0.3, "bird": 0.2, "fox": 0.2}
_VERB = {"sees": 0.4, "chases": 0.3, "likes": 0.3}
_P_ADJ = 0.4  # chance a noun phrase has an adjective
_P_AND = 0.4  # chance the sentence gets a second verb phrase


def _grammar_table() -> dict[str, dict[str, tuple[float, str]]]:
    """state -> {word: (probability, next state)}; "F" is the only accepting state."""
    t: dict[str, dict[str, tuple[float, str]]] = {}

    def np(tag: str, after: str) -> None:
        # DET (ADJ) NOUN, as three states so that every (state, word) has one successor.
        t[f"D{tag}"] = {w: (p, f"A{tag}") for w, p in _DET.items()}
        t[f"A{tag}"] = {w: (_P_ADJ * p, f"N{tag}") for w, p in _ADJ.items()}
        t[f"A{tag}"] |= {w: ((1 - _P_ADJ) * p, after) for w, p in _NOUN.items()}
        t[f"N{tag}"] = {w: (p, after) for w, p in _NOUN.items()}

    np("1", "V1")  # subject
    t["V1"] = {w: (p, "D2") for w, p in _VERB.items()}
    np("2", "E1")  # object
    t["E1"] = {".": (1 - _P_AND, "F"), "and": (_P_AND, "V2")}
    t["V2"] = {w: (p, "D3") for w, p in _VERB.items()}
    np("3", "E2")  # second object; at most one "and" keeps sentences <= 13 words
    t["E2"] = {".": (1.0, "F")}
    t["F"] = {}
    return t


class Grammar(Domain):
    """English-like sentences from a deterministic probabilistic finite automaton.

    Sentence: DET (ADJ) NOUN VERB DET (ADJ) NOUN [and VERB DET (ADJ) NOUN] ``.``
    Prompt ``say w1 [w2] =`` holds the first 1-2 words; the answer is the rest of the sentence.
    Use ``prefix(context)`` to turn a model's context (prompt plus generated words) into the
    sentence prefix that ``next_token_distribution`` expects.
    """

    name, op, start = "grammar", "say", "D1"

    def __init__(self) -> None:
        self.table = _grammar_table()

    def _state(self, words: Sequence[str]) -> str:
        state = self.start
        for i, w in enumerate(words):
            if w not in self.table[state]:
                raise ValueError(f"grammar: {w!r} cannot follow {list(words[:i])}")
            state = self.table[state][w][1]
        return state

    def prefix(self, context: str | Sequence[str]) -> list[str]:
        """Sentence words in a context such as ``say the big = cat sees`` (drops ``say``/``=``)."""
        toks = context.split() if isinstance(context, str) else list(context)
        if not toks or toks[0] != self.op or MARKER not in toks:
            raise ValueError(f"grammar: context {context!r} must start with 'say' and contain '='")
        return [t for t in toks[1:] if t != MARKER]

    def next_token_distribution(self, words: Sequence[str]) -> dict[str, float]:
        """Exact distribution of the next word after the sentence prefix ``words``.

        After a complete sentence the only continuation is ``{EOS: 1.0}``, so the end of an
        answer can be scored like any other position. Raises ValueError on an invalid prefix.
        """
        state = self._state(words)
        return {w: p for w, (p, _) in self.table[state].items()} if self.table[state] else {EOS: 1.0}

    def is_valid(self, words: Sequence[str]) -> bool:
        """True iff ``words`` is exactly one complete sentence."""
        try:
            return self._state(words) == "F"
        except ValueError:
            return False

    def sentence_probability(self, words: Sequence[str]) -> float:
        """Probability of sampling exactly ``words``; 0.0 if it is not a complete sentence."""
        if not self.is_valid(words):
            return 0.0
        p, state = 1.0, self.start
        for w in words:
            q, state = self.table[state][w]
            p *= q
        return p

    def sample_sentence(self, rng: random.Random) -> list[str]:
        """Draw one sentence from the automaton."""
        words, state = [], self.start
        while self.table[state]:
            choices = list(self.table[state].items())
            w, (_, state) = rng.choices(choices, weights=[p for _, (p, _) in choices])[0]
            words.append(w)
        return words

    def sample(self, rng: random.Random) -> Example:
        words = self.sample_sentence(rng)
        k = rng.randint(1, 2)
        return Example(self.name, " ".join([self.op, *words[:k], MARKER]), " ".join(words[k:]))

    def check(self, prompt: str, output: str) -> bool:
        return self.is_valid(self.prefix(prompt) + output.split())

    def symbols(self) -> list[str]:
        words = dict.fromkeys(w for state in self.table.values() for w in state)
        return [self.op, MARKER, *words]

    def split_key(self, ex: Example) -> str:
        # Only 18 grammar prompts exist, so held-out data is defined by whole sentences.
        return ex.text


class Story(Grammar):
    """Two sentences of the grammar: ``tell w1 [w2] =`` → the rest of the first sentence and a second one.

    The long-answer domain (MiniLLM's protocol, docs/methods.md §3): errors made early in the
    answer are carried through many more generated tokens than in any other domain. Any
    continuation that makes the prompt's words into exactly two valid sentences is correct.
    """

    name, op = "story", "tell"

    def sample(self, rng: random.Random) -> Example:
        first, second = self.sample_sentence(rng), self.sample_sentence(rng)
        k = rng.randint(1, 2)
        return Example(self.name, " ".join([self.op, *first[:k], MARKER]), " ".join(first[k:] + second))

    def prefix(self, context: str | Sequence[str]) -> list[str]:
        toks = context.split() if isinstance(context, str) else list(context)
        if not toks or toks[0] != self.op or MARKER not in toks:
            raise ValueError(f"story: context {context!r} must start with 'tell' and contain '='")
        return [t for t in toks[1:] if t != MARKER]

    def check(self, prompt: str, output: str) -> bool:
        words = self.prefix(prompt) + output.split()
        ends = [i for i, w in enumerate(words) if w == "."]
        if len(ends) != 2 or ends[1] != len(words) - 1:
            return False
        return self.is_valid(words[: ends[0] + 1]) and self.is_valid(words[ends[0] + 1 :])


# The tokenizer's ids follow this order: a new domain goes last, so existing ids never move.
DOMAINS: dict[str, type[Domain]] = {c.name: c for c in (Copy, Reverse, Sort, Add, Grammar, Story)}


def build_domains(names: Sequence[str]) -> list[Domain]:
    """Instantiate domains by name; unknown or repeated names raise ValueError."""
    if isinstance(names, str) or not names:
        raise ValueError(f"domains must be a non-empty list of names from {sorted(DOMAINS)}, got {names!r}")
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; valid names: {sorted(DOMAINS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"domain listed twice in {list(names)}; list each once")
    return [DOMAINS[n]() for n in names]


def _draw(domain: Domain, rng: random.Random, n: int, exclude: set[str], unique: bool) -> list[Example]:
    out: list[Example] = []
    budget = 100 * n + 1000  # generous: only a near-exhausted space hits it
    while len(out) < n and budget:
        budget -= 1
        ex = domain.sample(rng)
        key = domain.split_key(ex)
        if key in exclude:
            continue
        if unique:
            exclude.add(key)
        out.append(ex)
    if len(out) < n:
        raise ValueError(
            f"domain {domain.name!r}: drew only {len(out)} of {n} examples whose prompt (whole "
            "sentence for grammar) is not already held out; its space is too small for the "
            "requested n_val/n_test/n_train, so lower them"
        )
    return out


def build_suite(
    domains: Sequence[str] = DEFAULT_DOMAINS,
    n_train: int = 2000,
    n_val: int = 64,
    n_test: int = 128,
    seed: int = 0,
) -> dict[str, list[Example]]:
    """Generate ``{"train", "val", "test"}`` with ``n_*`` examples per domain, round-robin interleaved.

    Test is drawn first, then val, then train, each from its own RNG keyed by (seed, domain,
    split), so val/test do not change when ``n_train`` or the domain list changes. Val/test
    keys are unique and disjoint, and train never contains one (train itself may repeat, as
    i.i.d. samples should). The key is the prompt, or the whole sentence for ``grammar``.
    """
    for k, v in {"n_train": n_train, "n_val": n_val, "n_test": n_test}.items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
    per_domain: dict[str, list[list[Example]]] = {"train": [], "val": [], "test": []}
    for dom in build_domains(domains):
        held_out: set[str] = set()
        for split, n, unique in (("test", n_test, True), ("val", n_val, True), ("train", n_train, False)):
            rng = random.Random(f"{seed}:{dom.name}:{split}")  # str seeds are stable across runs
            per_domain[split].append(_draw(dom, rng, n, held_out, unique))
    return {split: [ex for group in zip(*lists) for ex in group] for split, lists in per_domain.items()}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the specials and every symbol of every domain in ``DOMAINS``.

    No bos/eos are added on encode (the data pipeline adds them); decode joins words with spaces.
    """
    vocab = dict.fromkeys(SPECIALS)
    for cls in DOMAINS.values():
        vocab |= dict.fromkeys(cls().symbols())
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Without a decoder, tokenizers joins tokens with single spaces: exactly our text format.
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # else " ." would be glued to the previous word
    )


# -- the suite as a data source -------------------------------------------------------------------
def encode(example: Example, tokenizer) -> Record:
    """``<bos> prompt | answer <eos>``, with the answer and ``<eos>`` as the targets."""
    prompt = [tokenizer.bos_token_id] + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_answer_record(example.domain, prompt, answer, example.prompt, example.answer)


def suite_records(tokenizer, **settings) -> dict[str, list[Record]]:
    """:func:`build_suite` with ``settings`` (domains, n_train, n_val, n_test, seed), tokenised."""
    return {split: [encode(ex, tokenizer) for ex in examples] for split, examples in build_suite(**settings).items()}


class SuiteDataModule(KDDataModule):
    """``data=suite``: the built-in suite's records (``splits``: the generator's settings) in a :class:`KDDataModule`.
    ``domain_lists``: the config's named lists of domains, which ``splits.domains`` picks from (unused here)."""

    def __init__(self, tokenizer, splits, domain_lists=None, **kwargs):
        super().__init__(suite_records(tokenizer, **splits), tokenizer, **kwargs)
