"""Rollout generation speed: tokens sampled per second with KV caches vs without, side by side.

    python -m bench.rollout_speed [--device cuda] [--repeats 5] [--batch 64] [--max-new-tokens 12 32] [--threads 1]

Samples continuations of one training batch's prompts with :func:`kdlab.rollout.sample` on the
default teacher/student pair (untrained: the speed does not depend on the weights), the two
paths interleaved so that machine noise hits both alike. Both paths draw the same tokens from the
same seed (tests/test_rollout.py checks it), so they sample the same number of tokens. Rows:
MiniLLM's teacher-mixed sampling (both models step, α = 0.2) and the student alone (on-policy KD).
A second table: on-policy KD's rollout (α = 0, the teacher's log-probs needed) with the teacher
stepping beside the student at every token vs the student alone and one teacher forward pass on
the finished sequences (kdlab's path), same tokens drawn.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import default_config, default_pair_and_batch, interleaved_medians
from kdlab.rollout import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=None, help="default: the suite's answer length, and 32")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: steady timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = default_config(f"data.batch_size={args.batch}")
    tokenizer, teacher, student, batch = default_pair_and_batch(cfg, args.device)
    student.eval()
    lengths = args.max_new_tokens or [int(batch["labels"].ne(-100).sum(-1).max()), 32]

    def sampler(with_teacher: bool, mix: float, new_tokens: int, cache: bool, step_teacher=None):
        def go():
            return sample(
                student,
                teacher if with_teacher else None,
                batch["prompt_ids"],
                batch["prompt_mask"],
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=new_tokens,
                teacher_mix=mix,
                use_cache=cache,
                generator=torch.Generator(args.device).manual_seed(0),
                step_teacher=step_teacher,
            )

        return go

    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} prompts of up to {batch['prompt_ids'].shape[1]} tokens, repeats={args.repeats} (medians)")
    print(f"{'rollout':<34} {'new':>4} {'tokens':>7} {'tok/s cached':>13} {'tok/s no cache':>15} {'speed-up':>9}")
    for name, with_teacher, mix in (("teacher-mixed (both models, a=0.2)", True, 0.2), ("student alone", False, 0.0)):
        for n in lengths:
            fns = {c: sampler(with_teacher, mix, n, c) for c in (True, False)}
            a, b = fns[True](), fns[False]()
            assert torch.equal(a.sequences, b.sequences), "cached and uncached paths drew different tokens"
            tokens = int(a.lengths.sum())
            t = interleaved_medians({"cached": fns[True], "plain": fns[False]}, args.device, args.repeats, warmup=1)
            print(f"{name:<34} {n:>4} {tokens:>7} {tokens / t['cached']:>13.0f} {tokens / t['plain']:>15.0f} {t['plain'] / t['cached']:>8.2f}x")

    print(f"\n{'on-policy rollout with teacher log-probs':<42} {'new':>4} {'tok/s stepping':>15} {'tok/s scored':>13} {'speed-up':>9}")
    for n in lengths:
        fns = {"stepping": sampler(True, 0.0, n, True, step_teacher=True), "scored": sampler(True, 0.0, n, True)}
        a, b = fns["stepping"](), fns["scored"]()
        assert torch.equal(a.sequences, b.sequences), "the two paths drew different tokens"
        tokens = int(a.lengths.sum())
        t = interleaved_medians(fns, args.device, args.repeats, warmup=1)
        print(f"{'student alone, teacher stepping vs scored':<42} {n:>4} {tokens / t['stepping']:>15.0f} {tokens / t['scored']:>13.0f} {t['stepping'] / t['scored']:>8.2f}x")


if __name__ == "__main__":
    main()
