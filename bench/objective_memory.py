"""Peak memory and time of one objective's forward + backward: dense, chunked and fused, side by side.

    python -m bench.objective_memory [--rows 1024] [--vocab 32000 151936] [--chunk auto] [--hidden 896] [--device cpu]
    python -m bench.objective_memory --real --rows 2048      # SmolLM2's real hidden states and heads (V = 49,152, H = 576)

For every token-level objective of kdlab/conf/loss (ce, fkl, rkl, jsd, skl, srkl, tvd, rlkd), two comparisons:

1. On (N, V) float32 logits (the inputs: student logits, teacher logits, labels), ``dense``
   (``chunk_size=null``) vs ``chunked`` (the config's default): what the objective itself costs.
2. From hidden states (``--hidden`` H, default 896 = Qwen2-0.5B's; 0 skips this part), with inputs
   the student's and the teacher's last hidden states (N, H) and output heads (V, H):
   ``head+chunked`` computes both (N, V) logits (h Wᵀ, the teacher's under no_grad) and then the
   chunked objective, which is what ``DistillModule`` does with ``loss.fused_head=false``;
   ``fused`` is ``loss.fused_head=true`` (kdlab/losses/fused.py: no (N, V) logits at all). Both do
   the same four (N, H, V) matmuls (two head forwards, grad_h, grad_W), so their times compare the
   head's cost too, and both produce the same gradients w.r.t. h and W. Those gradients, (N + V)·H
   floats, are a floor that no method avoids (``floor`` in the header; ``fused-floor`` is what the
   fused path keeps above it: the chunk's logits and softmaxes).
3. With ``--prompt-fraction f`` (e.g. 0.5: instruction data whose prompts are as long as their
   answers), the first f·N positions carry ``labels == -100``; inputs are hidden states and heads
   as in 2. ``all rows`` applies both heads to every position and hands the objective every row,
   masked ones included (the cost before rows were selected); ``labelled`` applies the heads to
   the labelled positions only (``kdlab.heads.labelled_logits``, what ``DistillModule`` does),
   dense and chunked objectives; ratios labelled / all rows. Memory is in (N, V) tensors of all N.

4. With ``--real``, the inputs of 2. are real: the last hidden states of SmolLM2-135M-Instruct and of
   its depth-pruned student (experiment=real) at the labelled positions of the Python corpus's
   training batches, their output heads (the tied embeddings, V = 49,152, H = 576) and the labels;
   gathered once, by a process of their own, into a temporary file that every measurement loads.

Memory is the peak above the inputs, in units of one (N, V) float32 tensor; the gradients that
every backward pass produces (the student logits', or h's and W's) are included. On CPU each
measurement runs in a fresh process and reads its peak resident memory (``ru_maxrss``, with large
blocks from mmap so that it tracks live tensors); on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ["ce", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "rlkd"]
# large blocks from mmap, so that freed memory leaves the process and its peak RSS tracks live tensors
# (glibc otherwise keeps freed chunks of up to 32 MiB on its heap)
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def real_inputs(rows: int, path: Path) -> None:
    """Part 4's inputs (module docstring), written to ``path``: (h, h_t, w, w_t, labels) of ``rows`` positions."""
    import torch

    from bench.common import real_pair
    from kdlab.heads import last_hidden_rows
    from kdlab.losses.base import IGNORE_INDEX

    _, datamodule, teacher, student = real_pair()
    h, h_t, labels = [], [], []
    with torch.no_grad():
        for batch in datamodule.train_dataloader():
            mask = batch["labels"] != IGNORE_INDEX
            h.append(last_hidden_rows(student, batch, mask))
            h_t.append(last_hidden_rows(teacher, batch, mask))
            labels.append(batch["labels"][mask])
            if sum(len(x) for x in labels) >= rows:
                break
    heads = [m.get_output_embeddings().weight.detach().clone() for m in (student, teacher)]
    torch.save({"h": torch.cat(h)[:rows], "h_t": torch.cat(h_t)[:rows], "w": heads[0], "w_t": heads[1],
                "labels": torch.cat(labels)[:rows]}, path)


def measure(name: str, rows: int, vocab: int, chunk: int | str | None, device: str, mode: str, hidden: int,
            prompt_fraction: float = 0.0, real: str | None = None) -> dict:
    """One forward + backward in this process (``mode``: logits, head, fused, or masked / selected: the
    heads on every position or on the labelled ones only, the first ``prompt_fraction`` being
    unlabelled); returns the extra peak memory in (N, V) tensors and the seconds."""
    import resource

    import torch
    from hydra.utils import instantiate

    from kdlab.losses.base import IGNORE_INDEX, KDBatch
    from kdlab.losses.divergences import loss_config
    from kdlab.losses.fused import fused_head_loss

    torch.manual_seed(0)
    cfg = loss_config(name)
    cfg.chunk_size = chunk
    loss = instantiate(cfg)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[: int(prompt_fraction * rows)] = IGNORE_INDEX  # the prompt positions (masked / selected modes)
    if real:
        # memory-mapped and read once (resident before the baseline): a plain load's transient
        # double copy would set ru_maxrss, a lifetime peak, above what the objective needs
        inputs = torch.load(real, mmap=True)
        for tensor in inputs.values():
            tensor.sum()
        h, h_t, labels = inputs["h"].to(device).requires_grad_(True), inputs["h_t"].to(device), inputs["labels"].to(device)
        w, w_t = inputs["w"].to(device).requires_grad_(True), inputs["w_t"].to(device)
        if mode == "logits":  # the real logits as inputs
            with torch.no_grad():
                student, teacher = (h @ w.T).unsqueeze(0).requires_grad_(True), (h_t @ w_t.T).unsqueeze(0)
    elif mode == "logits":
        student = torch.randn(1, rows, vocab, device=device, requires_grad=True)
        teacher = torch.randn(1, rows, vocab, device=device)
    else:  # logits h Wᵀ of spread ~2, like the logits mode's; scaled in place, so that no temporary raises the base
        h, h_t = torch.randn(rows, hidden, device=device, requires_grad=True), torch.randn(rows, hidden, device=device)
        w = torch.randn(vocab, hidden, device=device).mul_(2 / hidden**0.5).requires_grad_(True)
        w_t = torch.randn(vocab, hidden, device=device).mul_(2 / hidden**0.5)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if mode == "fused":
        out = fused_head_loss(loss, h, w, labels, torch.tensor(rows, device=device), teacher_hidden=h_t, teacher_weight=w_t)
    else:
        if mode in ("head", "masked", "selected"):
            keep = labels != IGNORE_INDEX if mode == "selected" else slice(None)
            student = (h[keep] @ w.T).unsqueeze(0)
            with torch.no_grad():
                teacher = (h_t[keep] @ w_t.T).unsqueeze(0)
            labels = labels[keep]
        out = loss(KDBatch(student_logits=student, teacher_logits=teacher, labels=labels.unsqueeze(0)))
    out.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    # the gradients of the differentiated inputs are part of any backward pass: counted
    return {"extra": (peak - base) / (rows * vocab * 4), "seconds": seconds}


def run_one(args, name: str, vocab: int, chunk: str, mode: str) -> dict:
    """One measurement in a fresh process (its peak memory is its own)."""
    cmd = [sys.executable, "-m", "bench.objective_memory", "--rows", str(args.rows), "--hidden", str(args.hidden)]
    cmd += ["--prompt-fraction", str(args.prompt_fraction), "--one", name, str(vocab), chunk, args.device, mode]
    if args.real_file:
        cmd += ["--real-file", args.real_file]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--chunk", default="auto", help="the chunked and fused columns' loss.chunk_size: auto (the kdlab/conf/loss default) or rows")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size H of the head and fused columns (896: Qwen2-0.5B); 0 = logits only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="> 0: also measure logits whose first fraction of rows is unlabelled, all rows vs labelled rows only")
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--real", action="store_true", help="SmolLM2's real hidden states and heads (part 4; needs the [real] extra)")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # name vocab chunk device mode: run one measurement
    parser.add_argument("--real-file", help=argparse.SUPPRESS)  # part 4's inputs, gathered by the parent process
    parser.add_argument("--gather-real", help=argparse.SUPPRESS)  # write part 4's inputs to this file
    args = parser.parse_args()
    if args.gather_real:
        real_inputs(args.rows, Path(args.gather_real))
        return
    if args.one:
        name, vocab, chunk, device, mode = args.one
        chunk = chunk if chunk == "auto" else (int(chunk) or None)
        print(json.dumps(measure(name, args.rows, int(vocab), chunk, device, mode, args.hidden, args.prompt_fraction, args.real_file)))
        return
    if args.real:
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="kdlab-real-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # the inputs file is ~230 MB
        args.real_file = str(Path(scratch) / "inputs.pt")
        # in a process of its own: a measurement process starts with the peak RSS of the process it is
        # forked from (Linux keeps the high-water mark across exec), so this one must never hold the models
        subprocess.run([sys.executable, "-m", "bench.objective_memory", "--rows", str(args.rows), "--gather-real", args.real_file],
                       cwd=ROOT, check=True, env=ENV)
        args.vocab, args.hidden = [49_152], 576
        print("real inputs: SmolLM2-135M-Instruct and its 6-layer pruned student, labelled positions of the Python corpus")
    else:
        args.real_file = None
    if args.prompt_fraction > 0:
        if args.hidden <= 0:
            parser.error("--prompt-fraction measures from hidden states and heads: give --hidden > 0")
        labelled_rows_table(args)
        return
    heads = args.hidden > 0
    print(f"forward + backward, N = {args.rows} rows, {args.device}; extra peak memory in (N, V) float32 tensors; chunked and fused: loss.chunk_size={args.chunk}")
    if heads:
        floors = ", ".join(f"{(args.rows + v) * args.hidden / (args.rows * v):.2f} at V={v}" for v in args.vocab)
        print(f"head+chunked, fused: from (N, {args.hidden}) hidden states and (V, {args.hidden}) heads; floor (the gradients of h and W): {floors}")
    header = f"{'objective':10s} {'V':>7s} {'dense':>7s} {'chunked':>8s} {'t dense':>9s} {'t chunked':>10s} {'t ratio':>8s}"
    if heads:
        header += f" {'head+chunked':>13s} {'fused':>7s} {'fused-floor':>12s} {'t head+ch':>10s} {'t fused':>8s} {'t ratio':>8s}"
    print(header)
    for vocab in args.vocab:
        floor = (args.rows + vocab) * args.hidden / (args.rows * vocab)
        for name in args.objectives:
            dense, chunked = run_one(args, name, vocab, "0", "logits"), run_one(args, name, vocab, args.chunk, "logits")
            line = (
                f"{name:10s} {vocab:7d} {dense['extra']:7.2f} {chunked['extra']:8.2f} {dense['seconds']:8.2f}s "
                f"{chunked['seconds']:9.2f}s {chunked['seconds'] / dense['seconds']:8.2f}"
            )
            if heads:
                head, fused = run_one(args, name, vocab, args.chunk, "head"), run_one(args, name, vocab, args.chunk, "fused")
                line += (
                    f" {head['extra']:13.2f} {fused['extra']:7.2f} {fused['extra'] - floor:12.2f} {head['seconds']:9.2f}s "
                    f"{fused['seconds']:7.2f}s {fused['seconds'] / head['seconds']:8.2f}"
                )
            print(line, flush=True)


def labelled_rows_table(args) -> None:
    """Part 3: the objective on every row (masked ones included) vs on the labelled rows only."""
    print(f"forward + backward from (N, {args.hidden}) hidden states and (V, {args.hidden}) heads, N = {args.rows} positions of which "
          f"the first {args.prompt_fraction:.0%} are unlabelled (prompt), {args.device}; extra peak memory in (N, V) float32 "
          f"tensors; chunked: loss.chunk_size={args.chunk}")
    print(f"{'objective':10s} {'V':>7s} {'path':8s} {'all rows':>9s} {'labelled':>9s} {'mem ratio':>10s} "
          f"{'t all':>8s} {'t labelled':>11s} {'t ratio':>8s}")
    for vocab in args.vocab:
        for name in args.objectives:
            for path, chunk in (("dense", "0"), ("chunked", args.chunk)):
                every, labelled = run_one(args, name, vocab, chunk, "masked"), run_one(args, name, vocab, chunk, "selected")
                print(f"{name:10s} {vocab:7d} {path:8s} {every['extra']:9.2f} {labelled['extra']:9.2f} "
                      f"{labelled['extra'] / every['extra']:10.2f} {every['seconds']:7.2f}s {labelled['seconds']:10.2f}s "
                      f"{labelled['seconds'] / every['seconds']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
