"""bench.across cost, whose GPU rows (docs/results.md) come from `--device cuda --bf16 ...`: the options compose the
real tier's config on any machine, and the whole measurement runs on a CPU at a tiny size."""

import pytest
import torch
from transformers import LlamaConfig

from bench.across import cost_overrides, main, parser
from bench.common import default_config
from examples.tiny_pair import tokenizer as family_tokenizer


def test_the_gpu_invocation_parses_and_composes_the_real_tier_at_that_size(tmp_path):
    args = parser().parse_args(["cost", "--device", "cuda", "--bf16", "--batch-size", "16", "--max-length", "256", "--repeats", "20",
                                "--records-per-domain", "200", "--random-teacher", str(tmp_path)])
    assert (args.device, args.bf16, args.batch_size, args.max_length, args.repeats, args.records_per_domain) == ("cuda", True, 16, 256, 20, 200)
    cfg = default_config(*cost_overrides(args.batch_size, args.max_length, args.records_per_domain, args.random_teacher))
    assert (cfg.data.batch_size, cfg.data.max_length, cfg.data.corpus.records_per_domain) == (16, 256, 200)
    assert cfg.data._target_.endswith("CorpusDataModule") and (cfg.data.corpus.val_records, cfg.data.corpus.test_records) == (16, 32)
    assert cfg.model.tokenizer.path == str(tmp_path) and cfg.model.tokenizer.gguf_file is None  # the tokenizer follows the teacher
    # the CPU default is unchanged: the real tier's GGUF teacher, batches of 4 x 128
    default = parser().parse_args(["cost"])
    assert (default.device, default.bf16, default.batch_size, default.max_length, default.random_teacher) == ("cpu", False, 4, 128, None)
    cfg = default_config(*cost_overrides())
    assert (cfg.data.batch_size, cfg.data.max_length, cfg.data.corpus.records_per_domain) == (4, 128, 2000)
    assert cfg.model.teacher.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_the_cost_runs_on_a_cpu_with_a_tiny_random_teacher_in_bf16(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))  # a corpus of its own, 8 records per domain
    tok = family_tokenizer("llama")
    teacher = tmp_path / "teacher"
    LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    main(["cost", "--bf16", "--batch-size", "2", "--max-length", "32", "--repeats", "1", "--records", "3", "--records-per-domain", "8",
          "--random-teacher", str(teacher)])
    out = capsys.readouterr().out
    assert "random-weight" in out and f"({torch.bfloat16})" in out and "batches of 2 x <=32 tokens" in out
    rows = [line for line in out.splitlines() if "ms/step" in line]
    assert len(rows) == 5 and all("ratio to fkl" in r for r in rows)
    assert "two tokenizers + alignment" in out
