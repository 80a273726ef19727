"""kdlab.generate: a teacher's answers as messages JSONL, resumable, identical in parts, unfinished answers left out."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, LlamaConfig

from kdlab.data.files import FilesDataModule
from kdlab.generate import generate, main
from tests.conftest import CONF_DIR


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, qwen_tokenizer):
    """A tiny random Llama with Qwen's tokenizer and chat template, saved as a Hugging Face folder.

    A wide initialisation makes its answers depend on the prompt, and a scaled-up end-of-turn row
    makes some of them end within a few tokens and others run on (the model is random: these are
    properties of this seed, checked where a test relies on them).
    """
    tok = qwen_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
        model.lm_head.weight[end_of_turn] *= 3.0
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"Question {i}: what does {'x' * i} mean?", "id": f"q{i}"} for i in range(20)]
    for i, row in enumerate(rows):
        if i % 2:
            row["domain"] = "odd"
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}], "id": "chat"})
    rows.append({"prompt": "An anonymous question without an id"})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def compose_generate(teacher, prompts, out, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("generate", overrides=[
            "model=hf", f"model.teacher.path={teacher}", f"prompts={prompts}", f"out={out}",
            "batch_size=4", "max_new_tokens=16", "device=cpu", *overrides,
        ])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_are_messages_jsonl_that_data_files_reads(teacher, prompts, tmp_path, qwen_tokenizer, capsys):
    out = tmp_path / "chat.jsonl"
    main(compose_generate(teacher, prompts, out))  # the Hydra entry point, as `python -m kdlab.generate` runs it
    summary = capsys.readouterr().out
    rows = lines(out)
    assert len(rows) >= 3, "the tiny teacher should finish some answers within 16 tokens"
    assert f"{len(rows)} answers written, 0 prompts skipped" in summary and "22 prompts in all" in summary
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)
    for r in rows:
        assert set(r) == {"messages", "domain", "id"}
        assert [t["role"] for t in r["messages"]][-1] == "assistant" and r["messages"][-1]["content"].strip()
        assert r["messages"][-1]["content"] == r["messages"][-1]["content"].strip()
        if r["id"].startswith("q"):
            i = int(r["id"][1:])
            assert r["domain"] == ("odd" if i % 2 else "default")
            assert r["messages"][0] == {"role": "user", "content": f"Question {i}: what does {'x' * i} mean?"}
    if "chat" in by_id:
        assert [t["role"] for t in by_id["chat"]["messages"]] == ["system", "user", "assistant"]

    dm = FilesDataModule(qwen_tokenizer, train={"chat": str(out)}, max_length=128, holdout_fraction=0.1)
    assert dm.domains == ["chat"]
    assert sorted(r.answer for s in ("train", "val", "test") for r in dm.records[s]) == sorted(r["messages"][-1]["content"] for r in rows)


@pytest.mark.parametrize("sampling", [[], ["do_sample=true", "temperature=0.8", "seed=3"]], ids=["greedy", "sampled"])
def test_a_rerun_appends_nothing_and_a_run_in_parts_writes_what_one_run_does(teacher, prompts, tmp_path, sampling):
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    counts = generate(compose_generate(teacher, prompts, whole, *sampling))
    assert counts["written"] + counts["unfinished"] + counts["empty"] + counts["unrenderable"] == 22

    before = whole.read_bytes()
    again = generate(compose_generate(teacher, prompts, whole, *sampling))
    assert whole.read_bytes() == before
    assert again["written"] == 0 and again["skipped_done"] == 22

    # interrupted twice, mid-batch (limits 5 and 6 are not multiples of batch_size=4), then finished
    assert generate(compose_generate(teacher, prompts, parts, *sampling, "limit=5"))["skipped_done"] == 0
    assert generate(compose_generate(teacher, prompts, parts, *sampling, "limit=6"))["skipped_done"] == 5
    generate(compose_generate(teacher, prompts, parts, *sampling))
    assert parts.read_bytes() == whole.read_bytes()
    assert (tmp_path / "parts.unfinished.jsonl").read_bytes() == (tmp_path / "whole.unfinished.jsonl").read_bytes()


def test_a_partial_last_line_is_redone_and_other_settings_are_refused(teacher, prompts, tmp_path):
    out = tmp_path / "chat.jsonl"
    generate(compose_generate(teacher, prompts, out))
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.rfind(b"\n", 0, len(whole) - 1) + 1] + b'{"messages": [{"ro')  # killed mid-write
    assert generate(compose_generate(teacher, prompts, out))["written"] == 1
    assert out.read_bytes() == whole
    with pytest.raises(ValueError, match=r"records other settings \(\['do_sample', 'seed', 'temperature', 'top_p'\]\).*another out file"):
        generate(compose_generate(teacher, prompts, out, "do_sample=true", "limit=1"))


def test_unfinished_answers_are_left_out_counted_and_retried_with_a_larger_budget(teacher, prompts, tmp_path):
    full = tmp_path / "full.jsonl"
    generate(compose_generate(teacher, prompts, full))
    answers = {r["id"]: r["messages"][-1]["content"] for r in lines(full)}

    short = tmp_path / "short.jsonl"
    counts = generate(compose_generate(teacher, prompts, short, "max_new_tokens=6"))
    written = {r["id"]: r["messages"][-1]["content"] for r in lines(short)}
    unfinished = lines(tmp_path / "short.unfinished.jsonl")
    assert counts["written"] == len(written) > 0 and counts["unfinished"] > 0, "the tiny teacher's answers should vary in length"
    assert counts["written"] + counts["unfinished"] + counts["empty"] + counts["unrenderable"] == 22
    assert len(unfinished) == counts["unfinished"] + counts["empty"] + counts["unrenderable"]
    cut = {r["id"] for r in unfinished if r["reason"] == "max_new_tokens"}
    assert len(cut) == counts["unfinished"] and all(r["max_new_tokens"] == 6 for r in unfinished)
    # greedy answers are prefixes of one another: what ended within 6 tokens is what 16 tokens give,
    # and every longer answer is among the unfinished, none cut off in the training file
    assert all(answers[i] == text for i, text in written.items())
    assert set(answers) - set(written) <= cut

    retried = generate(compose_generate(teacher, prompts, short))  # max_new_tokens=16: the cut-off ones again
    assert retried["skipped_done"] == 22 - len(cut)
    assert {r["id"]: r["messages"][-1]["content"] for r in lines(short)} == answers


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "prompts file .*missing.jsonl' does not exist"),
        (['{"prompt": "fine", "id": 1}', '{"prompt": "broken"'], r"prompts.jsonl, line 2: not valid JSON"),
        (['{"prompt": "fine"}', '{"question": "Why?", "id": 7}'], r"line 2: no 'prompt' field \(nor 'messages'\); fields found: \['id', 'question'\]"),
        (['{"prompt": "a", "id": "x"}', '', '{"prompt": "b", "id": "x"}'], r"line 3: id 'x' is also on line 1; ids must be unique"),
        (['{"prompt": "same"}', '{"prompt": "same"}'], r"line 2: id 'sha-.*' is also on line 1 \(the same prompt, without ids\)"),
        (['{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'], "the last turn is the assistant's"),
        (['[1, 2]'], "line 1: a record must be a JSON object, got list"),
    ],
    ids=["missing", "not-json", "no-prompt", "duplicate-id", "duplicate-prompt", "answered", "not-an-object"],
)
def test_bad_input_fails_before_the_model_is_loaded(tmp_path, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "prompts.jsonl")
    if content is not None:
        write_jsonl(path, content)
    # a teacher folder that does not exist: reaching the model would fail with another message
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate(compose_generate(tmp_path / "no-teacher", path, tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_a_teacher_trained_on_demand_is_refused(tmp_path, prompts):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("generate", overrides=["model=tiny", f"prompts={prompts}", f"out={tmp_path / 'out.jsonl'}"])
    with pytest.raises(ValueError, match="generation needs a pretrained teacher: model=smollm2, or model=hf"):
        generate(cfg)
