"""DistillModule: the frozen teacher, the schedule, and left-padded greedy generation."""

import math

import pytest
import torch
from transformers import LlamaConfig

from kdlab.data.suite import build_tokenizer
from kdlab.losses.divergences import load_loss
from kdlab.models import from_config
from kdlab.module import DistillModule, warmup_cosine


def tiny(tokenizer, hidden=16, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)
    return from_config(config, tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_teacher_stays_frozen_and_in_eval_mode(tokenizer):
    teacher, student = tiny(tokenizer, 32, seed=1), tiny(tokenizer)
    module = DistillModule(student, teacher, load_loss("fkl"), tokenizer)
    module.train()
    assert module.student.training and not module.teacher.training
    before = [p.clone() for p in teacher.parameters()]
    ids = torch.randint(5, len(tokenizer), (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(-1, 1), "domain": torch.zeros(2, dtype=torch.long)}
    module.training_step(batch, 0).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.ndim >= 2)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    # only student parameters are optimised
    optimised = {id(p) for group in torch.optim.AdamW([p for p in module.student.parameters()]).param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_checkpoint_hook_strips_the_teacher(tokenizer):
    module = DistillModule(tiny(tokenizer), tiny(tokenizer, 32), load_loss("fkl"), tokenizer)
    checkpoint = {"state_dict": module.state_dict()}
    assert any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])


def test_left_padded_greedy_generation_equals_unpadded(tokenizer):
    model = tiny(tokenizer, 32, seed=3).eval()
    prompts = [[1, 10, 11, 12, 13], [1, 14, 15]]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(p) :].tolist() for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert batched[:, width:].tolist() == alone


def test_the_frozen_teacher_raises_no_eval_mode_warning_but_a_student_in_eval_mode_does(tokenizer):
    import warnings

    import lightning as L

    def fit_once(student_mode: bool) -> list[str]:
        module = DistillModule(tiny(tokenizer), tiny(tokenizer, 32), load_loss("fkl"), tokenizer)
        ids = torch.randint(5, len(tokenizer), (2, 6))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(-1, 1), "domain": torch.zeros(2, dtype=torch.long)}
        if not student_mode:  # a student layer left in eval mode by mistake
            module.on_train_start = lambda: (module.student.model.layers[0].eval(), DistillModule.on_train_start(module))
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
        with warnings.catch_warnings(record=True) as caught:  # as a caller (pytest) does: no filter survives from import
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
        return [str(w.message) for w in caught if "eval mode" in str(w.message)]

    assert fit_once(student_mode=True) == []
    messages = fit_once(student_mode=False)
    assert len(messages) == 1 and "student module(s) are in eval mode" in messages[0], messages
