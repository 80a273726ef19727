"""Building teacher and student language models, and checking that they can be distilled."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def from_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM from a transformers config (the embedded default pair).

    The vocabulary size and the special-token ids are taken from the tokenizer, so a config
    file never repeats them and cannot disagree with the tokenizer.
    """
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_folder(path: str, what: str) -> Path:
    """A local Hugging Face model folder, or an error that says what is wrong with it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist; point it at a local Hugging Face folder (one written by save_pretrained)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} path {str(folder)!r} is a file, not a folder; give the folder that holds config.json and the weights")
    return folder


def check_source(path: str | None, gguf_file: str | None, role: str) -> None:
    """A pretrained model comes from exactly one of a folder (``path``) and a GGUF file (``gguf_file``)."""
    if (not path) == (not gguf_file):
        given = "both" if gguf_file else "neither"
        raise ValueError(f"{role}: give exactly one of path (a Hugging Face folder) and gguf_file (a .gguf file); {given} was given")


def model_folder(path: str | None, gguf_file: str | None, cache_dir: str | None, role: str) -> Path:
    """The local folder a model or tokenizer is read from: ``path`` itself, or the cached conversion of
    ``gguf_file`` (kdlab/gguf.py). Exactly one of the two is given."""
    check_source(path, gguf_file, role)
    if not gguf_file:
        return _check_folder(path, role)
    from kdlab.gguf import converted

    return converted(gguf_file, cache_dir or "~/.cache/kdlab", role)


def from_pretrained(
    path: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    role: str = "model",
    tokenizer=None,
) -> PreTrainedModel:
    """A causal LM from a local Hugging Face folder or a GGUF file (no hub access: ``local_files_only``).

    ``gguf_file``: any GGUF that transformers can dequantise, converted once into a folder under
    ``cache_dir`` (kdlab/gguf.py) and read from there. ``dtype``: ``float32``, ``bfloat16``,
    ``float16`` or ``auto`` (bfloat16 on a GPU that supports it, float32 otherwise; a teacher only
    runs forwards, so bf16 halves its memory). The student should stay float32 and train under
    ``trainer.precision=bf16-mixed``. ``attn_implementation``: e.g. ``sdpa``, ``flash_attention_2``,
    ``eager``; None = transformers' default. The folder must hold a config and weights
    (``check_causal`` then tests that the model is a causal decoder). ``tokenizer`` is accepted for
    symmetry with :func:`from_config` and unused: the folder's model has its vocabulary already.
    """
    folder = model_folder(path, gguf_file, cache_dir, role)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{role} folder {str(folder)!r} has no config.json: it is not a Hugging Face model folder")
    if not any(next(folder.glob(p), None) for p in WEIGHT_FILES):
        raise FileNotFoundError(f"{role} folder {str(folder)!r} has config.json but no weights (*.safetensors or *.bin)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{role} {str(folder)!r} is an encoder-decoder ({config.model_type}); kdlab distils causal decoders only")
    kwargs = {"dtype": resolve_dtype(dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    except ValueError as err:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise ValueError(f"{role} {str(folder)!r} ({config.model_type}) is not a causal language model: {err}") from None
    except Exception as err:  # e.g. safetensors' "incomplete metadata, file not fully covered": a truncated copy
        if type(err).__module__.split(".")[0] not in ("safetensors", "torch", "pickle", "_pickle"):
            raise
        raise ValueError(
            f"{role} {str(folder)!r}: its weight files cannot be read ({type(err).__name__}: {err}); a copy was probably "
            "cut short (a full disk, an interrupted download): copy or export the model again"
        ) from err
    missing = sorted(loading["missing_keys"])
    if missing:  # transformers would randomly initialise them and only say so in its load report
        raise ValueError(
            f"{role} {str(folder)!r}: its weight files do not cover its config.json: {len(missing)} tensors are missing "
            f"(first: {missing[:3]}) and would be randomly initialised. The weights are incomplete or belong to another "
            "config (e.g. fewer layers); re-export the model with save_pretrained"
        )
    return model


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"model dtype {name!r} is unknown; choose auto or one of {sorted(dtypes)}")
    return dtypes[name]


@torch.no_grad()
def check_causal(model: PreTrainedModel, role: str, where: str = "") -> None:
    """Fail unless the first positions' logits ignore the tokens after them.

    A model with a bidirectional encoder (e.g. a BERT LM head, which AutoModelForCausalLM loads)
    reads future tokens and would train to a meaningless perplexity. Two 8-token inputs that
    differ in their last 4 tokens are compared on the first 4 positions: a causal decoder gives
    the same logits there (exactly, in practice), a bidirectional model does not (a random-init
    BERT: 6e-3 of the logits' spread; the threshold is 1e-4).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(1, 9, device=model.device).remainder(vocab).unsqueeze(0)
    changed = ids.clone()
    changed[0, 4:] = (ids[0, 4:] + vocab // 2) % vocab
    was_training = model.training
    model.eval()
    a, b = model(input_ids=ids).logits[0, :4].float(), model(input_ids=changed).logits[0, :4].float()
    model.train(was_training)
    if (a - b).abs().max() > 1e-4 * (a.std() + 1e-12):
        raise ValueError(
            f"{role} {where!r} is not causal: its predictions at earlier positions change with later tokens "
            f"({type(model).__name__}); kdlab needs causal decoders (e.g. Llama, Qwen2, GPT-2 families)"
        )


def load_tokenizer(path: str | None = None, gguf_file: str | None = None, cache_dir: str | None = None, role: str = "teacher"):
    """The tokenizer of a local model folder or GGUF file (a pad token is set to <eos> if it has none)."""
    folder = model_folder(path, gguf_file, cache_dir, f"{role} tokenizer")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{role} folder {str(folder)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); set model.tokenizer.path to a folder that has them")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {str(folder)!r} has no eos token; kdlab needs one to end responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id works
    return tokenizer


def check_tokenizers(tokenizer, student_path: str | None, across: bool = False, on_policy: bool = False):
    """Preflight: the tokenizer the student reads, ``tokenizer`` (the teacher's) unless the student's
    folder has its own that differs.

    Token-level distillation needs one tokenizer: both must map every id they share to the same
    token and have the same special tokens, or the two distributions are over different things; a
    differing student tokenizer is refused, naming the first differing ids. ``across``: the
    objective works across tokenizers (``loss=uld``, ``loss=gold``), so a differing one is returned.
    ``on_policy``: the objective trains on rollouts, which the refusal says are not supported across tokenizers.
    """
    if student_path is None:
        return tokenizer
    folder = Path(student_path).expanduser()
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return tokenizer  # no tokenizer of its own: it uses the teacher's
    student_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    difference = _difference(tokenizer, student_tok)
    if difference is None:
        return tokenizer
    if across:
        log.info("the student reads its own tokenizer (%s): %s; distilling across tokenizers", folder, difference)
        if student_tok.pad_token_id is None:
            student_tok.pad_token = student_tok.eos_token
        return student_tok
    if on_policy:
        raise ValueError(
            f"the student's tokenizer ({folder}) {difference}; on-policy objectives (loss=minillm, loss=onpolicy) are not "
            "supported across tokenizers: the teacher would have to score the student's samples, which are ids of another "
            "vocabulary. Pick a student of the teacher's family, or distil across tokenizers off-policy with loss=uld or loss=gold"
        )
    raise ValueError(
        f"the student's tokenizer ({folder}) {difference}; token-level distillation needs one tokenizer. Pick a "
        "student of the teacher's family, or distil across tokenizers with loss=uld or loss=gold"
    )


def _difference(tokenizer, student_tok) -> str | None:
    shared = min(len(tokenizer), len(student_tok))
    teacher_tokens = tokenizer.convert_ids_to_tokens(list(range(shared)))
    student_tokens = student_tok.convert_ids_to_tokens(list(range(shared)))
    differing = [i for i in range(shared) if teacher_tokens[i] != student_tokens[i]]
    if differing:
        shown = ", ".join(f"{i}: {teacher_tokens[i]!r} vs {student_tokens[i]!r}" for i in differing[:5])
        return f"maps {len(differing)} of the {shared} shared ids to other tokens than the teacher's (first: {shown})"
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {n: (getattr(tokenizer, n), getattr(student_tok, n)) for n in names}
    special = {n: v for n, v in special.items() if v[0] != v[1] and not (n == "pad_token" and None in v)}
    if special:
        return "has other special tokens than the teacher's: " + ", ".join(f"{n}: {t!r} (teacher) vs {s!r} (student)" for n, (t, s) in special.items())
    return None


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence ``model``'s position embeddings cover (None: not bounded by its config)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: PreTrainedModel, role: str, longest: int, what: str) -> None:
    """Every sequence a run feeds (``longest`` tokens: ``what`` says whence) fits the model's positions."""
    limit = max_positions(model)
    if limit is not None and longest > limit:
        raise ValueError(
            f"{what} needs {longest} positions, and the {role} has {limit} (its config's position limit): it would fail "
            f"at the first step. Set data.max_length (and data.max_new_tokens) so that they fit in {limit}"
        )


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def distillation_vocab_size(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer) -> int:
    """The number of logits over which teacher and student are compared.

    Equal vocabularies are compared whole. Model families that pad the embedding matrix up to a
    round size (e.g. 32000 → 32064) differ only past the tokenizer's vocabulary, so both are then
    compared over the tokenizer's ``len(tokenizer)`` entries. Anything else cannot be distilled
    token by token and is an error.
    """
    v_teacher = teacher.get_output_embeddings().weight.shape[0]
    v_student = student.get_output_embeddings().weight.shape[0]
    if v_teacher == v_student:
        return v_teacher
    v_tokenizer = len(tokenizer)
    if min(v_teacher, v_student) >= v_tokenizer:
        log.info(
            "teacher vocabulary (%d) and student vocabulary (%d) differ only by padding; comparing them over "
            "the tokenizer's %d tokens",
            v_teacher,
            v_student,
            v_tokenizer,
        )
        return v_tokenizer
    raise ValueError(
        f"teacher vocabulary size {v_teacher} and student vocabulary size {v_student} do not match, and the "
        f"smaller one does not cover the tokenizer's {v_tokenizer} tokens: token-level distillation needs "
        "teacher and student to share a tokenizer. Pick a student from the teacher's model family (or build it "
        "from a config with the teacher's tokenizer)."
    )


# -- students initialised from the teacher ---------------------------------------------------------


def _layer_stack(model: PreTrainedModel) -> str:
    """The state-dict prefix of the decoder's list of layers (``model.layers`` for Llama, Qwen2,
    Mistral; ``transformer.h`` for GPT-2): the one ModuleList with ``num_hidden_layers`` entries."""
    n = model.config.num_hidden_layers
    stacks = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(stacks) != 1:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (ModuleLists of {n} entries: {stacks})")
    return stacks[0]


def layers_to_keep(num_layers: int, every: int | None, layers: list[int] | None) -> list[int]:
    """The teacher layers a depth-pruned student keeps: an explicit list, or every ``every``-th from the first."""
    if (every is None) == (layers is None):
        raise ValueError("model.student: give exactly one of every (keep every k-th layer) and layers (a list of layer indices)")
    if layers is None:
        if every < 1:
            raise ValueError(f"model.student.every must be >= 1, got {every}")
        return list(range(0, num_layers, every))
    keep = [int(i) for i in layers]
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"model.student.layers must be increasing, distinct indices in [0, {num_layers}), got {list(layers)}")
    return keep


def pruned(
    path: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    every: int | None = None,
    layers: list[int] | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    role: str = "student",
    tokenizer=None,
) -> PreTrainedModel:
    """A depth-pruned copy of a pretrained model: a subset of its decoder layers, everything else
    (embeddings, final norm, output head) copied from it, the weights copied exactly.

    The student initialisation of DistilBERT (Sanh et al., 2019: one layer out of two of the
    teacher) and Minitron's depth pruning (Muralidharan et al., 2024; docs/methods.md §5): keep
    ``layers`` (indices into the source's layers) or every ``every``-th layer from the first. The
    model is rebuilt from the source's config with fewer layers and given the kept layers' weights
    renumbered, so its config, caches and attention indices are those of a model of that depth and
    it saves as an ordinary Hugging Face folder.
    """
    source = from_pretrained(path, gguf_file, cache_dir, dtype=dtype, attn_implementation=attn_implementation, role=f"{role} (its source)")
    keep = layers_to_keep(source.config.num_hidden_layers, every, layers)
    stack = _layer_stack(source)
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        config.layer_types = [source.config.layer_types[i] for i in keep]
    renumbered = {}
    for key, value in source.state_dict().items():
        if not key.startswith(stack + "."):
            renumbered[key] = value
            continue
        index, rest = key[len(stack) + 1 :].split(".", 1)
        if int(index) in keep:
            renumbered[f"{stack}.{keep.index(int(index))}.{rest}"] = value
    model = AutoModelForCausalLM.from_config(config, dtype=source.dtype)
    model.load_state_dict(renumbered, strict=True)
    model.generation_config = source.generation_config
    log.info("%s: layers %s of the source's %d (%.1fM of %.1fM parameters)", role, keep, source.config.num_hidden_layers,
             parameter_count(model) / 1e6, parameter_count(source) / 1e6)
    return model


def of_family(
    path: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    sizes: dict | None = None,
    role: str = "student",
    tokenizer=None,
) -> PreTrainedModel:
    """A randomly initialised model of the source's family: its config (architecture, vocabulary,
    special tokens, positions) with ``sizes`` overriding e.g. ``num_hidden_layers``, ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``."""
    folder = model_folder(path, gguf_file, cache_dir, f"{role} (its source)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for key, value in (sizes or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model.{role}.sizes.{key}: {config.model_type} configs have no such field")
        setattr(config, key, value)
    if getattr(config, "head_dim", None) and "hidden_size" in (sizes or {}):
        config.head_dim = config.hidden_size // config.num_attention_heads  # the source's head_dim is for its width
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    return AutoModelForCausalLM.from_config(config)
