"""Students initialised from the teacher: depth pruning (exact weights, the forward of the kept layers)
and a smaller random-init model of the teacher's family."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdlab.models import layers_to_keep, of_family, pruned


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 5-layer Llama folder with random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("source")
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize(("every", "layers", "keep"), [(2, None, [0, 2, 4]), (None, [1, 4], [1, 4]), (1, None, [0, 1, 2, 3, 4])])
def test_pruning_keeps_the_chosen_layers_weights_exactly(source, every, layers, keep):
    folder, model = source
    student = pruned(str(folder), every=every, layers=layers)
    assert student.config.num_hidden_layers == len(keep)
    theirs, ours = model.state_dict(), student.state_dict()
    assert len(ours) == len(theirs) - (5 - len(keep)) * sum(k.startswith("model.layers.0.") for k in theirs)
    for key, value in ours.items():
        if key.startswith("model.layers."):
            index, rest = key.removeprefix("model.layers.").split(".", 1)
            key = f"model.layers.{keep[int(index)]}.{rest}"
        assert torch.equal(value, theirs[key]), key
    # the forward is the source's with the dropped layers skipped
    ids = torch.randint(0, 64, (2, 9))
    dropped = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    full, model.model.layers = model.model.layers, dropped
    try:
        expected = model(input_ids=ids, use_cache=False).logits
    finally:
        model.model.layers = full
    torch.testing.assert_close(student.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_a_pruned_student_generates_with_its_cache_and_saves_as_a_plain_folder(source, tmp_path):
    folder, _ = source
    student = pruned(str(folder), layers=[0, 3]).eval()
    ids = torch.randint(0, 64, (1, 5))
    greedy = student.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # the cache-free continuation gives the same tokens: the renumbered layers index the KV cache right
    step = ids
    for _ in range(6):
        step = torch.cat([step, student(input_ids=step, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, step)
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert again.config.num_hidden_layers == 2
    torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits)


@pytest.mark.parametrize(("every", "layers", "match"), [(None, None, "exactly one"), (2, [0], "exactly one"), (0, None, ">= 1"),
                                                       (None, [3, 1], "increasing"), (None, [0, 5], r"\[0, 5\)"), (None, [], "increasing")])
def test_bad_layer_choices_are_refused(every, layers, match):
    with pytest.raises(ValueError, match=match):
        layers_to_keep(5, every, layers)


def test_a_smaller_model_of_the_family_from_a_random_init(source):
    folder, model = source
    student = of_family(str(folder), sizes={"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16})
    assert type(student) is type(model)
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.vocab_size) == (2, 8, 64)
    assert student.config.max_position_embeddings == model.config.max_position_embeddings
    assert student(input_ids=torch.randint(0, 64, (1, 4))).logits.shape == (1, 4, 64)
    with pytest.raises(ValueError, match="no such field"):
        of_family(str(folder), sizes={"num_layerz": 2})


@pytest.mark.parametrize(("overrides", "match"), [([], "model.teacher: give exactly one .* neither"),
                                                  (["model.teacher.path=/a", "model.teacher.gguf_file=/b.gguf"], "both"),
                                                  (["model.teacher.path=/a"], "model.student: give exactly one .* neither")])
def test_a_pretrained_model_needs_exactly_one_source_before_anything_runs(tmp_path, overrides, match):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from kdlab.preflight import check_model_sources
    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", *overrides])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path)
    with pytest.raises(ValueError, match=match):
        check_model_sources(cfg.model)


def test_weights_that_do_not_cover_the_config_are_refused(source, tmp_path):
    """A config of 6 layers over the weights of 5: transformers would initialise layer 5 at random."""
    import json
    import shutil

    from kdlab.models import from_pretrained

    folder, _ = source
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match=r"do not cover its config.json: 9 tensors are missing \(first: \['model.layers.5"):
        from_pretrained(str(tmp_path / "m"), role="teacher")
    assert from_pretrained(str(folder)).config.num_hidden_layers == 5  # a complete folder loads


def test_a_truncated_weight_file_is_named_with_its_folder(source, tmp_path):
    import shutil

    from kdlab.models import from_pretrained

    folder, _ = source
    shutil.copytree(folder, tmp_path / "m")
    (weights,) = (tmp_path / "m").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"student '.*m': its weight files cannot be read \(SafetensorError.*cut short"):
        from_pretrained(str(tmp_path / "m"), role="student")
