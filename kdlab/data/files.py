"""Your own data: JSONL, JSON, Parquet, CSV files or ``save_to_disk`` folders, split by domain.

    python -m kdlab.train model=hf ... data=files data.train=chat.jsonl
    python -m kdlab.train ... data=files 'data.train={math: m/*.jsonl, code: c.parquet}' data.val=val.jsonl

Each file is read with the ``datasets`` library and tokenised with ``Dataset.map``, so a file's
tokenised form is cached (in ``HF_DATASETS_CACHE``) under a fingerprint of the file, the tokenizer
and these settings, and a second run skips the tokenisation. Record formats, detected per file
from its fields (``data.format`` forces one, ``data.fields`` renames the fields):

- ``messages``: a list of ``{role, content}`` turns, rendered by the tokenizer's chat template;
  every assistant turn is a target (up to and including its end-of-turn token);
- ``prompt`` / ``response``: rendered as a one-turn chat when the tokenizer has a chat template
  (``data.chat_template``: auto | true | false), else ``prompt`` then ``response <eos>``; the
  response is the target;
- ``text``: plain language-model data, every token a target; ``data.packing`` concatenates a
  domain's texts and cuts them into ``max_length`` blocks.

A record longer than ``data.max_length`` loses its prompt from the left (the response is kept
whole); one whose response cannot fit is dropped. Both are counted and logged, never trained on
silently. Generation (evaluation, rollouts) starts where the last response starts and stops at
the template's end-of-turn token.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdlab.data.alignment import VocabularyMap, aligned_positions, pieces
from kdlab.data.datamodule import KDDataModule
from kdlab.data.records import Encoded, Record, json_lines, utf8_lines

log = logging.getLogger(__name__)

FORMATS = ("messages", "prompt_response", "text")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_FORMATS = (".jsonl", ".json", ".csv")  # read as text: a decoding error is located line by line
ROLES = ("system", "user", "assistant", "tool")
RECIPE_VERSION = 5  # bump when the encoding below changes: cached tokenisations are then rebuilt
STATUSES = ("ok", "truncated", "dropped")  # what truncation did to a record, from least to most
TURN_MARKER = "\ue000kdlab-turn\ue001"  # private-use characters: in no real conversation


@dataclass(frozen=True)
class Source:
    """One file (or ``save_to_disk`` folder) and the domain its path mapping gives it (None: from the records)."""

    path: Path
    domain: str | None

    def where(self, row: int) -> str:
        """How a user finds record ``row`` of this file: its line for JSONL, its row otherwise."""
        return f"{self.path}, line {row + 1}" if self.path.suffix == ".jsonl" else f"{self.path}, row {row}"


def domain_name(value, where: str) -> str:
    """A domain as kdlab names it in metrics (``val/<domain>/ppl``): a non-empty string without ``/``
    (an integer is written as one, so that a column mixing 1 and "1" gives one domain)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: a domain must be a string, got {type(value).__name__} {str(value)[:60]!r}")
    name = str(value)
    if not name.strip() or "/" in name:
        raise ValueError(
            f"{where}: domain {name!r} is not a usable name: it must be non-empty and contain no '/' (it names the "
            "per-domain metrics, e.g. val/<domain>/ppl); rename it"
        )
    return name


def resolve(spec, name: str) -> list[Source]:
    """``spec``: a path, a glob, a list of them, or a mapping ``domain -> path(s)``."""
    if spec is None:
        return []
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        return [s for domain, paths in spec.items() for s in _expand(paths, name, domain_name(domain, f"data.{name}"))]
    return _expand(spec, name, None)


def _expand(paths, name: str, domain: str | None) -> list[Source]:
    out = []
    for pattern in [paths] if isinstance(paths, (str, Path)) else list(paths):
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(str(pattern)) else [pattern]
        if not matches:
            raise FileNotFoundError(f"data.{name}: no file matches {pattern!r}")
        for match in matches:
            path = Path(match).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"data.{name}: {path} does not exist; give a path to a data file or folder")
            if path.is_dir() and not (path / "dataset_info.json").is_file():
                raise ValueError(
                    f"data.{name}: {path} is a folder but not one written by Dataset.save_to_disk (no dataset_info.json); "
                    f"give its files instead, e.g. '{path}/*.jsonl'"
                )
            if path.is_file() and path.suffix not in BUILDERS:
                raise ValueError(f"data.{name}: {path} has an unknown extension; kdlab reads {sorted(BUILDERS)} files")
            out.append(Source(path, domain))
    return out


def read(source: Source):
    """The file as a ``datasets.Dataset``, with malformed input reported by file and line."""
    import datasets

    path = source.path
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(table)}; give one split's folder, e.g. {path}/{next(iter(table))}")
    else:
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty; remove it from the data config or add records")
        try:
            table = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # find the broken line ourselves: pyarrow's message does not name it
            if path.suffix == ".jsonl":
                _raise_on_bad_json_line(path)
            raise ValueError(f"{path} could not be read as {path.suffix[1:]}: {err}") from err
    if len(table) == 0:
        raise ValueError(f"{path} has no records")
    return table


def _raise_on_bad_json_line(path: Path) -> None:
    for _ in json_lines(path):
        pass


@dataclass(frozen=True)
class Encoding:
    """How records become token sequences (``kdlab/conf/data/files.yaml``)."""

    max_length: int
    format: str = "auto"
    fields: Mapping[str, str] | None = None  # messages, prompt, response, text -> the file's field names
    chat_template: str | bool = "auto"
    domain_field: str = "domain"
    default_domain: str = "default"

    def field(self, name: str) -> str:
        return (self.fields or {}).get(name, name)


class Encoder:
    """Tokenises the records of one file in one format (a ``Dataset.map`` function, batched).

    With a ``teacher`` tokenizer (distillation across tokenizers), each record is also encoded by
    the teacher's tokenizer, through its own chat template, and the two encodings' responses are
    aligned (kdlab/data/alignment.py): once per record, cached with the tokenisation.
    """

    def __init__(self, tokenizer, encoding: Encoding, source: Source, fmt: str, teacher=None, vocab: VocabularyMap | None = None):
        self.tok, self.enc, self.source, self.fmt = tokenizer, encoding, source, fmt
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
        self.use_template = fmt == "messages" or (fmt == "prompt_response" and _wants_template(tokenizer, encoding))
        self.teacher = Encoder(teacher, encoding, source, fmt) if teacher is not None else None
        self.vocab = vocab

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        # "record_domain", not "domain": datasets would give it the input column's feature (e.g. Json, which reads "1" as 1)
        columns = ("input_ids", "targets", "prompt_len", "prompt", "answer", "record_domain", "status", "end_token", "teacher_ids", "aligned")
        out = {k: [] for k in columns}
        for n, row in enumerate(indices):
            record = {k: v[n] for k, v in batch.items()}
            encoded, status = self.truncate(self.encode(record, row))
            teacher_ids, aligned = [], []
            if self.teacher is not None:
                theirs, their_status = self.teacher.truncate(self.teacher.encode(record, row))
                status = max(status, their_status, key=STATUSES.index)  # the record's worst fate on either side
                teacher_ids, aligned = theirs.ids, [list(a) for a in aligned_positions(encoded, theirs, self.vocab)]
            domain = self.source.domain if self.source.domain is not None else record.get(self.enc.domain_field)
            domain = self.enc.default_domain if domain is None else domain_name(domain, self.source.where(row))
            e = encoded
            for key, value in zip(out, (e.ids, e.targets, e.prompt_len, e.prompt, e.answer, domain, status, e.end_token, teacher_ids, aligned)):
                out[key].append(value)
        return out

    def encode(self, record: dict, row: int) -> Encoded:
        if self.fmt == "text":
            text = self._string(record, "text", row)
            body = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = self.bos + body["input_ids"] + [self.tok.eos_token_id]
            offsets = [(0, 0)] * len(self.bos) + body["offset_mapping"] + [(len(text), len(text))]
            segment = pieces(offsets, range(len(self.bos), len(ids)), 0, len(text))
            return Encoded(ids, [True] * len(ids), 0, segments=[segment], lengths=[len(text)])
        if self.fmt == "prompt_response":
            prompt, response = self._string(record, "prompt", row), self._string(record, "response", row)
            if self.use_template:
                return self._chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], row)
            prompt_ids = self.bos + self.tok(prompt, add_special_tokens=False)["input_ids"]
            if not prompt_ids:  # no prompt and no BOS: nothing to condition on, and it would pass for plain text
                raise ValueError(
                    f"{self.source.where(row)}: the prompt is empty and the tokenizer adds no BOS token, so the record has "
                    "no prompt to answer; give it a prompt, or put the response in a text record (data.format=text)"
                )
            answer = self.tok(response, add_special_tokens=False, return_offsets_mapping=True)
            answer_ids = answer["input_ids"] + [self.tok.eos_token_id]
            ids = prompt_ids + answer_ids
            offsets = [(0, 0)] * len(prompt_ids) + answer["offset_mapping"] + [(len(response), len(response))]
            segment = pieces(offsets, range(len(prompt_ids), len(ids)), 0, len(response))
            targets = [False] * len(prompt_ids) + [True] * len(answer_ids)
            return Encoded(ids, targets, len(prompt_ids), prompt, response, segments=[segment], lengths=[len(response)])
        return self._chat(self._messages(record, row), row)

    def _string(self, record: dict, name: str, row: int) -> str:
        field = self.enc.field(name)
        value = record.get(field)
        if value is None:
            found = sorted(k for k, v in record.items() if v is not None)
            raise ValueError(f"{self.source.where(row)}: field {field!r} is missing ({self.fmt} records need it); fields found: {found}")
        if not isinstance(value, str):
            raise ValueError(f"{self.source.where(row)}: field {field!r} must be a string, got {type(value).__name__}")
        return value

    def _messages(self, record: dict, row: int) -> list[dict]:
        field = self.enc.field("messages")
        turns = record.get(field)
        where = self.source.where(row)
        if not isinstance(turns, list) or not turns:
            found = sorted(k for k, v in record.items() if v is not None)
            raise ValueError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} turns; fields found: {found}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
                raise ValueError(f"{where}: turn {i} of {field!r} must be {{role: one of {list(ROLES)}, content: a string}}, got {turn!r}")
        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
        if not any(t["role"] == "assistant" for t in turns):
            raise ValueError(f"{where}: no assistant turn (roles: {[t['role'] for t in turns]}); a chat record needs a response to learn")
        return turns

    def _chat(self, turns: list[dict], row: int):
        """The conversation through the chat template; every assistant turn is a target span.

        Each assistant turn is located from the template's own structure, never by searching its
        text (a short answer such as "a" or "think" also occurs in the template's headers): the
        conversation is rendered again with that turn's content replaced by a marker, and the
        answer starts where the marker does (the two renderings agree up to there). Its span runs
        from there to its end-of-turn token (the first special token after it), so whatever the
        template puts before an answer (a role header, an empty reasoning block) is context, not
        target. Generation starts where the last answer's text starts.
        """
        where = self.source.where(row)
        if not self.tok.chat_template:
            raise ValueError(
                f"{where}: {self.fmt} records need a chat template, and this tokenizer has none; "
                "use prompt/response records with data.chat_template=false, or give the tokenizer a template"
            )
        full = self.tok.apply_chat_template(turns, tokenize=False)
        encoded = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        special = set(self.tok.all_special_ids)
        targets = [False] * len(ids)
        prompt_len, end_token = len(ids), -1
        segments, lengths = [], []
        for i, turn in enumerate(turns):
            text = turn["content"].strip()
            if not text:
                if turn["role"] == "assistant":
                    raise ValueError(f"{where}: assistant turn {i} is empty; there is nothing to learn from it")
                continue
            if turn["role"] != "assistant":
                continue
            at = self._answer_start(turns, i, full, where)
            cursor = at + len(text)
            span = [t for t, (a, _) in enumerate(offsets) if at <= a < cursor or (a < at < offsets[t][1])]
            end = next((t for t in range(span[-1] + 1, len(ids)) if ids[t] in special), None) if span else None
            if end is not None:  # the end-of-turn token is a target: it is how the model learns to stop
                span += list(range(span[-1] + 1, end + 1))
                end_token = ids[end]
            for t in span:
                targets[t] = True
            prompt_len = span[0] if span else len(ids)
            segments.append(pieces(offsets, span, at, len(text)))
            lengths.append(len(text))
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        asked = next((t["content"] for t in reversed(turns[:last]) if t["role"] != "assistant"), "")
        return Encoded(ids, targets, prompt_len, asked, turns[last]["content"], end_token, segments, lengths)

    def _answer_start(self, turns: list[dict], i: int, full: str, where: str) -> int:
        """Where assistant turn ``i``'s (stripped) text starts in ``full``, the rendered conversation."""
        marked = self.tok.apply_chat_template([*turns[:i], {**turns[i], "content": TURN_MARKER}, *turns[i + 1 :]], tokenize=False)
        at = marked.find(TURN_MARKER)
        raw, text = turns[i]["content"], turns[i]["content"].strip()
        if at >= 0 and marked[:at] == full[:at]:
            if full.startswith(raw, at):  # the template keeps the content as given
                return at + len(raw) - len(raw.lstrip())
            if full.startswith(text, at):  # the template strips it
                return at
        raise ValueError(
            f"{where}: the chat template rewrites assistant turn {i} (its rendering does not hold the turn's text where the "
            "turn goes), so its target tokens cannot be located; use prompt/response records or another template"
        )

    def truncate(self, e: Encoded) -> tuple[Encoded, str]:
        """Cut a too-long record's prompt from the left (plain text: its end); drop it if its response cannot fit.
        The segments keep the target tokens that remain, at their new indices."""
        limit, ids = self.enc.max_length, e.ids
        if len(ids) <= limit:
            return e, "ok"
        if e.prompt_len == 0:
            cut, kept = 0, slice(0, limit)
        elif len(ids) - e.prompt_len + 1 > limit:  # the response and at least one token to predict it from
            return Encoded([], [], 0, e.prompt, e.answer, e.end_token), "dropped"
        else:
            cut = len(ids) - limit
            kept = slice(cut, len(ids))
        segments = [[replace(p, index=p.index - cut) for p in seg if kept.start <= p.index < kept.stop] for seg in e.segments]
        return replace(e, ids=ids[kept], targets=e.targets[kept], prompt_len=max(e.prompt_len - cut, 0), segments=segments), "truncated"


def _wants_template(tokenizer, encoding: Encoding) -> bool:
    if encoding.chat_template == "auto":
        return bool(tokenizer.chat_template)
    if encoding.chat_template and not tokenizer.chat_template:
        raise ValueError("data.chat_template=true but the tokenizer has no chat template; set it to false or auto")
    return bool(encoding.chat_template)


def detect_format(columns: Sequence[str], source: Source, encoding: Encoding) -> str:
    if encoding.format != "auto":
        if encoding.format not in FORMATS:
            raise ValueError(f"data.format={encoding.format!r} is unknown; choose auto or one of {list(FORMATS)}")
        return encoding.format
    if encoding.field("messages") in columns:
        return "messages"
    if encoding.field("prompt") in columns and encoding.field("response") in columns:
        return "prompt_response"
    if encoding.field("text") in columns:
        return "text"
    raise ValueError(
        f"{source.path}: cannot tell the record format from its fields {sorted(columns)}; kdlab reads "
        f"{encoding.field('messages')!r} (chat), {encoding.field('prompt')!r} + {encoding.field('response')!r}, or "
        f"{encoding.field('text')!r}. Rename them with data.fields (e.g. data.fields.response=output) or set data.format."
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes its ids (the cache key of a tokenised file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)]
    parts += [str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    parts.append(str(getattr(tokenizer, "add_bos_token", None)))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def load_records(
    sources: list[Source], tokenizer, encoding: Encoding, name: str, num_proc: int | None = None, tok_hash: str | None = None, teacher=None
):
    """Every source's records, tokenised (cached by ``datasets``), with their counts per status.
    ``tok_hash``: the tokenizers' fingerprint, if the caller has it already (it serialises the whole tokenizer).
    ``teacher``: ``(teacher tokenizer, VocabularyMap)`` to encode and align each record for it too."""
    records, counts, end_tokens = [], Counter(), Counter()
    tok_hash = tok_hash or tokenizer_fingerprint(tokenizer)
    teacher_tok, vocab = teacher or (None, None)
    for source in sources:
        table = read(source)
        fmt = detect_format(table.column_names, source, encoding)
        encoder = Encoder(tokenizer, encoding, source, fmt, teacher_tok, vocab)
        settings = json.dumps([RECIPE_VERSION, tok_hash, fmt, encoding.__dict__, source.domain, str(source.path)], sort_keys=True, default=str)
        fingerprint = hashlib.sha256((table._fingerprint + settings).encode()).hexdigest()[:32]
        try:
            encoded = table.map(
                encoder,
                batched=True,
                with_indices=True,
                remove_columns=table.column_names,
                new_fingerprint=fingerprint,
                num_proc=num_proc,
                desc=f"tokenising {source.path.name}",
            )
        except UnicodeDecodeError:
            # the reader passes bytes that are not UTF-8 on to tokenisation, whose error names no line
            if source.path.suffix in TEXT_FORMATS:
                for _ in utf8_lines(source.path, str(source.path)):
                    pass
            raise
        columns = encoded.to_dict()  # column-wise: much faster than iterating rows
        counts.update(columns["status"])
        end_tokens.update(t for t in columns["end_token"] if t >= 0)
        fields = ("input_ids", "targets", "prompt_len", "record_domain", "prompt", "answer", "teacher_ids", "aligned", "status")
        for ids, targets, prompt_len, domain, prompt, answer, teacher_ids, aligned, status in zip(*(columns[f] for f in fields)):
            if status != "dropped":
                aligned = tuple((s, t, bool(m)) for s, t, m in aligned)
                records.append(Record(tuple(ids), tuple(targets), prompt_len, domain, prompt, answer, tuple(teacher_ids), aligned))
    if counts["truncated"] or counts["dropped"]:
        log.warning(
            "data.%s: %d of %d records were longer than data.max_length=%d: %d truncated (prompt cut from the left, "
            "plain text cut at the end), %d dropped (the response alone does not fit); raise data.max_length to keep them",
            name, counts["truncated"] + counts["dropped"], sum(counts.values()), encoding.max_length, counts["truncated"], counts["dropped"],
        )
    return records, counts, end_tokens


def pack(records: list[Record], max_length: int) -> list[Record]:
    """Plain-text records of each domain concatenated and cut into ``max_length`` blocks (the last may be shorter).

    Blocks attend across document boundaries (no per-document mask), the usual pre-training packing.
    """
    by_domain: dict[str, list[int]] = {}
    for r in records:
        if r.prompt_len:
            raise ValueError("data.packing applies to plain-text records only; this data has prompts")
        by_domain.setdefault(r.domain, []).extend(r.input_ids)
    return [
        Record(tuple(ids[i : i + max_length]), (True,) * len(ids[i : i + max_length]), 0, domain)
        for domain, ids in by_domain.items()
        for i in range(0, len(ids), max_length)
        if len(ids[i : i + max_length]) > 1
    ]


def hold_out(records: list[Record], fraction: float, limit: int, seed: int, name: str) -> tuple[list[Record], list[Record]]:
    """Split ``fraction`` of each domain's records off (at least 1, at most ``limit``), deterministically from ``seed``.

    A held-out record is one *distinct* tokenisation: its copies leave training with it (and are not held
    twice), so held-out metrics never score a record the model trained on. Without copies this is a plain
    shuffled split."""
    by_domain: dict[str, list[Record]] = {}
    for r in records:
        by_domain.setdefault(r.domain, []).append(r)
    kept, held = [], []
    for domain, items in sorted(by_domain.items()):
        distinct = len({r.input_ids for r in items})
        if distinct < 2:
            raise ValueError(
                f"domain {domain!r} has {distinct} distinct training record(s) ({len(items)} in all): too few to hold out "
                f"{name} data from; give data.{name} explicitly or add records"
            )
        order = list(range(len(items)))
        random.Random(f"{seed}-{name}-{domain}").shuffle(order)
        n = min(max(1, round(fraction * distinct)), limit, distinct - 1)
        chosen, contents = [], set()
        for i in order:
            if len(chosen) == n:
                break
            if items[i].input_ids not in contents:
                contents.add(items[i].input_ids)
                chosen.append(i)
        held += [items[i] for i in sorted(chosen)]
        kept_here = [r for r in items if r.input_ids not in contents]
        copies = len(items) - len(kept_here) - len(chosen)
        if copies:
            log.info("data.%s of domain %r: %d copies of its held-out records left data.train with them", name, domain, copies)
        kept += kept_here
    return kept, held


def read_splits(
    tokenizer,
    train,
    val=None,
    test=None,
    pretrain=None,
    format: str = "auto",
    fields: Mapping[str, str] | None = None,
    chat_template: str | bool = "auto",
    domain_field: str = "domain",
    default_domain: str = "default",
    packing: bool = False,
    holdout_fraction: float = 0.05,
    max_holdout: int = 256,
    num_proc: int | None = None,
    max_length: int = 1024,
    seed: int = 0,
    across: VocabularyMap | None = None,
) -> tuple[dict[str, list[Record]], list[Record] | None, int | None]:
    """Your files as record splits: ``({"train"|"val"|"test": records}, the pretrain records or None,
    the chat template's end-of-turn token or None)``. The settings are ``data=files``'s (kdlab/conf/data/files.yaml).
    ``across``: a teacher with another tokenizer (its tokenizer and the shared vocabulary); every record
    then also carries the teacher's tokenisation and the alignment of the two (kdlab/data/alignment.py)."""
    if not train:
        raise ValueError("data=files needs data.train: a path, a glob, or a mapping domain -> path(s)")
    if not 0.0 < holdout_fraction < 1.0 or max_holdout < 1:
        raise ValueError(f"data.holdout_fraction must be in (0, 1) and data.max_holdout >= 1, got {holdout_fraction}, {max_holdout}")
    if max_length < 2:
        raise ValueError(f"data.max_length must be >= 2, got {max_length}")
    fields = OmegaConf.to_container(fields) if isinstance(fields, DictConfig) else fields
    default_domain = domain_name(default_domain, "data.default_domain")
    encoding = Encoding(max_length, format, fields, chat_template, domain_field, default_domain)
    # every path is checked before any file is tokenised
    sources = {name: resolve(spec, name) for name, spec in (("train", train), ("val", val), ("test", test), ("pretrain", pretrain))}
    splits, end_tokens = {}, Counter()
    tok_hash = tokenizer_fingerprint(tokenizer)
    teacher = None
    if across is not None:
        if packing:
            raise ValueError("data.packing=true concatenates texts into blocks, which two tokenizers cut at different places; "
                             "across tokenizers set data.packing=false")
        teacher = (across.teacher_tokenizer, across)
        tok_hash += "-" + tokenizer_fingerprint(across.teacher_tokenizer)
    for name in ("train", "val", "test"):
        if sources[name]:
            splits[name], counts, ends = load_records(sources[name], tokenizer, encoding, name, num_proc, tok_hash, teacher)
            end_tokens.update(ends)
            if packing:
                splits[name] = pack(splits[name], max_length)
            if not splits[name]:
                raise ValueError(f"data.{name}: every record was dropped ({dict(counts)}); raise data.max_length")
    for name in ("val", "test"):
        if name not in splits:
            splits["train"], splits[name] = hold_out(splits["train"], holdout_fraction, max_holdout, seed, name)
    plain = None
    if sources["pretrain"]:
        text = Encoding(max_length, "text", fields, chat_template, domain_field, "pretrain")
        plain = pack(load_records(sources["pretrain"], tokenizer, text, "pretrain", num_proc, tok_hash)[0], max_length)
    _check_every_domain_evaluated(splits, sources)
    sizes = {name: Counter(r.domain for r in split) for name, split in splits.items()}
    log.info("data=files: %s", "; ".join(f"{n} {dict(sorted(c.items()))}" for n, c in sizes.items()))
    eos = end_tokens.most_common(1)[0][0] if end_tokens else None  # the chat template's end-of-turn token
    return splits, plain, eos


def _check_every_domain_evaluated(splits: dict, sources: dict) -> None:
    domains = {r.domain for r in splits["train"]}
    for name in ("val", "test"):
        missing = sorted(domains - {r.domain for r in splits[name]})
        if missing:
            files = ", ".join(str(s.path) for s in sources[name]) or "held out from data.train"
            raise ValueError(
                f"domain(s) {missing} have training records but no {name} records ({files}); every domain needs "
                f"{name} data (DDK weights domains by it). Add them, or leave data.{name} unset to hold them out of data.train."
            )


class FilesDataModule(KDDataModule):
    """The DataModule over your own files (``data=files``); see the module docstring for formats.

    ``train`` (required), ``val`` and ``test``: a path, a glob, a list, or a mapping domain -> paths.
    A split not given is held out from ``train``: ``holdout_fraction`` of each domain (at least 1,
    at most ``max_holdout`` records), deterministic from ``seed``. ``pretrain``: plain-text files
    for MiniLLM's pre-training term (default: the training sequences themselves). ``checker``:
    None (no greedy exact match) or e.g. :class:`kdlab.data.datamodule.ExactMatch`. The records
    come from :func:`read_splits` (its settings); every other argument is :class:`KDDataModule`'s.
    """

    def __init__(self, tokenizer, train=None, *, max_length: int = 1024, seed: int = 0, **kwargs):
        reading = {name: kwargs.pop(name) for name in READ_SETTINGS if name in kwargs}
        splits, plain, eos = read_splits(tokenizer, train, max_length=max_length, seed=seed, **reading)
        super().__init__(splits, tokenizer, max_length=max_length, seed=seed, pretrain=plain, eos_token_id=eos, **kwargs)


READ_SETTINGS = tuple(inspect.signature(read_splits).parameters)[2:]  # read_splits' own, beside KDDataModule's
