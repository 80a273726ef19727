"""Cost of a KD training step against its unavoidable parts, on the default pair.

    python -m bench.step_overhead [--device cuda] [--repeats 30]

Prints, measured side by side in one process: a teacher forward (no_grad), a student CE
training step, and a KD training step (teacher forward + student step with forward KL) as
DistillModule runs it; the ratio KD / (teacher forward + CE step) is kdlab's overhead (goal ≤ 1.10).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import default_config, default_pair_and_batch, interleaved_medians
from kdlab.losses.divergences import load_loss
from kdlab.module import DistillModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--loss", default="fkl")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = default_config()
    tokenizer, teacher, student, batch = default_pair_and_batch(cfg, args.device)
    kd = DistillModule(student, teacher, load_loss(args.loss), tokenizer)
    ce = DistillModule(student, teacher, load_loss("ce"), tokenizer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step(module):
        def run():
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    t = interleaved_medians(
        {"teacher forward": lambda: kd.teacher_logits(batch), "student CE step": step(ce), f"KD step ({args.loss})": step(kd)},
        args.device,
        args.repeats,
    )
    shape = tuple(batch["input_ids"].shape)
    print(f"device={args.device} batch={shape} vocab={len(tokenizer)} repeats={args.repeats} (medians)")
    for name, seconds in t.items():
        print(f"  {name:<22} {seconds * 1e3:8.2f} ms")
    ratio = t[f"KD step ({args.loss})"] / (t["teacher forward"] + t["student CE step"])
    print(f"ratio KD step / (teacher forward + CE step) = {ratio:.3f}   (goal <= 1.10)")


if __name__ == "__main__":
    main()
