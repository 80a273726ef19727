"""kdlab.data.corpus: the standard-library corpus is deterministic, held out by source, reused, and read by data=python_corpus."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from kdlab.cache import MANIFEST
from kdlab.data import corpus
from kdlab.data.corpus import DOMAINS, SPLITS, CorpusDataModule, build_corpus, code_chunks, ensure_corpus, prose_chunks
from tests.conftest import CONF_DIR

SMALL = {"records_per_domain": 30, "val_records": 6, "test_records": 6, "prompts": 24}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus") / "c", seed=0, **SMALL)


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_another_seed_other_records(built, tmp_path):
    again = build_corpus(tmp_path / "again", seed=0, **SMALL)
    other = build_corpus(tmp_path / "other", seed=1, **SMALL)
    assert (again / MANIFEST).read_bytes() == (built / MANIFEST).read_bytes()
    assert all((again / rel).read_bytes() == (built / rel).read_bytes() for rel in manifest(built)["checksums"])
    changed = {rel for rel, digest in manifest(other)["checksums"].items() if digest != manifest(built)["checksums"][rel]}
    assert changed == set(manifest(built)["checksums"])  # every split of every domain, and the prompts
    assert manifest(other)["seed"] == 1


def test_every_domain_has_the_counts_asked_for_and_splits_share_no_source(built):
    m = manifest(built)
    assert m["python"] == ".".join(map(str, sys.version_info[:3])) and m["settings"]["records_per_domain"] == 30
    for rel, digest in m["checksums"].items():  # the manifest describes the files
        assert hashlib.sha256((built / rel).read_bytes()).hexdigest() == digest
    for domain in DOMAINS:
        splits = {split: records(built / domain / f"{split}.jsonl") for split in SPLITS}
        assert {s: len(r) for s, r in splits.items()} == {"train": 30, "val": 6, "test": 6} == m["counts"][domain]
        for rows in splits.values():
            assert all(set(r) == {"text", "domain", "source"} and r["domain"] == domain and r["text"].strip() for r in rows)
        sources = {s: {r["source"] for r in rows} for s, rows in splits.items()}
        texts = {s: {r["text"] for r in rows} for s, rows in splits.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not sources[a] & sources[b], (domain, a, b)
            assert not texts[a] & texts[b], (domain, a, b)
    code_sources = {r["source"] for s in SPLITS for r in records(built / "code" / f"{s}.jsonl")}
    skipped = ("test", "tests", "idlelib", "lib2to3", "site-packages")
    assert all(s.endswith(".py") and not set(s.split("/")[:-1]) & set(skipped) for s in code_sources)
    assert all(r["source"].startswith("pydoc_data.topics:") for r in records(built / "reference" / "train.jsonl"))
    prompts = records(built / "chat" / "prompts.jsonl")
    assert len(prompts) == len({p["id"] for p in prompts}) == 24 == m["counts"]["chat"]["prompts"]
    assert all(p["domain"] == "chat" and ("`" in p["prompt"] or '"' in p["prompt"]) for p in prompts)
    assert {p["id"].split(":")[0].rstrip("0123456789") for p in prompts} == {"function", "class", "module", "keyword", "topic"}


def test_records_are_cut_at_line_paragraph_and_sentence_boundaries():
    source = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(100))
    chunks = code_chunks(source, 200)
    assert len(chunks) > 5 and all(len(c) <= 250 for c in chunks)
    assert all(line in source.splitlines() for c in chunks for line in c.splitlines())  # whole lines only
    assert "\n".join(chunks).replace("\n", "") == source.replace("\n", "")
    prose = "\n\n".join(f"Paragraph {p}. " + " ".join(f"Sentence {p}.{s} says something." for s in range(12)) for p in range(5))
    chunks = prose_chunks(prose, 200)
    assert all(60 <= len(c) <= 250 for c in chunks)
    assert all(c.startswith(("Paragraph", "Sentence")) and c.endswith(".") for c in chunks)


def test_a_source_smaller_than_asked_for_gives_fewer_records_and_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        root = build_corpus(tmp_path / "c", records_per_domain=1500, val_records=4, test_records=4, prompts=4)
    counts = manifest(root)["counts"]
    assert counts["code"]["train"] == 1500 and counts["reference"]["train"] < 1500
    assert len(records(root / "reference" / "train.jsonl")) == counts["reference"]["train"]
    assert "corpus domain 'reference' has" in caplog.text and "fewer than the 1500 asked for" in caplog.text


def test_ensure_corpus_reuses_a_build_and_rebuilds_for_other_settings(tmp_path):
    root = ensure_corpus(tmp_path / "c", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_corpus(tmp_path / "c", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # reused, not rewritten
    ensure_corpus(root, **{**SMALL, "seed": 1})
    assert manifest(root)["seed"] == 1
    (root / MANIFEST).unlink()  # as an interrupted build would leave it: never used
    ensure_corpus(root, **SMALL)
    assert manifest(root)["seed"] == 0
    good = (root / "code" / "val.jsonl").read_bytes()
    (root / "code" / "val.jsonl").write_bytes(good[: len(good) // 2])  # a damaged file: its checksum no longer matches
    ensure_corpus(root, **SMALL)
    assert (root / "code" / "val.jsonl").read_bytes() == good
    with pytest.raises(TypeError, match=r"unknown corpus setting\(s\) \['records'\]"):
        ensure_corpus(root, records=10)


def test_an_interrupted_build_leaves_nothing_and_keeps_the_old_corpus(built, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "chat_prompts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "new", **SMALL)
    assert list(tmp_path.iterdir()) == []
    before = (built / MANIFEST).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        build_corpus(built, seed=5, **SMALL)
    assert (built / MANIFEST).read_bytes() == before
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]


def test_command_line(tmp_path, capsys):
    out = corpus.main([str(tmp_path / "cli"), "--records-per-domain", "8", "--val-records", "2", "--test-records", "2", "--prompts", "5"])
    assert manifest(out)["counts"]["code"] == {"train": 8, "val": 2, "test": 2}
    assert "code: 8 train, 2 val, 2 test; " in capsys.readouterr().out


def compose_data(cache_dir, *overrides):
    small = [f"data.corpus.{k}={v}" for k, v in SMALL.items()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["data=python_corpus", *small, *overrides])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def test_data_python_corpus_reads_every_domain_and_a_chat_domain(tmp_path, qwen_tokenizer):
    cfg = compose_data(tmp_path)
    dm = instantiate(cfg.data, tokenizer=qwen_tokenizer)
    assert dm.domains == ["code", "docstrings", "reference"]
    for split, n in (("train", 30), ("val", 6), ("test", 6)):
        assert sorted(r.domain for r in dm.records[split]) == sorted(list(DOMAINS) * n)
        assert all(r.prompt_len == 0 and all(r.targets) and 1 < len(r.input_ids) <= 128 for r in dm.records[split])
    [root] = (tmp_path / "corpus").iterdir()
    assert root.name.startswith(f"py{sys.version_info[0]}{sys.version_info[1]}-seed0-")
    assert manifest(root)["settings"]["records_per_domain"] == 30

    missing = tmp_path / "chat.jsonl"
    with pytest.raises(InstantiationException, match="does not exist. Write it .*python -m kdlab.generate model=smollm2 prompts=") as err:
        instantiate(compose_data(tmp_path, f"data.chat={missing}").data, tokenizer=qwen_tokenizer)
    assert f"prompts={root / 'chat' / 'prompts.jsonl'} out={missing}\\n" in str(err.value)  # the repr of the message

    prompts = records(root / "chat" / "prompts.jsonl")
    missing.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": f"Answer {i}."}],
                    "domain": "chat", "id": p["id"]}) + "\n"
        for i, p in enumerate(prompts)
    ))
    dm = instantiate(compose_data(tmp_path, f"data.chat={missing}").data, tokenizer=qwen_tokenizer)
    assert dm.domains == ["chat", "code", "docstrings", "reference"]
    chat = {s: [r for r in dm.records[s] if r.domain == "chat"] for s in SPLITS}
    assert {s: len(r) for s, r in chat.items()} == {"train": 20, "val": 2, "test": 2}
    assert len({r.answer for s in SPLITS for r in chat[s]}) == 24 and all(r.prompt_len > 0 for r in chat["val"])

    with pytest.raises(ValueError, match="data=python_corpus writes data.train itself"):
        CorpusDataModule(qwen_tokenizer, root=str(root), corpus=SMALL, train="mine.jsonl")


@pytest.mark.slow
def test_a_build_in_another_process_is_byte_identical(built, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "1"}  # set and dict orders must not matter
    args = ["--records-per-domain", "30", "--val-records", "6", "--test-records", "6", "--prompts", "24"]
    subprocess.run([sys.executable, "-m", "kdlab.data.corpus", str(tmp_path / "c"), *args], check=True, env=env, capture_output=True)
    assert (tmp_path / "c" / MANIFEST).read_bytes() == (built / MANIFEST).read_bytes()
