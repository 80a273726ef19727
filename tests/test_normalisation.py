"""The loss of an optimiser step is Σ(valid tokens) / N(valid tokens) of the whole step, under gradient accumulation too."""

import warnings

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaConfig

from kdlab.data.datamodule import split_batch
from kdlab.data.suite import SuiteDataModule, build_tokenizer
from kdlab.losses import IGNORE_INDEX
from kdlab.losses.divergences import loss_config
from kdlab.models import from_config
from kdlab.module import DistillModule
from kdlab.train import run

OFF_POLICY = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]


def tiny(tok, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    return from_config(config, tok).double()


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    dm = SuiteDataModule(tok, splits=dict(n_train=8, n_val=2, n_test=2, seed=1), batch_size=4)
    items = dm._dataset("train")[::2][:16]  # every domain, answers of different lengths
    return tok, dm, dm.collate(items)


@pytest.mark.parametrize("name", OFF_POLICY)
def test_accumulating_four_micro_batches_gives_the_gradient_of_one_batch_of_four_times_the_size(setup, name):
    tok, dm, full = setup
    loss = instantiate(loss_config(name))
    module = DistillModule(tiny(tok, 0), tiny(tok, 1), loss, tok)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here

    def gradient(batches, scale):
        module.student.zero_grad()
        for batch in batches:
            (module.training_step(batch, 0) * scale).backward()
        return torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])

    one_batch = gradient([full], 1.0)
    micro = split_batch(full, 4)
    counts = [int((m["labels"] != IGNORE_INDEX).sum()) for m in micro]
    assert len(set(counts)) > 1, counts  # uneven valid-token counts across the micro-batches
    window = int((full["labels"] != IGNORE_INDEX).sum())
    for m in micro:
        m.update(window_tokens=torch.tensor(window), window_size=torch.tensor(4))
    accumulated = gradient(micro, 1 / 4)  # Lightning divides each micro-batch loss by accumulate_grad_batches
    torch.testing.assert_close(accumulated, one_batch, rtol=1e-10, atol=1e-12)
    # normalising each micro-batch by its own count (what accumulation did before) is measurably different
    for m in micro:
        del m["window_tokens"], m["window_size"]
    assert not torch.allclose(gradient(micro, 1 / 4), one_batch, rtol=1e-6, atol=0)


def test_micro_batches_keep_every_record_once_and_trim_their_padding(setup):
    _, _, full = setup
    micro = split_batch(full, 4)
    assert torch.equal(torch.cat([m["index"] for m in micro]), full["index"])
    for m in micro:
        assert m["attention_mask"][:, -1].any() and m["prompt_mask"][:, 0].any()  # no all-padding column left


def test_a_run_with_gradient_accumulation_trains(tiny_cfg):
    metrics = run(tiny_cfg("trainer.accumulate_grad_batches=2", "data.batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert metrics["test/ppl"] > 1.0
