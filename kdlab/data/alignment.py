"""Two tokenisations of one record, aligned: the spans of teacher and student tokens that cover the same text.

Cross-tokenizer distillation (``loss=uld``, ``loss=gold``; docs/methods.md §6) compares the two
models where both predict the same thing. Each tokenizer renders the record with its own chat
template (or its own BOS/EOS around plain text), so the sequences differ outside the responses;
inside a response both cover the same characters. A *segment* is one response as its target
tokens, each with its character range relative to the response's start (:func:`Piece`); tokens
after the response text (the end-of-turn token and any template text before it) form its tail.

:func:`align` cuts both segments at every character position where neither tokenisation has a
token running across: the spans between consecutive common cuts are aligned *groups* of m teacher
and n student tokens covering the same text. Offsets are the tokenizers' character offsets into
the rendered string, never decoded token strings, so:

- a multi-byte UTF-8 character split into several byte tokens (CJK, emoji) gives tokens with
  overlapping ranges, and no cut is made inside it;
- whitespace a tokenizer leaves out of its offsets (or merges into the next token) is a gap that
  either side may cut in;
- a BOS token, a template header or a prompt present on one side only lies outside the segments.

At a group's first token both models have read the same text of the response (every earlier
group covered the same characters), so their next-token distributions there are comparable: the
objectives compare them at the group's first position. A group of one token on each side whose
tokens are the same string in both vocabularies (:class:`VocabularyMap`: the same bytes of text, or
special tokens spelled alike, such as ``<|im_end|>`` on both sides) is *matched*: the hybrid
objective compares the two distributions over the shared tokens there. The end-of-turn tail is
matched too where both sides end it with the same special token; where they differ (``</s>``
against ``<|im_end|>``) it stays a ULD group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from kdlab.data.records import Encoded, Piece


@dataclass(frozen=True)
class Group:
    """Aligned tokens: the first student and teacher token indices of a span covering the same text,
    and how many tokens each side has in it."""

    student: int
    teacher: int
    student_tokens: int
    teacher_tokens: int


def _cuts(pieces: list[Piece], length: int) -> list[tuple[int, int]]:
    """For each boundary between consecutive pieces, the character interval where a cut is allowed
    ((lo, hi): anywhere from the end of one to the start of the next), or (−1, −2) where the two
    overlap (a character split across tokens): no cut there. The tail is one unit after the text."""
    spans = [(length, length + 1) if p.tail else (min(p.start, length), min(p.end, length)) for p in pieces]
    out = []
    for (_, end), (start, _) in zip(spans, spans[1:]):
        out.append((end, start) if end <= start else (-1, -2))
    return out


def align(student: list[Piece], teacher: list[Piece], length: int) -> list[Group]:
    """The groups of two segments of the same response text of ``length`` characters (module docstring).

    Both cut lists are walked once in order: where the two sides' allowed intervals intersect the
    group closes; otherwise the side whose interval lies earlier moves on.
    """
    if not student or not teacher:
        return []
    cs, ct = _cuts(student, length), _cuts(teacher, length)
    groups, i, j, gi, gj = [], 0, 0, 0, 0
    while i < len(cs) and j < len(ct):
        (slo, shi), (tlo, thi) = cs[i], ct[j]
        if shi < slo:  # no cut allowed after student piece i
            i += 1
        elif thi < tlo:
            j += 1
        elif max(slo, tlo) <= min(shi, thi):  # a common cut
            groups.append(Group(student[gi].index, teacher[gj].index, i + 1 - gi, j + 1 - gj))
            i, j = i + 1, j + 1
            gi, gj = i, j
        elif shi < tlo:
            i += 1
        else:
            j += 1
    groups.append(Group(student[gi].index, teacher[gj].index, len(student) - gi, len(teacher) - gj))
    return groups


def pieces(offsets, indices, start: int, length: int) -> list[Piece]:
    """The target tokens ``indices`` of a sequence whose response text begins at character ``start``
    of the rendered string and runs ``length`` characters: tokens from the response's end on are its tail."""
    out = []
    for t in indices:
        a, b = offsets[t]
        out.append(Piece(t, max(a - start, 0), max(b - start, 0), tail=a >= start + length))
    return out


def aligned_positions(student: Encoded, teacher: Encoded, vocab: VocabularyMap) -> list[tuple[int, int, bool]]:
    """(student index, teacher index, matched) of the first token of every group of the two encodings'
    segments (the k-th response of one with the k-th of the other), for groups whose first token both
    sequences hold and have context for (index >= 1: a sequence's first token is predicted from nothing)."""
    out = []
    for s, t, length in zip(student.segments, teacher.segments, student.lengths):
        for g in align(s, t, length):
            for a, b, matched in _split_identical(g, student.ids, teacher.ids, vocab):
                if 1 <= a < len(student.ids) and 1 <= b < len(teacher.ids):
                    out.append((a, b, matched))
    return out


def _split_identical(g: Group, student_ids: list[int], teacher_ids: list[int], vocab: VocabularyMap) -> list[tuple[int, int, bool]]:
    """A group as (student index, teacher index, matched) of its first tokens; a group of n tokens on each
    side that are the same bytes pairwise (a character that both split into the same byte tokens) is n
    matched groups of one: after each of those tokens both models have read the same bytes."""
    # a group's tokens are consecutive target tokens that the (truncated) sequences hold
    pairs = [(g.student + i, g.teacher + i) for i in range(g.student_tokens)] if g.student_tokens == g.teacher_tokens else []
    if pairs and all(vocab.matched(teacher_ids[b], student_ids[a]) for a, b in pairs):
        return [(a, b, True) for a, b in pairs]  # a group of one matched token on each side is the case n = 1
    return [(g.student, g.teacher, False)]


# -- the two vocabularies -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id stands for in text (None for special and added tokens, which are not text).

    Byte-level BPE (GPT-2, Qwen, SmolLM2, Llama 3) spells bytes with a printable alphabet;
    SentencePiece (Llama 2, Mistral) writes a space as "▁" and unknown bytes as "<0xNN>". Other
    tokenizers fall back on decoding each id alone.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    kinds = {d.get("type") for d in (decoder.get("decoders", [decoder]) if decoder else [])}
    special = set(tokenizer.all_special_ids) | {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        for i, tok in enumerate(tokens):
            ok = i not in special and tok is not None and all(c in table for c in tok)
            out.append(bytes(table[c] for c in tok) if ok else None)
    elif "ByteFallback" in kinds or "Metaspace" in kinds:
        for i, tok in enumerate(tokens):
            if i in special or tok is None:
                out.append(None)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(bytes([int(tok[3:5], 16)]))
            else:
                out.append(tok.replace("▁", " ").encode())
    else:
        for i in range(len(tokens)):
            text = None if i in special else tokenizer.decode([i])
            out.append(text.encode() if text and "\ufffd" not in text else None)
    return out


def token_keys(tokenizer) -> list[bytes | str | None]:
    """What each id stands for, for comparing vocabularies: its bytes of text (:func:`token_bytes`), or for a
    special or added token its string (a ``str``, which never equals the ``bytes`` of a text token)."""
    keys: list[bytes | str | None] = list(token_bytes(tokenizer))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for i, tok in zip(sorted(special), tokenizer.convert_ids_to_tokens(sorted(special))):
        if i < len(keys) and tok:
            keys[i] = tok
    return keys


def _ids_by_key(keys: list) -> dict:
    """Each key's ids, the later id first: where a vocabulary spells the same bytes twice (SentencePiece's
    byte-fallback ``<0x2C>`` beside ``,``), the merged token the tokenizer actually emits comes first."""
    out: dict = {}
    for i in range(len(keys) - 1, -1, -1):
        if keys[i] is not None:
            out.setdefault(keys[i], []).append(i)
    return out


class VocabularyMap:
    """A teacher's tokenizer beside the student's, and the tokens the two vocabularies share: ids whose
    tokens stand for the same bytes of text, and special tokens spelled alike (:func:`token_keys`).

    ``teacher_ids[j]`` and ``student_ids[j]`` are the j-th shared token in the two vocabularies (the
    hybrid objective gathers these logit columns). The ids of one key are paired in order, the
    merged token first (:func:`_ids_by_key`): a byte-fallback spelling is shared only where the
    other vocabulary spells those bytes twice too. So one tokenizer on both sides shares every id
    with itself. :meth:`matched` compares two tokens' keys.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher_tokenizer = teacher_tokenizer  # the data encodes each record with it too
        self.teacher_keys, self.student_keys = token_keys(teacher_tokenizer), token_keys(student_tokenizer)
        self.teacher_size = len(self.teacher_keys)  # the teacher's logits kept (padded rows past it are no token)
        student_of = _ids_by_key(self.student_keys)
        pairs = sorted(pair for key, ids in _ids_by_key(self.teacher_keys).items() for pair in zip(ids, student_of.get(key, ())))
        self.teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        self.student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        self._on_device: dict[str, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def matched(self, teacher_id: int, student_id: int) -> bool:
        """Whether the two tokens stand for the same thing: the same bytes of text, or special tokens spelled alike."""
        key = self.teacher_keys[teacher_id] if teacher_id < len(self.teacher_keys) else None
        return key is not None and student_id < len(self.student_keys) and self.student_keys[student_id] == key

    def to(self, device) -> tuple[Tensor, Tensor]:
        """The shared ids on ``device``, copied there once (every training step asks for them)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.teacher_ids.to(device), self.student_ids.to(device))
        return self._on_device[key]
