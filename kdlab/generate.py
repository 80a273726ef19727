"""Write a pretrained teacher's answers to prompts as chat data: sequence-level KD (SeqKD, MiniLLM).

    python -m kdlab.generate model=hf model.teacher.path=/models/teacher prompts=prompts.jsonl out=chat.jsonl
    python -m kdlab.generate model=smollm2 prompts=<corpus>/chat/prompts.jsonl out=chat.jsonl
    python -m kdlab.generate ... do_sample=true temperature=0.7 top_p=0.9 seed=1   # sampled answers
    python -m kdlab.train model=hf ... data=files data.train=chat.jsonl           # distil on them
    python -m kdlab.train model=smollm2 data=python_corpus data.chat=chat.jsonl   # + the corpus's text domains

``prompts``: JSONL of ``{"prompt", optional "domain", optional "id"}`` records, or of ``{"messages"}``
records whose last turn is the user's. ``out`` gets one ``{"messages": [user turn(s), assistant],
"domain", "id"}`` line per answered prompt, the format ``data=files`` reads. Each prompt is
rendered by the tokenizer's chat template and answered greedily (``do_sample=true``: sampled) up
to the end-of-turn token. An answer that has not ended within ``max_new_tokens`` is not written
(a cut-off answer teaches the student to stop mid-sentence); it is recorded, with empty answers
and answers the chat template cannot render back, in ``<out stem>.unfinished.jsonl``.

A run is resumable: it appends to ``out`` and skips the prompts already answered (or recorded as
unfinished; those are tried again with a larger ``max_new_tokens``). Prompts are batched by
length over the whole prompt set, and a batch is always generated whole, so a prompt's answer
never depends on where an earlier run stopped: a run in parts (``limit``) writes the same lines,
in the same order, as one run. ``<out stem>.settings.json`` records the teacher and the sampling
settings; a resumed run with others is refused rather than mixed into one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import kdlab.resolvers  # noqa: F401  (the configs' resolvers: run folders, model=smollm2's file)
from kdlab.data.records import json_lines
from kdlab.errors import stop_for_user_error

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Prompt:
    """A conversation to answer (its last turn is the user's), with its id, domain and input line."""

    id: str
    domain: str
    messages: tuple[dict, ...]
    line: int


# --- reading and checking the input (before any model is loaded) ----------------------------------


def read_prompts(path: str | Path, default_domain: str = "default") -> list[Prompt]:
    """The prompts of a JSONL file, checked: every error names the file and the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts file {str(path)!r} does not exist; give a JSONL of {{\"prompt\": ...}} records "
            "(python -m kdlab.data.corpus OUT_DIR writes OUT_DIR/chat/prompts.jsonl)"
        )
    prompts, lines_of = [], {}
    for n, record in json_lines(path, "prompts file"):
        where = f"{path}, line {n}"
        if "messages" in record:
            turns = record["messages"]
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
            for i, turn in enumerate(turns):
                if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                    raise ValueError(f"{where}: turn {i} of 'messages' must be {{role: one of {list(ROLES)}, content: a string}}, got {turn!r}")
            if turns[-1]["role"] != "user":
                raise ValueError(f"{where}: the last turn is the {turns[-1]['role']}'s; a prompt to answer ends with the user's turn")
            messages = tuple({"role": t["role"], "content": t["content"]} for t in turns)
        elif "prompt" in record:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {record['prompt']!r}")
            messages = ({"role": "user", "content": record["prompt"]},)
        else:
            raise ValueError(f"{where}: no 'prompt' field (nor 'messages'); fields found: {sorted(record)}")
        if record.get("id") is not None:
            id_ = str(record["id"])
        else:  # the content's hash: stable when prompts are added or reordered, so a rerun still resumes
            id_ = "sha-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        if id_ in lines_of:
            explained = "" if record.get("id") is not None else " (the same prompt, without ids)"
            raise ValueError(f"{where}: id {id_!r} is also on line {lines_of[id_]}{explained}; ids must be unique, a rerun resumes by them")
        lines_of[id_] = n
        domain = record.get("domain")
        prompts.append(Prompt(id_, str(domain) if domain is not None else default_domain, messages, n))
    if not prompts:
        raise ValueError(f"prompts file {path} has no records")
    return prompts


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """``chat.jsonl`` -> (``chat.unfinished.jsonl``, ``chat.settings.json``)."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.unfinished.jsonl"), out.with_name(f"{stem}.settings.json")


def read_done(out: Path) -> set[str]:
    """Ids already answered in ``out``. A torn last line (a run killed while writing) is cut off and redone."""
    if not out.exists():
        return set()
    if out.is_dir():
        raise IsADirectoryError(f"out={out} is a folder; give the JSONL file to write")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s ends with a partial line (a run stopped while writing it); it is removed and its prompt answered again", out)
        with out.open("r+b") as f:
            f.truncate(cut)
    return {str(record.get("id")) for _, record in json_lines(out, "output file")}


def read_unfinished(path: Path, max_new_tokens: int) -> set[str]:
    """Ids recorded as unfinished that this run does not retry: all but those cut off at a smaller budget."""
    if not path.exists():
        return set()
    return {
        str(r.get("id"))
        for _, r in json_lines(path, "unfinished file")
        if not (r.get("reason") == "max_new_tokens" and int(r.get("max_new_tokens", 0)) < max_new_tokens)
    }


def check_settings(path: Path, settings: dict, resuming: bool) -> None:
    """Refuse to resume a file written with another teacher or other sampling settings."""
    if path.is_file():
        recorded = json.loads(path.read_text())
        if resuming and recorded != settings:
            differing = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            raise ValueError(
                f"{path} records other settings ({differing}) than this run's: its answers came from another teacher or "
                "sampling. Write to another out file, or pass the recorded settings to continue it."
            )
        if recorded == settings:
            return
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


# --- generating -----------------------------------------------------------------------------------


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's eos and the chat template's end-of-turn token (the first special token after
    an assistant turn's text, as kdlab.data.files finds it)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = "kdlab probe answer"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "kdlab probe"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    end = rendered.rfind(probe) + len(probe)
    special = set(tokenizer.all_special_ids)
    after = [i for i, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if start >= end and i in special]
    if after and after[0] not in stops:
        stops.append(after[0])
    if not stops:
        raise ValueError("the tokenizer has no eos token and its chat template no end-of-turn token: answers could not end")
    return stops


def render(tokenizer, prompt: Prompt) -> list[int]:
    text = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plan(prompts: list[Prompt], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of prompt indices, longest first (similar lengths pad little; an out-of-memory shows
    at once), ties by input line; fixed by the whole prompt set, whatever is done already."""
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], prompts[i].line))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generation_config(cfg: DictConfig, stops: list[int], pad_id: int):
    """The run's settings, explicit: the model's own generation_config would otherwise fill in its
    defaults (a repetition penalty, top_k=50), and the data would depend on more than this config."""
    from transformers import GenerationConfig

    settings = {"max_new_tokens": cfg.max_new_tokens, "do_sample": bool(cfg.do_sample), "num_beams": 1,
                "repetition_penalty": 1.0, "eos_token_id": stops, "pad_token_id": pad_id}
    if cfg.do_sample:
        settings.update(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=0)
    return GenerationConfig(**settings)


def answer_batch(model, tokenizer, batch: list[list[int]], config, stops: list[int], seed: int | None):
    """(text, reason) per prompt: reason None for a finished answer, else why it is left out."""
    import torch

    width = max(len(ids) for ids in batch)
    pad = config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    results = []
    for row in output[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        results.append((text, "max_new_tokens" if end is None else "empty" if not text else None))
    return results


def renders_back(tokenizer, messages: list[dict]) -> bool:
    """The answer is found in the chat template's rendering of the conversation (kdlab.data.files
    needs it; some templates rewrite answers, e.g. drop a reasoning block)."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    return messages[-1]["content"] in rendered


def _batch_seed(seed: int, ids: list[str]) -> int:
    """The sampling seed of a batch: from the run's seed and the batch's prompts, so a batch
    generated again on resume samples the same answers."""
    return int(hashlib.sha256(json.dumps([seed, ids]).encode()).hexdigest()[:15], 16)


def generate(cfg: DictConfig) -> dict[str, int]:
    """Answer ``cfg.prompts`` into ``cfg.out``; returns the counts of the summary."""
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    if cfg.model.get("teacher_training"):
        raise ValueError(
            "this model group's teacher is trained on demand by python -m kdlab.train (model.teacher_training is set); "
            "generation needs a pretrained teacher: model=smollm2, or model=hf model.teacher.path=<folder>"
        )
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ValueError(f"batch_size, max_new_tokens and limit must be >= 1, got {cfg.batch_size}, {cfg.max_new_tokens}, {cfg.limit}")
    if cfg.do_sample and not (cfg.temperature > 0 and 0 < cfg.top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got {cfg.temperature}, {cfg.top_p}")
    prompts = read_prompts(cfg.prompts, cfg.default_domain)
    out = Path(cfg.out).expanduser()
    unfinished_path, settings_path = sidecar_paths(out)
    done = read_done(out)
    skipped = done | read_unfinished(unfinished_path, cfg.max_new_tokens)
    settings = {  # what makes the answers (not where a converted GGUF is cached)
        role: {k: v for k, v in OmegaConf.to_container(cfg.model[role], resolve=True).items() if k != "cache_dir"}
        for role in ("teacher", "tokenizer")
    } | {
        "do_sample": bool(cfg.do_sample),
        **({"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed} if cfg.do_sample else {}),
    }
    todo = {i for i, p in enumerate(prompts) if p.id not in skipped}
    counts = {"prompts": len(prompts), "skipped_done": len(prompts) - len(todo), "written": 0,
              "unfinished": 0, "empty": 0, "unrenderable": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    check_settings(settings_path, settings, resuming=bool(skipped))
    if not todo:
        _summary(counts, out, unfinished_path)
        return counts

    import torch

    tokenizer = instantiate(cfg.model.tokenizer)
    if not tokenizer.chat_template:
        raise ValueError("the teacher's tokenizer has no chat template; kdlab.generate renders every prompt as a chat")
    rendered = [render(tokenizer, p) for p in prompts]
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model = instantiate(cfg.model.teacher, tokenizer=tokenizer)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    config = generation_config(cfg, stops, pad)

    budget = min(len(todo), cfg.limit or len(todo))
    bar = tqdm(total=budget, unit="prompt", desc=f"answering into {out.name}")
    processed = 0
    with out.open("a", encoding="utf-8") as answers, unfinished_path.open("a", encoding="utf-8") as unfinished:
        for batch in plan(prompts, [len(ids) for ids in rendered], cfg.batch_size):
            wanted = [i for i in batch if i in todo]
            if not wanted:
                continue
            # the whole planned batch, done prompts too: its composition (padding) stays what it
            # is in an uninterrupted run, so the answers are too
            seed = _batch_seed(cfg.seed, [prompts[i].id for i in batch]) if cfg.do_sample else None
            results = dict(zip(batch, answer_batch(model, tokenizer, [rendered[i] for i in batch], config, stops, seed)))
            for i in wanted[: budget - processed]:
                p = prompts[i]
                text, reason = results[i]
                messages = [*p.messages, {"role": "assistant", "content": text}]
                if reason is None and not renders_back(tokenizer, messages):
                    reason = "unrenderable"
                if reason is None:
                    answers.write(json.dumps({"messages": messages, "domain": p.domain, "id": p.id}, ensure_ascii=False) + "\n")
                    counts["written"] += 1
                else:
                    record = {"id": p.id, "domain": p.domain, "reason": reason, "max_new_tokens": cfg.max_new_tokens, "messages": messages}
                    unfinished.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts["unfinished" if reason == "max_new_tokens" else reason] += 1
                processed += 1
                bar.update(1)
            answers.flush()
            unfinished.flush()
            if processed >= budget:
                break
    bar.close()
    _summary(counts, out, unfinished_path)
    return counts


def _summary(counts: dict[str, int], out: Path, unfinished: Path) -> None:
    left_out = counts["unfinished"] + counts["empty"] + counts["unrenderable"]
    line = (
        f"{out}: {counts['written']} answers written, {counts['skipped_done']} prompts skipped (answered or recorded before), "
        f"{counts['unfinished']} unfinished within max_new_tokens"
        + (f", {counts['empty']} empty, {counts['unrenderable']} not rendered back by the chat template" if counts["empty"] or counts["unrenderable"] else "")
        + (f" (left out; listed in {unfinished})" if left_out else "")
        + f"; {counts['prompts']} prompts in all"
    )
    print(line)
    log.info(line)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    except Exception as err:
        stop_for_user_error(err, log)  # a mistake of the user's: the message alone, exit status 2
        raise


if __name__ == "__main__":
    main()
