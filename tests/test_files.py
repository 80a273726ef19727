"""data=files: record formats, file types, domains, splits, truncation and malformed input, on real tokenizers."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from examples.tiny_pair import build
from examples.tiny_pair import tokenizer as family_tokenizer
from kdlab.data import files
from kdlab.data.files import Encoding, FilesDataModule, Source, load_records
from kdlab.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def gpt2():
    return family_tokenizer("gpt2")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def targets_text(tok, record):
    return tok.decode([i for i, t in zip(record.input_ids, record.targets) if t])


def one(tmp_path, tok, record, **encoding):
    path = write_jsonl(tmp_path / "one.jsonl", [record])
    records, counts, _ = load_records([Source(path, None)], tok, Encoding(**{"max_length": 256, **encoding}), "train")
    return records, counts


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And of Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ]
}


def test_messages_target_every_assistant_turn_and_its_end_of_turn_token(tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    [record], _ = one(tmp_path, tok, CHAT)
    # targets: each answer and the <|im_end|> closing it, nothing of the system or user turns
    assert targets_text(tok, record) == "Lima.<|im_end|>Santiago.<|im_end|>"
    assert tok.decode(record.input_ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    # generation starts where the last answer starts; the reference is that answer
    assert tok.decode(record.input_ids[record.prompt_len :]).startswith("Santiago.<|im_end|>")
    assert tok.decode(record.input_ids[: record.prompt_len]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (record.prompt, record.answer, record.domain) == ("And of Chile?", "Santiago.", "default")


@pytest.mark.parametrize("answer", ["a", "im", "think", "hi", "assistant", "in"])
def test_a_short_answer_is_located_by_the_templates_structure_not_found_in_its_header(tmp_path, qwen_tokenizer, answer):
    """Qwen's header '<|im_start|>assistant\n<think>\n\n</think>\n\n' holds 'a', 'im', 'think', 'assistant'."""
    tok = qwen_tokenizer
    chat = {"messages": [{"role": "user", "content": "Pick one: a or b?"}, {"role": "assistant", "content": answer},
                         {"role": "user", "content": "Again?"}, {"role": "assistant", "content": answer}]}
    [record], _ = one(tmp_path, tok, chat)
    assert targets_text(tok, record) == f"{answer.strip()}<|im_end|>" * 2
    assert tok.decode(record.input_ids[: record.prompt_len]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(record.input_ids[record.prompt_len :]).startswith(f"{answer.strip()}<|im_end|>")
    [single], _ = one(tmp_path, tok, {"prompt": "a or b?", "response": answer})
    assert targets_text(tok, single) == f"{answer.strip()}<|im_end|>"


def test_prompt_response_uses_the_chat_template_when_there_is_one(tmp_path, qwen_tokenizer):
    [record], _ = one(tmp_path, qwen_tokenizer, {"prompt": "2 + 2?", "response": "4"})
    assert targets_text(qwen_tokenizer, record) == "4<|im_end|>"
    [plain], _ = one(tmp_path, qwen_tokenizer, {"prompt": "2 + 2?", "response": " 4"}, chat_template=False)
    assert qwen_tokenizer.decode(plain.input_ids) == "2 + 2? 4<|im_end|>"  # plain concatenation, then <eos>


def test_prompt_response_without_a_template_is_concatenated_and_labels_count_the_response(tmp_path, gpt2):
    [record], _ = one(tmp_path, gpt2, {"prompt": "Q: 2 + 2?\nA:", "response": " 4"})
    assert gpt2.decode(record.input_ids) == "Q: 2 + 2?\nA: 4<|endoftext|>"
    assert targets_text(gpt2, record) == " 4<|endoftext|>"
    dm = FilesDataModule(gpt2, train=write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "response": f" {i}"} for i in range(20)]))
    batch = dm.collate(dm._dataset("train")[:1])
    counted = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert gpt2.decode(counted) == f" {dm.records['train'][0].answer.strip()}<|endoftext|>"


def test_text_counts_every_token_and_packs_into_blocks(tmp_path, gpt2):
    [record], _ = one(tmp_path, gpt2, {"text": "The cat sat on the mat."})
    assert all(record.targets) and record.prompt_len == 0 and gpt2.decode(record.input_ids).endswith("<|endoftext|>")
    texts = [{"text": f"Document number {i} is short."} for i in range(30)]
    dm = FilesDataModule(gpt2, train=write_jsonl(tmp_path / "t.jsonl", texts), packing=True, max_length=16)
    total = sum(len(gpt2(t["text"])["input_ids"]) + 1 for t in texts)
    lengths = [len(r.input_ids) for split in dm.records.values() for r in split]
    assert max(lengths) == 16 and sum(lengths) == total  # every token once, in 16-token blocks (the last shorter)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_every_file_type_reads_the_same_records(tmp_path, gpt2, kind):
    import datasets

    rows = [{"prompt": f"Q{i}:", "response": f" answer {i}", "domain": "ab"[i % 2]} for i in range(12)]
    path = tmp_path / f"data.{kind}"
    table = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    else:
        table.save_to_disk(str(path))
    records, _, _ = load_records(files.resolve(str(path), "train"), gpt2, Encoding(max_length=64), "train")
    assert [(r.domain, r.answer) for r in records] == [(row["domain"], row["response"]) for row in rows]


def test_domains_from_a_mapping_a_glob_a_column_or_the_default(tmp_path, gpt2):
    (tmp_path / "m").mkdir()
    for i in range(2):
        write_jsonl(tmp_path / "m" / f"part{i}.jsonl", [{"text": f"math {i} {j}"} for j in range(4)])
    write_jsonl(tmp_path / "code.jsonl", [{"text": f"code {j}", "domain": "ignored: the mapping wins"} for j in range(4)])
    sources = files.resolve({"math": str(tmp_path / "m" / "*.jsonl"), "code": [str(tmp_path / "code.jsonl")]}, "train")
    assert [(s.path.name, s.domain) for s in sources] == [("part0.jsonl", "math"), ("part1.jsonl", "math"), ("code.jsonl", "code")]
    records, _, _ = load_records(sources, gpt2, Encoding(max_length=64), "train")
    assert [r.domain for r in records].count("math") == 8 and [r.domain for r in records].count("code") == 4
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "topic": "x"}, {"text": "b"}])
    records, _, _ = load_records([Source(mixed, None)], gpt2, Encoding(max_length=64, domain_field="topic", default_domain="rest"), "t")
    assert [r.domain for r in records] == ["x", "rest"]


def test_held_out_splits_are_per_domain_deterministic_and_disjoint(tmp_path, gpt2):
    rows = [{"prompt": f"Q{i}:", "response": f" {i}", "domain": "ab"[i % 2]} for i in range(80)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def answers(dm, split):
        return sorted(r.answer for r in dm.records[split])

    dm = FilesDataModule(gpt2, train=path, holdout_fraction=0.1, seed=3)
    again = FilesDataModule(gpt2, train=path, holdout_fraction=0.1, seed=3)
    other = FilesDataModule(gpt2, train=path, holdout_fraction=0.1, seed=4)
    assert {d: sum(r.domain == d for r in dm.records["val"]) for d in "ab"} == {"a": 4, "b": 4}
    assert answers(dm, "val") == answers(again, "val") and answers(dm, "val") != answers(other, "val")
    seen = [a for split in ("train", "val", "test") for a in answers(dm, split)]
    assert len(seen) == len(set(seen)) == 80
    fresh = [{"prompt": f"Q{i}:", "response": f" {i}", "domain": "ab"[i % 2]} for i in range(100, 102)]
    explicit = FilesDataModule(gpt2, train=path, val=write_jsonl(tmp_path / "v.jsonl", fresh))
    assert len(explicit.records["val"]) == 2 and len(explicit.records["test"]) == 4
    with pytest.raises(ValueError, match=r"every data.val record of domain\(s\) \['a', 'b'\] is also a training record"):
        FilesDataModule(gpt2, train=path, val=write_jsonl(tmp_path / "copies.jsonl", rows[:2]))
    only_val = [*fresh, {"prompt": "Q9:", "response": " 9", "domain": "c"}]
    with pytest.raises(ValueError, match=r"domain\(s\) \['c'\] have val data but no training data: they would count in val/loss"):
        FilesDataModule(gpt2, train=path, val=write_jsonl(tmp_path / "extra.jsonl", only_val))


def test_a_few_held_out_records_that_copy_training_records_are_said(tmp_path, gpt2, caplog):
    """Duplicates in a dataset: a domain whose held-out records are only partly copies is kept, with a warning."""
    rows = [{"prompt": f"Q{i}:", "response": f" {i}", "domain": "ab"[i % 2]} for i in range(20)]
    fresh = [{"prompt": f"Q{i}:", "response": f" {i}", "domain": "ab"[i % 2]} for i in range(100, 102)]
    with caplog.at_level(logging.WARNING):
        dm = FilesDataModule(gpt2, train=write_jsonl(tmp_path / "d.jsonl", rows), val=write_jsonl(tmp_path / "v.jsonl", [rows[0], *fresh]))
    assert len(dm.records["val"]) == 3
    assert "1 data.val record(s) are copies of training records ({'a': 1})" in caplog.text
    assert "data.test record(s) are copies" not in caplog.text  # held out of data.train: disjoint


def test_held_out_records_are_distinct_and_their_copies_leave_training(tmp_path, gpt2, caplog):
    """A dataset with many copies (a template generator's, say): a held-out record's copies are not
    trained on and not held twice, so the held-out splits never score memorised records."""
    rows = [{"prompt": f"Q{i % 12}:", "response": f" {i % 12}", "domain": "ab"[i % 2]} for i in range(240)]  # 6 distinct per domain, 20 copies each
    with caplog.at_level(logging.INFO, logger="kdlab"):
        dm = FilesDataModule(gpt2, train=write_jsonl(tmp_path / "d.jsonl", rows), holdout_fraction=0.2)
    assert "data.val of domain 'a': 19 copies of its held-out records left data.train with them" in caplog.text
    train = {r.input_ids for r in dm.records["train"]}
    for split in ("val", "test"):
        held = [r.input_ids for r in dm.records[split]]
        assert len(held) == len(set(held)) == 2  # one distinct record per domain: round(0.2 * 6)
        assert not train & set(held)
    assert len(dm.records["train"]) == 240 - 4 * 20  # every copy of the 4 held-out records left training
    one_distinct = [{"text": "same", "domain": "a"}] * 5 + [{"text": f"x{i}", "domain": "b"} for i in range(5)]
    with pytest.raises(ValueError, match=r"domain 'a' has 1 distinct training record\(s\) \(5 in all\): too few to hold out"):
        FilesDataModule(gpt2, train=str(write_jsonl(tmp_path / "one.jsonl", one_distinct)))


def test_a_parquet_domain_column_of_structs_is_refused_naming_it(tmp_path, gpt2):
    import datasets

    path = tmp_path / "s.parquet"
    datasets.Dataset.from_list([{"text": f"record {i}", "domain": {"name": "ab"[i % 2]}} for i in range(8)]).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"s.parquet, row 0: a domain must be a string, got dict \"\{'name': 'a'\}\""):
        FilesDataModule(gpt2, train=str(path))


def test_too_long_records_lose_their_prompt_from_the_left_or_are_dropped_and_counted(tmp_path, gpt2, caplog):
    rows = [
        {"prompt": "word " * 30, "response": " kept whole"},  # truncated: 31 + 3 tokens > 16
        {"prompt": "Q:", "response": " long" * 30},  # dropped: the response alone does not fit
        {"prompt": "Q:", "response": " fine"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        records, counts, _ = load_records([Source(path, None)], gpt2, Encoding(max_length=16), "train")
    assert counts == {"truncated": 1, "dropped": 1, "ok": 1} and len(records) == 2
    assert len(records[0].input_ids) == 16 and targets_text(gpt2, records[0]) == " kept whole<|endoftext|>"
    kept_prompt = gpt2.decode(records[0].input_ids[: records[0].prompt_len]).split()
    assert kept_prompt and set(kept_prompt) == {"word"} and len(kept_prompt) < 30  # the prompt's tail is kept
    assert "1 truncated" in caplog.text and "1 dropped" in caplog.text and "data.max_length=16" in caplog.text


def test_a_second_load_reuses_the_cached_tokenisation(tmp_path, gpt2, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"line {i}"} for i in range(5)])
    first, _, _ = load_records([Source(path, None)], gpt2, Encoding(max_length=64), "train")

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(files.Encoder, "__call__", fail)
    second, _, _ = load_records([Source(path, None)], gpt2, Encoding(max_length=64), "train")
    assert second == first
    with pytest.raises(AssertionError, match="tokenised again"):  # other settings: a new tokenisation
        load_records([Source(path, None)], gpt2, Encoding(max_length=32), "train")


# -- malformed input stops before training, naming the file, the line or row, and the field ---------
def test_broken_json_line_is_named(tmp_path, gpt2):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        FilesDataModule(gpt2, train=str(path))


def test_invalid_utf8_is_named_with_its_line(tmp_path, gpt2):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "fine"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"):
        FilesDataModule(gpt2, train=str(path))


@pytest.mark.parametrize(
    "domains, message",
    [
        ([{"name": "math"}, "a"], r"bad.jsonl, line 1: a domain must be a string, got dict"),
        (["a/b", "a"], r"bad.jsonl, line 1: domain 'a/b' is not a usable name: it must be non-empty and contain no '/'"),
        (["", "a"], r"bad.jsonl, line 1: domain '' is not a usable name"),
    ],
)
def test_unusable_domain_values_are_named_with_their_line(tmp_path, gpt2, domains, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}", "domain": d}) + "\n" for i, d in enumerate(domains * 4)))
    with pytest.raises(ValueError, match=message):
        FilesDataModule(gpt2, train=str(path))


def test_integer_and_string_domains_name_one_domain_and_an_empty_key_is_refused(tmp_path, gpt2):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}", "domain": [1, "1", "b"][i % 3]}) + "\n" for i in range(30)))
    assert FilesDataModule(gpt2, train=str(path), holdout_fraction=0.2).domains == ["1", "b"]
    with pytest.raises(ValueError, match=r"data.train: domain '' is not a usable name"):
        FilesDataModule(gpt2, train={"": str(path)})


def test_an_empty_prompt_without_a_bos_token_is_named(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "response": " a"}, {"prompt": "", "response": " b"}])
    with pytest.raises(ValueError, match=r"d.jsonl, line 2: the prompt is empty and the tokenizer adds no BOS token"):
        FilesDataModule(gpt2, train=path, format="prompt_response", chat_template=False)


def test_missing_field_names_the_fields_found(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(ValueError, match=r"f.jsonl, line 2: field 'response' is missing.*fields found: \['answer', 'prompt'\]"):
        FilesDataModule(gpt2, train=str(path))
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    with pytest.raises(ValueError, match=r"cannot tell the record format from its fields \['answer', 'question'\].*data.fields"):
        FilesDataModule(gpt2, train=str(unknown))
    renamed = FilesDataModule(gpt2, train=str(unknown), fields={"prompt": "question", "response": "answer"})
    assert sorted(r.answer for split in renamed.records.values() for r in split) == ["a0", "a1", "a2"]


def test_empty_file_and_missing_path(tmp_path, gpt2):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl is empty"):
        FilesDataModule(gpt2, train=str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"data.val: .*nope.jsonl does not exist"):
        FilesDataModule(gpt2, train=str(tmp_path / "empty.jsonl"), val=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"no file matches"):
        FilesDataModule(gpt2, train=str(tmp_path / "*.parquet"))


def test_domain_without_validation_records_is_named(tmp_path, gpt2):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"x {i}", "domain": "ab"[i % 2]} for i in range(10)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "y", "domain": "a"}])
    with pytest.raises(ValueError, match=r"domain\(s\) \['b'\] have training records but no val records \(.*v.jsonl\)"):
        FilesDataModule(gpt2, train=str(train), val=str(val))
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": f"x{i}", "domain": "a"} for i in range(4)] + [{"text": "y", "domain": "b"}])
    with pytest.raises(ValueError, match=r"domain 'b' has 1 distinct training record\(s\) \(1 in all\): too few to hold out"):
        FilesDataModule(gpt2, train=str(tiny))


def test_chat_record_without_an_assistant_turn_is_named(tmp_path, qwen_tokenizer, gpt2):
    rows = [CHAT, {"messages": [{"role": "user", "content": "hello?"}]}]
    with pytest.raises(ValueError, match=r"x.jsonl, line 2: no assistant turn \(roles: \['user'\]\)"):
        FilesDataModule(qwen_tokenizer, train=str(write_jsonl(tmp_path / "x.jsonl", rows)))
    bad_role = [{"messages": [{"role": "bot", "content": "hi"}]}]
    with pytest.raises(ValueError, match=r"line 1: turn 0 of 'messages' must be"):
        FilesDataModule(qwen_tokenizer, train=str(write_jsonl(tmp_path / "r.jsonl", bad_role)))
    with pytest.raises(ValueError, match=r"need a chat template, and this tokenizer has none"):
        FilesDataModule(gpt2, train=str(write_jsonl(tmp_path / "c.jsonl", [CHAT] * 4)))


def test_pretrain_corpus_comes_beside_every_training_batch_and_minillm_uses_it(tmp_path, gpt2, monkeypatch):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q{i}:", "response": f" {i}"} for i in range(20)])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"Plain corpus text number {i}."} for i in range(10)])
    dm = FilesDataModule(gpt2, train=str(qa), pretrain=str(corpus), batch_size=4, max_length=8)
    batch = next(iter(dm.train_dataloader()))
    plain = batch["plain"]
    assert plain["input_ids"].shape[0] == 4 and plain["input_ids"].shape[1] <= 8
    real = plain["attention_mask"].bool()
    counted = plain["labels"] != IGNORE_INDEX
    assert torch.equal(counted[:, :-1], real[:, 1:])  # every real token after the first is a label
    assert "corpus" in gpt2.decode(dm.pretrain[0].input_ids).lower()
    assert "plain" not in dm.collate(dm._dataset("val"))  # evaluation batches carry none

    # MiniLLM's pre-training term reads that corpus, not the prompts' own sequences
    import lightning as L

    from kdlab.losses.minillm import MiniLLM
    from kdlab.module import DistillModule

    seen = []
    original = MiniLLM.__call__

    def spy(self, batch):
        seen.append(batch.plain.labels)
        return original(self, batch)

    monkeypatch.setattr(MiniLLM, "__call__", spy)
    student, teacher = (AutoModelForCausalLM.from_pretrained(p) for p in build("gpt2", tmp_path / "pair"))
    module = DistillModule(student, teacher, MiniLLM(), gpt2)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    labels = seen[0][seen[0] != IGNORE_INDEX].tolist()
    assert "corpus text number" in gpt2.decode(labels) and "Q" not in gpt2.decode(labels)
