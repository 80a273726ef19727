"""Distillation across tokenizers: the alignment of two real tokenisations, the objectives' batch
plumbing, the preflight, and whole runs (kdlab/data/alignment.py, kdlab/losses/across.py)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.tiny_pair import build
from examples.tiny_pair import tokenizer as family_tokenizer
from kdlab.data.alignment import VocabularyMap, align
from kdlab.data.files import Encoder, Encoding, Source
from kdlab.data.records import Piece
from kdlab.losses.across import gold, uld
from kdlab.losses.base import AlignedKDBatch, KDBatch
from kdlab.losses.divergences import TokenKD, forward_kl, generalized_jsd
from kdlab.train import run
from tests.test_hf_models import CHAT, ROOT, SMALL, hf_cfg

TEXTS = [
    "Héllo  wörld, 東京 is 🙂 big.\n  x = 1",
    "  leading spaces, tabs\tand\n\nnew lines; naïve café — déjà vu 😀😀 ok",
    "def f(x):\n    return x ** 2  # 平方\n",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: family_tokenizer(name) for name in ("qwen2", "llama", "gpt2")}


def encode(student, teacher, fmt, record, max_length=512):
    encoder = Encoder(student, Encoding(max_length), Source(Path("x.jsonl"), "d"), fmt, teacher, VocabularyMap(teacher, student))
    out = encoder({k: [v] for k, v in record.items()}, [0])
    return out["input_ids"][0], out["teacher_ids"][0], [tuple(a) for a in out["aligned"][0]], encoder


def squeeze(text: str) -> str:
    return "".join(text.split())  # SentencePiece decodes a leading "▁" as nothing: compare without whitespace


def check_groups(student_tok, teacher_tok, ids, teacher_ids, aligned, vocab):
    """Consecutive groups decode to the same text on both sides, never split a character, and a matched group is one same-string token."""
    assert aligned, "no aligned group"
    bounds = list(zip(aligned, aligned[1:] + [(len(ids), len(teacher_ids), False)]))
    for (s, t, matched), (s2, t2, _) in bounds[:-1]:  # the last group is the end-of-turn tail, special tokens on both sides
        if matched:  # one token each, the same bytes (also a byte of a character both split alike)
            assert s2 - s == 1 and t2 - t == 1 and vocab.student_keys[ids[s]] == vocab.teacher_keys[teacher_ids[t]]
            continue
        ours, theirs = student_tok.decode(ids[s:s2]), teacher_tok.decode(teacher_ids[t:t2])
        assert "\ufffd" not in ours and "\ufffd" not in theirs, (ours, theirs)  # no cut inside a multi-byte character
        assert squeeze(ours) == squeeze(theirs), (ours, theirs)
    assert all(s >= 1 and t >= 1 for s, t, _ in aligned)


@pytest.mark.parametrize("student,teacher", [("llama", "qwen2"), ("gpt2", "qwen2"), ("qwen2", "llama"), ("gpt2", "llama")])
@pytest.mark.parametrize("text", TEXTS)
def test_text_records_align_on_multibyte_whitespace_and_bos_with_real_tokenizers(tokenizers, student, teacher, text):
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    ids, teacher_ids, aligned, encoder = encode(s_tok, t_tok, "text", {"text": text})
    check_groups(s_tok, t_tok, ids, teacher_ids, aligned, encoder.vocab)
    # the tail pairs the two end-of-sequence tokens, and most of the text is matched one token to one
    assert aligned[-1][:2] == (len(ids) - 1, len(teacher_ids) - 1)
    assert sum(m for *_, m in aligned) >= len(aligned) // 3


def test_bos_on_one_side_only_skips_the_group_the_other_side_cannot_predict(tokenizers):
    s_tok = family_tokenizer("llama")
    s_tok.add_bos_token = True  # <s> text </s> against Qwen's text <|endoftext|>
    ids, teacher_ids, aligned, _ = encode(s_tok, tokenizers["qwen2"], "text", {"text": "Hello world"})
    assert ids[0] == s_tok.bos_token_id and teacher_ids[0] != s_tok.bos_token_id
    # the student predicts "Hello" from <s>, the teacher has nothing to predict its first token from
    assert aligned[0][0] >= 2 and aligned[0][1] >= 1


@pytest.mark.parametrize("student,teacher", [("llama", "qwen2"), ("qwen2", "llama")])
def test_chat_records_align_through_two_different_chat_templates(tokenizers, student, teacher):
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    messages = [{"role": "user", "content": "Où est 東京?"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "And?"}, {"role": "assistant", "content": " Tokyo 🙂 est au Japon, naïvement."}]
    ids, teacher_ids, aligned, encoder = encode(s_tok, t_tok, "messages", {"messages": messages})
    assert len(ids) != len(teacher_ids)  # [INST] ... [/INST] against ChatML: different prompts
    # both answers are aligned, each up to its own end-of-turn token
    ends = {s_tok.convert_ids_to_tokens(ids[s]) for s, _, _ in aligned} & {"</s>", "<|im_end|>"}
    assert ends and sum(1 for s, _, _ in aligned if ids[s] in s_tok.all_special_ids) == 2
    second = [a for a in aligned if a[0] > next(s for s, _, _ in aligned if ids[s] in s_tok.all_special_ids)]
    check_groups(s_tok, t_tok, ids, teacher_ids, second, encoder.vocab)


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_one_tokenizer_on_both_sides_aligns_and_matches_every_token_one_to_one(tokenizers, family):
    tok = tokenizers[family]
    for text in TEXTS:
        ids, teacher_ids, aligned, _ = encode(tok, tok, "text", {"text": text})
        assert ids == teacher_ids
        first = 2 if ids[0] == tok.bos_token_id else 1  # with a BOS, the text's first token is predicted from it
        assert [(s, t) for s, t, _ in aligned] == [(i, i) for i in range(first, len(ids))]
        assert all(m for *_, m in aligned)  # the end token too: a special token spelled alike on both sides


def test_align_walks_overlapping_and_gapped_ranges():
    # student: "ab" | "c" (a split character: two pieces over [2, 3)) ; teacher: "a" | "bc" ; a gap before "d"
    student = [Piece(1, 0, 2), Piece(2, 2, 3), Piece(3, 2, 3), Piece(4, 4, 5)]
    teacher = [Piece(1, 0, 1), Piece(2, 1, 3), Piece(3, 3, 5)]
    groups = [(g.student, g.teacher, g.student_tokens, g.teacher_tokens) for g in align(student, teacher, 5)]
    assert groups == [(1, 1, 3, 2), (4, 3, 1, 1)]


def test_truncated_records_keep_only_groups_both_sides_hold(tokenizers):
    s_tok, t_tok = tokenizers["llama"], tokenizers["qwen2"]
    ids, teacher_ids, aligned, _ = encode(s_tok, t_tok, "text", {"text": TEXTS[1] * 4}, max_length=24)
    assert len(ids) == 24 and len(teacher_ids) == 24
    assert aligned and all(s < 24 and t < 24 for s, t, _ in aligned)


def test_shared_vocabulary_prefers_merged_tokens_and_shares_special_ones_spelled_alike(tokenizers):
    qwen, llama, gpt2 = tokenizers["qwen2"], tokenizers["llama"], tokenizers["gpt2"]
    vocab = VocabularyMap(qwen, llama)
    comma = llama.convert_tokens_to_ids(",")
    assert vocab.student_ids[vocab.teacher_ids.tolist().index(qwen.convert_tokens_to_ids(","))] == comma
    assert llama.convert_tokens_to_ids("<0x2C>") not in vocab.student_ids.tolist()  # the byte-fallback "," has no partner
    assert not set(qwen.all_special_ids) & set(vocab.teacher_ids.tolist())  # <|im_end|>, <|endoftext|> vs <s>, </s>: none alike
    assert len(vocab) > 10_000
    # special tokens pair by their string: "<|endoftext|>" ends a text in GPT-2 and in Qwen alike
    end = VocabularyMap(qwen, gpt2)
    pairs = dict(zip(end.teacher_ids.tolist(), end.student_ids.tolist()))
    assert pairs[qwen.convert_tokens_to_ids("<|endoftext|>")] == gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert end.matched(qwen.convert_tokens_to_ids("<|endoftext|>"), gpt2.eos_token_id)
    assert not vocab.matched(qwen.convert_tokens_to_ids("<|im_end|>"), llama.eos_token_id)  # "</s>": another string, ULD there
    # one tokenizer on both sides shares every id with itself, byte-fallback spellings and special tokens included
    for tok in (llama, gpt2):
        same = VocabularyMap(tok, tok)
        assert same.teacher_ids.tolist() == same.student_ids.tolist() == list(range(len(tok)))


# -- the objectives on an aligned batch ------------------------------------------------------------
@pytest.mark.parametrize("name", ["uld", "gold"])
def test_uld_and_gold_extend_the_shared_loss_settings_and_refuse_the_fused_head(name):
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kdlab.losses.divergences import LOSS_CONFIG_DIR, loss_config
    from tests.conftest import CONF_DIR

    own = OmegaConf.load(LOSS_CONFIG_DIR / f"{name}.yaml")
    assert "/loss_common/token_level@_here_" in own.defaults and "chunk_size" not in own
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose("train", overrides=[f"loss={name}"]).loss
    assert composed == loss_config(name)  # Hydra and load_loss compose the file alike
    assert (composed.chunk_size, composed.fused_head) == ("auto", False)
    assert instantiate(composed).chunk_size == "auto"
    with pytest.raises(InstantiationException, match="across tokenizers set loss.fused_head=false"):
        instantiate(OmegaConf.merge(composed, {"fused_head": True}))


def aligned_batch(n=7, vs=11, vt=13, groups=(0, 2, 3, 6), matched=(True, False, True, False), shared=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(1, n, vs, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(1, len(groups), vt, generator=g, dtype=dtype)
    labels = torch.randint(0, vs, (1, n), generator=g)
    perm = torch.randperm(vt, generator=g)[:shared]
    return AlignedKDBatch(
        student_logits=student, teacher_logits=teacher, labels=labels, num_tokens=torch.tensor(float(n)),
        aligned_rows=torch.tensor(groups), matched=torch.tensor(matched),
        shared_vocab=(perm, torch.randperm(vs, generator=g)[:shared]),
    )


def test_the_hybrid_is_the_token_level_divergence_when_both_tokenizers_are_the_same():
    v = 17
    batch = aligned_batch(n=9, vs=v, vt=v, groups=tuple(range(9)), matched=(True,) * 9)
    batch.teacher_logits = torch.randn(1, 9, v, dtype=torch.float64)
    batch.shared_vocab = (torch.arange(v), torch.arange(v))
    for ce_weight, weight in ((0.0, 1.0), (1.0, 1.5)):
        ours = gold(ce_weight=ce_weight, weight=weight, chunk_size=None)(batch)
        reference = TokenKD(forward_kl, ce_weight=ce_weight, kd_weight=weight)(
            KDBatch(student_logits=batch.student_logits, teacher_logits=batch.teacher_logits, labels=batch.labels, num_tokens=batch.num_tokens)
        )
        assert ours.loss.item() == pytest.approx(reference.loss.item(), rel=1e-12)
        g1, g2 = torch.autograd.grad(ours.loss, batch.student_logits)[0], torch.autograd.grad(reference.loss, batch.student_logits)[0]
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_uld_term_is_the_sum_over_groups_over_the_student_tokens_and_chunks_exactly():
    from kdlab.losses.uld import uld_distance

    batch = aligned_batch()
    dense = uld(chunk_size=None)(batch)
    by_hand = uld_distance(batch.student_logits[0, batch.aligned_rows], batch.teacher_logits[0]).sum() / 7
    ce = torch.nn.functional.cross_entropy(batch.student_logits[0], batch.labels[0])
    assert dense.loss.item() == pytest.approx(1.0 * ce.item() + 1.5 * by_hand.item(), rel=1e-12)
    assert dense.per_token.sum().item() / 7 == pytest.approx(dense.loss.item(), rel=1e-10)
    chunked = uld(chunk_size=1)(batch)
    assert chunked.loss.item() == pytest.approx(dense.loss.item(), rel=1e-12)
    g1 = torch.autograd.grad(dense.loss, batch.student_logits)[0]
    g2 = torch.autograd.grad(chunked.loss, batch.student_logits)[0]
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_the_hybrid_chunked_equals_the_dense_computation_in_float64(chunk_size, monkeypatch):
    import kdlab.losses.chunked

    calls = []
    original = kdlab.losses.chunked.chunked
    monkeypatch.setattr(kdlab.losses.chunked, "chunked", lambda dense, batch, size: calls.append(size) or original(dense, batch, size))
    groups = (0, 1, 3, 4, 5, 7, 8, 10, 11)  # 5 matched and 4 ULD groups: every chunk size splits both parts
    batch = aligned_batch(n=12, vs=11, vt=13, groups=groups, matched=(True, False, True, True, False, True, False, True, False), seed=3)
    for divergence in (forward_kl, generalized_jsd):
        dense = gold(divergence=divergence, chunk_size=None)(batch)
        assert not calls
        chunked = gold(divergence=divergence, chunk_size=chunk_size)(batch)
        assert calls == [chunk_size] * 3  # the ULD rows, the matched rows and the CE term, each over chunks
        calls.clear()
        assert chunked.loss.item() == pytest.approx(dense.loss.item(), rel=1e-12)
        assert set(chunked.logs) == set(dense.logs) == {"uld", "shared_kd", "kd", "ce"}
        for name in dense.logs:
            assert chunked.logs[name].item() == pytest.approx(dense.logs[name].item(), rel=1e-12), name
        torch.testing.assert_close(chunked.per_token, dense.per_token, rtol=1e-12, atol=1e-14)
        g_dense = torch.autograd.grad(dense.loss, batch.student_logits)[0]
        g_chunked = torch.autograd.grad(chunked.loss, batch.student_logits)[0]
        torch.testing.assert_close(g_chunked, g_dense, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_hybrid_with_one_tokenizer_is_the_token_level_divergence_through_encoding_and_the_aligned_step(tokenizers, family):
    """methods.md §6: records encoded and aligned with one real tokenizer on both sides, the aligned step and
    loss=gold against the teacher-forward step and fkl on the same batch, in float64 (models whose heads have
    exactly the tokenizer's rows: a head's rows past the tokenizer are no token, which the hybrid leaves out)."""
    from transformers import AutoModelForCausalLM

    from examples.tiny_pair import configs
    from kdlab.data.datamodule import KDDataModule
    from kdlab.data.records import Record
    from kdlab.module import DistillModule

    tok = tokenizers[family]
    vocab = VocabularyMap(tok, tok)
    rows = [("text", {"text": text}) for text in TEXTS]
    if tok.chat_template:
        rows.append(("messages", {"messages": [{"role": "user", "content": "Où est 東京?"}, {"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "And?"}, {"role": "assistant", "content": " Tokyo 🙂, naïvement."}]}))
    records = []
    for fmt, record in rows:
        out = Encoder(tok, Encoding(512), Source(Path("x.jsonl"), "d"), fmt, tok, vocab)({k: [v] for k, v in record.items()}, [0])
        aligned = tuple((s, t, bool(m)) for s, t, m in out["aligned"][0])
        assert all(m for *_, m in aligned)  # every group one token, matched: the end-of-turn tokens too
        records.append(Record(tuple(out["input_ids"][0]), tuple(out["targets"][0]), out["prompt_len"][0], "d",
                              teacher_ids=tuple(out["teacher_ids"][0]), aligned=aligned))
    held = [Record((1, 2), (True, True), 0, "d", teacher_ids=(1, 2), aligned=((1, 1, True),))]
    dm = KDDataModule({"train": records, "val": held, "test": held}, tok, max_length=512)
    batch = dm._train_collate([{"record": r, "index": i} for i, r in enumerate(records)])
    torch.manual_seed(0)
    teacher, student = (AutoModelForCausalLM.from_config(c).double() for c in configs(family, tok))
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok) == len(vocab)
    for ce_weight, weight in ((0.0, 1.0), (1.0, 1.5)):
        hybrid = DistillModule(student, teacher, gold(ce_weight=ce_weight, weight=weight, chunk_size=None), tok, vocab_size=len(tok), vocabulary=vocab)
        token_level = DistillModule(student, teacher, TokenKD(forward_kl, ce_weight=ce_weight, kd_weight=weight), tok, vocab_size=len(tok))
        student.eval()  # no dropout: the two steps run the student twice
        ours, reference = hybrid.step(hybrid, batch), token_level.step(token_level, batch)
        assert "uld" not in ours.logs and ours.logs["shared_kd"].item() == pytest.approx(reference.logs["kd"].item(), rel=1e-12)
        assert ours.loss.item() == pytest.approx(reference.loss.item(), rel=1e-12)
        g1 = torch.autograd.grad(ours.loss, list(student.parameters()))
        g2 = torch.autograd.grad(reference.loss, list(student.parameters()))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_hybrid_splits_groups_into_shared_divergence_and_uld():
    from kdlab.losses.uld import shared_vocab_divergence, uld_distance

    batch = aligned_batch()
    out = gold(ce_weight=0.0, weight=1.0, chunk_size=None)(batch)
    rows, matched = batch.aligned_rows, batch.matched
    t_ids, s_ids = batch.shared_vocab
    shared = shared_vocab_divergence(batch.student_logits[0, rows[matched]], batch.teacher_logits[0, matched], s_ids, t_ids, forward_kl)
    rest = uld_distance(batch.student_logits[0, rows[~matched]], batch.teacher_logits[0, ~matched])
    assert out.loss.item() == pytest.approx((shared.sum() + rest.sum()).item() / 7, rel=1e-12)
    assert set(out.logs) == {"uld", "shared_kd", "kd"}


def test_uld_reads_the_teacher_cache_view_and_gold_refuses_it():
    from kdlab.losses.sparse import sparse_teacher

    batch = aligned_batch()
    assert uld().needs.sparse_teacher and not gold().needs.sparse_teacher
    sparse = sparse_teacher(batch.teacher_logits, k=13)  # k = V: no tail, the cache is exact
    exact = uld(chunk_size=None)(batch).loss
    cached = AlignedKDBatch(**{**batch.__dict__, "teacher_logits": None, "teacher_sparse": sparse})
    assert uld(chunk_size=None)(cached).loss.item() == pytest.approx(exact.item(), rel=1e-9)


# -- the preflight ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    """A tiny Qwen2 teacher (ChatML, 151,669 tokens) and a tiny Llama student (Mistral's [INST] format, 32,000 tokens)."""
    return build("qwen2", tmp_path_factory.mktemp("cross-pair"), student_family="llama")


def test_a_same_vocabulary_objective_on_two_tokenizers_is_refused_naming_the_cross_tokenizer_ones(tmp_path, cross_pair):
    teacher, student = cross_pair
    with pytest.raises(ValueError, match=r"maps \d+ of the .* loss=uld or loss=gold"):
        run(hf_cfg(tmp_path / "run", teacher, student, f"data.train={CHAT}", "loss=fkl"))


@pytest.mark.parametrize("loss", ["minillm", "onpolicy"])
def test_on_policy_objectives_on_two_tokenizers_are_refused_with_their_own_reason(tmp_path, cross_pair, loss):
    teacher, student = cross_pair
    with pytest.raises(ValueError, match=r"maps \d+ of the .*on-policy objectives \(loss=minillm, loss=onpolicy\) are not supported across "
                                         r"tokenizers: the teacher would have to score the student's samples.*loss=uld or loss=gold"):
        run(hf_cfg(tmp_path / "run", teacher, student, f"data.train={CHAT}", f"loss={loss}"))


def test_training_the_teacher_first_is_refused_across_tokenizers(tmp_path, cross_pair):
    # refused with the tokenizers, before the data is encoded or a model built
    teacher, student = cross_pair
    overrides = (f"data.train={CHAT}", "loss=uld", "model.teacher_training={max_steps: 5, lr: 1.0e-3}")
    with pytest.raises(ValueError, match="model.teacher_training CE-trains the teacher .* student's token ids .* model.teacher_training=null"):
        run(hf_cfg(tmp_path / "run", teacher, student, *overrides))


def test_an_objective_across_tokenizers_needs_file_data(tiny_cfg):
    with pytest.raises(ValueError, match="data=files or data=python_corpus"):
        run(tiny_cfg("loss=uld"))


# -- whole runs --------------------------------------------------------------------------------------
def test_a_run_across_tokenizers_trains_evaluates_without_teacher_metrics_and_exports(tmp_path, cross_pair, caplog):
    teacher, student = cross_pair
    caplog.set_level("INFO")
    metrics = run(hf_cfg(tmp_path / "run", teacher, student, f"data.train={CHAT}", "loss=gold", "logger=csv"))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert "test/ppl" in metrics and not any("teacher" in k or "agree" in k for k in metrics)
    assert "teacher perplexity, agreement and outputs are left out" in caplog.text
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/shared_kd")]
    assert logged and all(float(r["train/uld"]) >= 0 for r in logged if r.get("train/uld"))
    exported = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert len(exported) == 32000 and "[INST]" in exported.chat_template  # the student's own tokenizer and template

    # kdlab.evaluate scores the exported student on its own tokens, as the run did, without the teacher
    from hydra import compose, initialize_config_dir

    from kdlab.evaluate import evaluate
    from tests.conftest import CONF_DIR

    data = [o for o in SMALL if o.startswith(("data", "eval"))]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ecfg = compose("evaluate", overrides=["model=hf", f"model.teacher.path={teacher}", f"model.student.path={student}", *data,
                                              f"data.train={CHAT}", "trainer.accelerator=cpu", f"student={tmp_path / 'run' / 'student'}"])
    ecfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(ecfg)
    assert scored["test/ppl"] == pytest.approx(metrics["test/ppl"], rel=1e-5) and not any("teacher" in k for k in scored)


@pytest.mark.slow
def test_a_sweep_across_tokenizers_exports_students_that_answer_through_their_own_template(tmp_path, cross_pair):
    teacher, student = cross_pair
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kdlab.train", "-m", "model=hf", f"model.teacher.path={teacher}", f"model.student.path={student}",
           f"data.train={CHAT}", "loss=ce,uld,gold", *SMALL, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows][:3] == ["loss=ce", "loss=uld", "loss=gold"]
    assert all(float(r["test/ppl"]) > 1 for r in rows[:3])
    for job in ("1", "2"):
        exported = sweep / job / "student"
        model = AutoModelForCausalLM.from_pretrained(exported)
        tok = AutoTokenizer.from_pretrained(exported)
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        assert tok.decode(ids[0]).startswith("<s>[INST]")  # its own format, not the teacher's ChatML
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        eos = model.generation_config.eos_token_id  # its turn ends at the student's own end-of-turn token
        assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])


def test_uld_trains_from_the_teacher_cache_at_the_aligned_positions(tmp_path, cross_pair, cache_dir):
    teacher, student = cross_pair
    cfg = hf_cfg(tmp_path / "run", teacher, student, f"data.train={CHAT}", "loss=uld", "teacher_cache.k=16", "logger=csv")
    cfg.paths.cache_dir = str(cache_dir)
    metrics = run(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        assert [r for r in csv.DictReader(f) if r.get("train/uld")]
    with pytest.raises(ValueError, match="reads the teacher's dense logits"):
        run(hf_cfg(tmp_path / "gold", teacher, student, f"data.train={CHAT}", "loss=gold", "teacher_cache.k=16"))


def test_the_cache_reads_the_teacher_where_the_aligned_step_does(tokenizers):
    from kdlab.data.datamodule import KDDataModule
    from kdlab.data.records import Record

    s_tok, t_tok = tokenizers["llama"], tokenizers["qwen2"]
    records = []
    for text in TEXTS:
        ids, teacher_ids, aligned, _ = encode(s_tok, t_tok, "text", {"text": text})
        records.append(Record(tuple(ids), (True,) * len(ids), 0, "d", teacher_ids=tuple(teacher_ids), aligned=tuple(aligned)))
    held = [Record((1, 2), (True, True), 0, "d", teacher_ids=(3, 4), aligned=((1, 1, False),))]
    dm = KDDataModule({"train": records, "val": held, "test": held}, s_tok, max_length=512)
    batch = dm._train_collate([{"record": r, "index": i} for i, r in enumerate(records)])
    cached = dm.teacher_sequences(records)
    assert torch.equal(cached["input_ids"], batch["teacher_input_ids"])
    assert torch.equal(cached["labels"], batch["teacher_labels"])
    assert [dm.teacher_positions(r) for r in records] == [len(r.aligned) for r in records]
    kd_teacher = batch["teacher_labels"] != -100
    assert int(batch["kd_student"].sum()) == int(kd_teacher.sum()) == sum(len(r.aligned) for r in records)
    assert "teacher_input_ids" not in dm.collate([{"record": records[0], "index": 0}])  # evaluation reads the student alone


@pytest.mark.slow
def test_smollm2_aligns_with_qwen_llama_and_gpt2_on_text_and_chat(tokenizers, cache_dir):
    from kdlab.gguf import smollm2_file
    from kdlab.models import load_tokenizer

    smol = load_tokenizer(gguf_file=smollm2_file(), cache_dir=str(cache_dir))
    for name, other in tokenizers.items():
        for student, teacher in ((other, smol), (smol, other)):
            for text in TEXTS:
                ids, teacher_ids, aligned, encoder = encode(student, teacher, "text", {"text": text})
                check_groups(student, teacher, ids, teacher_ids, aligned, encoder.vocab)
            if student.chat_template and teacher.chat_template:  # SmolLM2's ChatML (with its system prompt) against the other's
                messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": TEXTS[1]}]
                ids, teacher_ids, aligned, encoder = encode(student, teacher, "messages", {"messages": messages})
                check_groups(student, teacher, ids, teacher_ids, aligned, encoder.vocab)
