"""The one tokenised layout every data source produces: a :class:`Record` per sequence.

A record is a token sequence with a mask of the tokens that are targets (the response, an
assistant turn, or every token of plain text), the length of the prompt that generation starts
from, and the texts that evaluation shows and scores against. The DataModule turns records into
batches; it never needs to know which file format or task a record came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Record:
    """One tokenised sequence.

    ``input_ids``: the whole sequence (special tokens included). ``targets[t]``: token t is a
    label (it is predicted by the logits at t − 1; ``targets[0]`` is never used). ``prompt_len``:
    generation continues ``input_ids[:prompt_len]`` and the reference is what follows; 0 for plain
    text, which has no prompt (perplexity only). ``prompt`` / ``answer``: the prompt and the
    reference response as text (the samples table, ROUGE, the checker). ``domain``: its domain.
    """

    input_ids: tuple[int, ...]
    targets: tuple[bool, ...]
    prompt_len: int
    domain: str
    prompt: str = ""
    answer: str = ""
    # across tokenizers (kdlab/data/alignment.py): the teacher's own tokenisation of the record, and
    # (student index, teacher index, matched) of each aligned group's first token
    teacher_ids: tuple[int, ...] = ()
    aligned: tuple[tuple[int, int, bool], ...] = ()

    def __post_init__(self):
        if len(self.input_ids) != len(self.targets):
            raise ValueError(f"a record needs one target flag per token, got {len(self.input_ids)} and {len(self.targets)}")

    @property
    def response_len(self) -> int:
        """Tokens after the prompt (what generation has to produce), 0 without a prompt."""
        return len(self.input_ids) - self.prompt_len if self.prompt_len else 0

    @property
    def num_targets(self) -> int:
        return sum(self.targets[1:])


@dataclass(frozen=True)
class Piece:
    """A target token of a segment: its index in the sequence and its character range relative to the
    response's start; the tail (the end-of-turn token and template text after the response) has ``tail``."""

    index: int
    start: int
    end: int
    tail: bool = False


@dataclass
class Encoded:
    """A record as one tokenizer encodes it, before it becomes a :class:`Record`: the sequence, its
    targets, and its responses as segments of target tokens (``segments[k]``: the pieces of the k-th
    response, whose text has ``lengths[k]`` characters), which alignment across tokenizers reads."""

    ids: list[int]
    targets: list[bool]
    prompt_len: int
    prompt: str = ""
    answer: str = ""
    end_token: int = -1
    segments: list[list[Piece]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def prompt_answer_record(domain: str, prompt_ids: list[int], answer_ids: list[int], prompt: str = "", answer: str = "") -> Record:
    """``prompt_ids + answer_ids`` with the answer as the targets (loss on the response only)."""
    return Record(
        input_ids=tuple(prompt_ids + answer_ids),
        targets=(False,) * len(prompt_ids) + (True,) * len(answer_ids),
        prompt_len=len(prompt_ids),
        domain=domain,
        prompt=prompt,
        answer=answer,
    )


def utf8_lines(path: Path, where: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; bytes that are not UTF-8 are an error naming the line."""
    with Path(path).open("rb") as f:  # decoded line by line, so that bad bytes are reported with their line
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}, line {n}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                    "save the file as UTF-8"
                ) from None


def json_lines(path: Path, what: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file; a line that is not a JSON object
    is an error naming the file (after ``what``, e.g. "prompts") and the line."""
    where = f"{what} {path}" if what else str(path)
    for n, line in utf8_lines(path, where):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}, line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}, line {n}: a record must be a JSON object, got {type(record).__name__}")
        yield n, record
