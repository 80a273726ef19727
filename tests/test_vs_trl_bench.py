"""bench/vs_trl.py without TRL: the batch laid out for GKDTrainer labels the same tokens, and a missing TRL is a message."""

import sys

import torch

from bench import common, vs_trl
from kdlab.losses.base import IGNORE_INDEX


def _batch():
    # two right-padded records as kdlab's DataModule lays them out: labels aligned with the logits
    # (position t holds token t+1), -100 on the prompt, the <eos> position and padding; prompts left-padded
    input_ids = torch.tensor([[1, 7, 8, 5, 9, 2, 0], [1, 7, 5, 9, 9, 9, 2]])
    attention_mask = (input_ids != 0).long()
    attention_mask[:, 0] = 1
    labels = torch.tensor([[-100, -100, -100, 9, 2, -100, -100], [-100, -100, 9, 9, 9, 2, -100]])
    prompt_ids = torch.tensor([[1, 7, 8, 5], [0, 1, 7, 5]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def test_trl_layout_labels_the_same_tokens():
    batch = _batch()
    out = vs_trl.make_chatml_layout_collator(pad_token_id=0)(vs_trl.trl_features(batch))
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    for i in range(2):
        n = int(batch["attention_mask"][i].sum())
        # TRL's compute_loss pairs logits[:, :-1] with labels[:, 1:]; the sequences are left-padded
        assert out["input_ids"][i, -n:].tolist() == batch["input_ids"][i, :n].tolist()
        assert out["labels"][i, 1:][-(n - 1):].tolist() == batch["labels"][i, : n - 1].tolist()
        assert out["labels"][i, : out["labels"].shape[1] - n + 1].eq(IGNORE_INDEX).all()
        p = int(batch["prompt_mask"][i].sum())
        assert out["prompts"][i, -p:].tolist() == batch["prompt_ids"][i, -p:].tolist()
        assert out["prompt_attention_mask"][i].sum() == p
    assert (out["labels"][:, 1:] != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()


def test_missing_trl_is_a_message_not_an_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    monkeypatch.setattr(sys, "argv", ["vs_trl"])
    vs_trl.main()
    assert "not importable" in capsys.readouterr().out


def test_the_sampling_timer_passes_calls_through_and_records_one_time_each():
    times = []
    fn = common.timing(lambda a, b=0: a + b, times, "cpu")
    assert fn(2, b=3) == 5 and fn(1) == 1
    assert len(times) == 2 and all(t >= 0 for t in times)
