"""model=hf: your own Hugging Face folders, checked before anything trains; tiny real-family pairs end to end."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertLMHeadModel

from examples.tiny_pair import build
from examples.tiny_pair import tokenizer as family_tokenizer
from kdlab.evaluate import evaluate
from kdlab.models import check_causal, check_tokenizers, distillation_vocab_size, from_pretrained, load_tokenizer
from kdlab.train import run
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "chat" / "chat.jsonl"
# a few steps on a few records: the point is that every part runs on a real family's pair and data
SMALL = [
    "data=files",
    "data.max_length=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.max_holdout=2",
    "eval.num_samples=1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "module.warmup_steps=1",
    "logger=csv",
]


def hf_cfg(out, teacher, student, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", f"model.teacher.path={teacher}", f"model.student.path={student}", *SMALL, *overrides])
    cfg.paths.output_dir = str(out)
    return cfg


# -- the folders are checked, and a wrong one is reported as such -----------------------------------
def test_missing_or_wrong_folders_are_reported_before_training(tmp_path, qwen_pair):
    teacher, student = qwen_pair
    data = f"data.train={CHAT}"
    cases = {
        tmp_path / "nope": r"teacher tokenizer folder .*nope' does not exist",
        CHAT: r"is a file, not a folder",
    }
    for path, message in cases.items():
        with pytest.raises(InstantiationException, match=message):
            run(hf_cfg(tmp_path / "run", path, student, data))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    family_tokenizer("qwen2").save_pretrained(no_config)
    with pytest.raises(InstantiationException, match=r"student folder .*no_config' has no config.json"):
        run(hf_cfg(tmp_path / "run", teacher, no_config, data))
    no_weights = tmp_path / "no_weights"
    AutoModelForCausalLM.from_pretrained(student).config.save_pretrained(no_weights)
    with pytest.raises(InstantiationException, match=r"has config.json but no weights"):
        run(hf_cfg(tmp_path / "run", teacher, no_weights, data))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_model_that_reads_future_tokens_is_refused(tmp_path, gpt2_tok):
    """A BERT LM head loads as AutoModelForCausalLM but attends both ways: it would train to a meaningless perplexity."""
    bert = BertLMHeadModel(BertConfig(vocab_size=len(gpt2_tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    model = from_pretrained(str(tmp_path / "bert"), role="student")
    with pytest.raises(ValueError, match=r"student .*bert' is not causal"):
        check_causal(model, "student", str(tmp_path / "bert"))
    check_causal(AutoModelForCausalLM.from_pretrained(build("gpt2", tmp_path / "pair")[1]), "student")  # a decoder passes


@pytest.fixture(scope="module")
def gpt2_tok():
    return family_tokenizer("gpt2")


def test_tokenizer_preflight_names_the_first_differing_ids_and_special_tokens(tmp_path, gpt2_tok, qwen_tokenizer):
    folder = tmp_path / "student"
    qwen_tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"maps \d+ of the 50257 shared ids to other tokens .*first: \d+: "):
        check_tokenizers(gpt2_tok, str(folder))
    other = tmp_path / "other_eos"
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "<|endoftext|>"  # Qwen's base-model eos, where the teacher's is <|im_end|>
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match=r"other special tokens than the teacher's: eos_token: '<\|im_end\|>' \(teacher\) vs '<\|endoftext\|>'"):
        check_tokenizers(qwen_tokenizer, str(other))
    check_tokenizers(qwen_tokenizer, str(folder))  # the same tokenizer passes
    check_tokenizers(qwen_tokenizer, str(tmp_path))  # a folder without a tokenizer uses the teacher's


def test_qwen_style_padded_vocabularies_are_compared_over_the_tokenizer(qwen_pair):
    teacher, student = qwen_pair
    tok = load_tokenizer(str(teacher))
    t, s = (AutoModelForCausalLM.from_pretrained(p) for p in qwen_pair)
    assert (t.get_output_embeddings().weight.shape[0], s.get_output_embeddings().weight.shape[0], len(tok)) == (152_064, 151_936, 151_669)
    assert distillation_vocab_size(t, s, tok) == 151_669
    assert from_pretrained(str(teacher), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model dtype 'float8' is unknown"):
        from_pretrained(str(teacher), dtype="float8")


# -- whole runs on tiny pairs of three families --------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_and_gpt2_pairs_distil_prompt_response_and_text_data(tmp_path, family):
    teacher, student = build(family, tmp_path / "pair")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(f'{{"prompt": "Q: {i} + 1 =", "response": " {i + 1}", "domain": "add"}}\n' for i in range(40)))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(f'{{"text": "Sentence number {i} is plain text."}}\n' for i in range(40)))
    cfg = hf_cfg(tmp_path / "run", teacher, student, f"data.train={{add: {qa}, prose: {text}}}", "loss=jsd", "+data.checker._target_=kdlab.data.datamodule.ExactMatch")
    metrics = run(cfg)
    assert {"test/add/exact_match", "test/add/rougeL", "test/prose/ppl", "test/add/teacher_ppl"} <= set(metrics)
    ratios = [metrics[f"test/{d}/ppl"] / metrics[f"test/{d}/teacher_ppl"] for d in ("add", "prose")]
    assert metrics["test/add/ppl_ratio"] == pytest.approx(ratios[0], rel=1e-5)
    assert metrics["test/ppl_ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert "test/prose/exact_match" not in metrics and "test/prose/rougeL" not in metrics  # plain text: perplexity only
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student") is not None

    # kdlab.evaluate scores the exported student on the same user data exactly as the run did
    data_overrides = [o for o in SMALL if o.startswith(("data", "eval"))]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ecfg = compose("evaluate", overrides=[
            "model=hf", f"model.teacher.path={teacher}", f"model.student.path={student}", *data_overrides,
            f"data.train={{add: {qa}, prose: {text}}}", "+data.checker._target_=kdlab.data.datamodule.ExactMatch",
            "trainer.accelerator=cpu", f"student={tmp_path / 'run' / 'student'}",
        ])
    ecfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(ecfg)
    test_keys = [k for k in metrics if k.startswith("test/")]
    assert {k: scored[k] for k in test_keys} == pytest.approx({k: metrics[k] for k in test_keys}, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_sweep_on_a_qwen_pair_and_chat_data_with_ddk(tmp_path, qwen_pair):
    """The issue's command, verbatim in shape: a user's pair and chat file, three objectives, DDK."""
    teacher, student = qwen_pair
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "kdlab.train", "-m", "model=hf", f"model.teacher.path={teacher}", f"model.student.path={student}",
        f"data.train={CHAT}", "loss=fkl,rlkd,minillm", "data/mixing=ddk", *SMALL, f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["loss=fkl", "loss=rlkd", "loss=minillm", "(reference)"]
    for row in rows[:3]:
        assert float(row["test/ppl"]) > 1 and 0 <= float(row["test/rougeL"]) <= 1
        assert {"test/arithmetic/ppl", "test/capitals/ppl", "test/explain/ppl"} <= set(row)
    # DDK moved the weights over the user's three domains (uniform 1/3 before the first validation)
    with open(sweep / "0" / "csv" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("data/weight/arithmetic")]
    weights = [float(logged[-1][f"data/weight/{d}"]) for d in ("arithmetic", "capitals", "explain")]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and max(abs(w - 1 / 3) for w in weights) > 1e-4

    # the exported student is a plain transformers model that answers a chat message
    exported = sweep / "2" / "student"
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    eos = model.generation_config.eos_token_id  # generation stops at the end of the assistant's turn
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
