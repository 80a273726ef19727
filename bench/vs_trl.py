"""kdlab against TRL's GKDTrainer: training tokens/s on the same pair, data and optimiser, side by side.

    PYTHONPATH=/tmp/trl-site python -m bench.vs_trl [--device cuda] [--repeats 20] [--batch 64] [--threads 1]
    PYTHONPATH=/tmp/trl-site python -m bench.vs_trl --real chat.jsonl --batch 4 --repeats 5 --warmup 1

``--real CHAT``: the real tier's pair instead (SmolLM2-135M-Instruct and its 6-layer pruned student,
``model=smollm2``, vocabulary 49,152) on one batch of a ``messages`` JSONL through SmolLM2's chat
template, e.g. the teacher's own answers to the corpus's prompts (``python -m kdlab.generate
model=smollm2 prompts=<corpus>/chat/prompts.jsonl out=chat.jsonl``, the README's real tier). The
batch is the file's first ``--batch`` records in order (not a sampled one), so that every run of the
script measures the same tokens; ``--max-new-tokens`` caps the on-policy samples on both sides.

TRL is not a kdlab dependency: install it beside the project (``pip install --no-deps --target
/tmp/trl-site trl accelerate``) and put it on ``PYTHONPATH``; without it the script says so and exits 0.

What is compared (the default pair from ``kdlab/conf/``: untrained weights, the built-in suite's
tokenizer, one training batch of the suite; the speed does not depend on the weights):

* kdlab: ``DistillModule.training_step`` + ``backward`` (as ``bench/step_overhead.py`` times it),
  with the losses exactly as ``kdlab/conf/loss/*.yaml`` compose them. On-policy is ``loss=onpolicy
  loss.lambda_onpolicy=1.0`` with every other setting its default (``kdlab/conf/loss/onpolicy.yaml``:
  ``base=fkl``, ``teacher_mix=0`` (student-only sampling), ``temperature=1``, ``top_p=1``,
  ``top_k=0``, ``max_new_tokens=null`` = the data's longest answer + <eos>, ``use_cache=true``,
  fresh samples of the whole batch every step, ``epochs=1``); also with ``loss.base=jsd``.
  Off-policy is ``loss=fkl`` and ``loss=jsd`` (β = 0.5), each also with the teacher signal cache
  (``teacher_cache.k=32``): the step reads the teacher's top-k view (``InMemorySignals``,
  computed here once from the teacher's logits on the batch, as the cache's one pass over the
  training split stores it), so the step runs no teacher forward. The one-off pass is not in the
  step time: in a sweep it is paid once for all jobs (``bench/teacher_cache.py`` counts it).
* TRL: ``GKDTrainer.training_step(model, inputs)`` called directly (its on-policy branch:
  ``model.generate`` from the prompts, then the student and teacher forwards, the generalized-JSD
  loss, ``accelerator.backward``). ``lmbda=1`` is fully on-policy, ``lmbda=0`` is its off-policy
  supervised-KD setting (no ``seq_kd``). ``beta`` follows TRL's ``generalized_jsd_loss``:
  ``beta=0`` is ``KL(teacher‖student)`` (forward KL, kdlab's ``fkl``), ``beta=0.5`` the
  Jensen–Shannon divergence with the mixture 0.5·p + 0.5·q (kdlab's ``jsd``, whose β has the
  same meaning). Sampling: ``temperature=1.0`` (TRL's default is 0.9; set to kdlab's), top-k off,
  top-p 1, KV cache on (``gradient_checkpointing=False``: TRL's configs default to True, which
  turns its KV cache off and recomputes the forward in the backward; ``--trl-defaults`` keeps that),
  ``max_new_tokens`` = kdlab's (the data module's), the same <eos>/pad ids.
  TRL's default collator (``DataCollatorForChatML``) needs a chat template, which the suite's
  tokenizer has none of; the trainer is given a collator that lays out kdlab's very tokens the way
  ``DataCollatorForChatML`` does (left-padded ``input_ids``/``attention_mask``/``labels`` with
  -100 on prompt and padding, unshifted; left-padded ``prompts``/``prompt_attention_mask``), and
  each step's inputs come from ``trainer.data_collator`` on the batch's records.

Both sides then run the same ``torch.optim.AdamW`` step and ``zero_grad``; neither side's outer
loop (Lightning's / HF Trainer's: data loading, gradient clipping, LR schedule, logging) is timed.
Every configuration has its own copy of the same initial student and its own optimiser. The
configurations run round-robin (``bench.common.interleaved_medians``) so that machine noise hits
them alike; the time is the median over the repeats.

Tokens counted, the same way for both: the labelled tokens of the step, i.e. the positions whose
next token reaches the divergence (the batch's answer tokens + <eos> off-policy; the sampled
tokens up to and including the first <eos> on-policy). On-policy the count varies from step to
step (sampling), so tokens/s = mean labelled tokens per step / median step time.

On-policy rows also show the median time per step spent sampling (inside kdlab's rollout sampler,
inside TRL's ``model.generate``) and its share of the step: the rest is forwards, backward, loss
and optimiser, so the two columns tell where one tool gains on the other.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import warnings

import torch
from hydra.utils import instantiate

from bench.common import default_config, default_pair_and_batch, interleaved_medians, real_models, timing
from kdlab.losses.base import IGNORE_INDEX
from kdlab.losses.sparse import sparse_teacher
from kdlab.module import DistillModule
from kdlab.teacher_cache import InMemorySignals, cached_temperature


def import_trl():
    """(GKDConfig, GKDTrainer, version), or None when TRL (or what it needs) is not importable."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl

        try:
            from trl.experimental.gkd import GKDConfig, GKDTrainer  # TRL >= 0.2x moved GKD here
        except ImportError:
            from trl import GKDConfig, GKDTrainer
    except Exception as exc:  # ImportError, or an incompatible TRL failing at import time
        print(f"TRL's GKDTrainer is not importable ({type(exc).__name__}: {exc}).")
        return None
    return GKDConfig, GKDTrainer, trl.__version__


class StandaloneModule(DistillModule):
    """A DistillModule outside a Lightning Trainer: rollouts read <eos> and the generation budget
    from ``trainer.datamodule``; this one answers with the data module itself."""

    def __init__(self, *args, datamodule, **kwargs):
        super().__init__(*args, **kwargs)
        self._bench_datamodule = datamodule

    @property
    def trainer(self):
        class _Shim:
            datamodule = self._bench_datamodule

        return _Shim()


def real_pair_and_batch(chat: str, batch_size: int, device: str):
    """The real tier's tokenizer, teacher and pruned student, a ``data=files`` module over ``chat`` and
    the batch of its first ``batch_size`` training records (in file order: the same tokens every run)."""
    cfg = default_config("model=smollm2", "data=files", f"data.train={chat}", f"data.batch_size={batch_size}", "data.max_length=512")
    tokenizer, teacher, student = real_models(cfg)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    batch = datamodule._train_collate(datamodule._dataset("train")[:batch_size])  # as a training loader lays it out
    batch = {k: v.to(device) for k, v in batch.items()}
    return tokenizer, teacher.to(device).requires_grad_(False), student.to(device), datamodule, batch


def trl_features(batch: dict) -> list[dict]:
    """The batch's records as lists of token ids: the full sequence, its labels (unshifted: the label
    of a token is the token itself, -100 on the prompt), and the prompt."""
    features = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        shifted = batch["labels"][i, :n].tolist()  # kdlab: position t holds the label of token t+1
        labels = [IGNORE_INDEX] + shifted[:-1]
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        features.append({"input_ids": ids, "labels": labels, "prompt": prompt})
    return features


def make_chatml_layout_collator(pad_token_id: int):
    """Collates :func:`trl_features` records as TRL's ``DataCollatorForChatML`` lays its output out."""

    def left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        prompts = [e["prompt"] for e in examples]
        return {
            "input_ids": left_pad(ids, pad_token_id),
            "attention_mask": left_pad([[1] * len(r) for r in ids], 0),
            "labels": left_pad([e["labels"] for e in examples], IGNORE_INDEX),
            "prompts": left_pad(prompts, pad_token_id),
            "prompt_attention_mask": left_pad([[1] * len(r) for r in prompts], 0),
        }

    return collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: the data config's batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: steady timings on a shared machine)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--cache-k", type=int, default=32, help="teacher_cache.k of the cached off-policy rows")
    parser.add_argument("--trl-defaults", action="store_true", help="TRL's default gradient_checkpointing=True (no KV cache in its sampling)")
    parser.add_argument("--real", metavar="CHAT", default=None, help="the real tier's pair on a messages JSONL (see above)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="on-policy sample length, both sides (default: the data's longest answer + <eos>)")
    args = parser.parse_args()

    found = import_trl()
    if found is None:
        print("TRL is not a kdlab dependency; to run this comparison: "
              "pip install --no-deps --target /tmp/trl-site trl accelerate && PYTHONPATH=/tmp/trl-site python -m bench.vs_trl")
        return
    GKDConfig, GKDTrainer, trl_version = found
    import transformers
    from datasets import Dataset

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)  # GKD's advice to migrate to DistillationTrainer at lmbda=1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    on_overrides = ["loss=onpolicy", "loss.lambda_onpolicy=1.0"]
    if args.max_new_tokens:
        on_overrides.append(f"loss.rollout.max_new_tokens={args.max_new_tokens}")
    data_overrides = [f"data.batch_size={args.batch}"] if args.batch else []
    cfg = default_config(*on_overrides, *data_overrides)
    if args.real:
        tokenizer, teacher, student, datamodule, batch = real_pair_and_batch(args.real, args.batch or 4, args.device)
    else:
        tokenizer, teacher, student, batch = default_pair_and_batch(cfg, args.device)
        datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    max_new_tokens = cfg.loss.rollout.max_new_tokens or datamodule.max_new_tokens
    losses = {
        "onpolicy(fkl)": instantiate(cfg.loss),
        "onpolicy(jsd)": instantiate(default_config(*on_overrides, "loss.base=jsd", *data_overrides).loss),
        "fkl": instantiate(default_config("loss=fkl", *data_overrides).loss),
        "jsd": instantiate(default_config("loss=jsd", *data_overrides).loss),
    }
    cached = {f"{name} cached": name for name in ("fkl", "jsd")}  # the same losses on the cached teacher view
    tokens: dict[str, list[int]] = {}
    sampling: dict[str, list[float]] = {}  # seconds of each on-policy step spent sampling (warm-up steps included)
    fns = {}

    # -- kdlab ----------------------------------------------------------------------------------
    for name in [*losses, *cached]:
        loss = losses[cached.get(name, name)]
        signals = None
        if name in cached:  # the batch's teacher view, computed once, as the teacher cache would serve it
            with torch.no_grad():
                logits = StandaloneModule(student, teacher, loss, tokenizer, datamodule=datamodule).teacher_logits(batch)
            signals = InMemorySignals(sparse_teacher(logits, args.cache_k, cached_temperature(loss, args.cache_k)))
        module = StandaloneModule(copy.deepcopy(student), teacher, loss, tokenizer, datamodule=datamodule, teacher_signals=signals).train()
        optimizer = torch.optim.AdamW(module.student.parameters(), lr=args.lr)
        key = f"kdlab {name}"
        tokens[key], sampling[key] = [], []
        if hasattr(module.step, "buffer"):  # a rollout step: its sampler, looked up on the instance at each step
            module.step._sample = timing(module.step._sample, sampling[key], args.device)

        def run(module=module, optimizer=optimizer, key=key, step_batch=batch):
            loss = module.training_step(step_batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            buffer = getattr(module.step, "buffer", None)  # a rollout loss's buffer (kdlab/steps.py)
            labels = buffer.rollout.labels if buffer is not None else batch["labels"]
            tokens[key].append(int((labels != IGNORE_INDEX).sum()))

        fns[key] = run

    # -- TRL GKDTrainer -------------------------------------------------------------------------
    features = trl_features(batch)
    dataset = Dataset.from_list(features)
    collate = make_chatml_layout_collator(tokenizer.pad_token_id)
    trl_teacher = copy.deepcopy(teacher)
    trl_runs = {"lmbda=1 beta=0": (1.0, 0.0), "lmbda=1 beta=0.5": (1.0, 0.5), "lmbda=0 beta=0": (0.0, 0.0), "lmbda=0 beta=0.5": (0.0, 0.5)}
    for name, (lmbda, beta) in trl_runs.items():
        model = copy.deepcopy(student)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        config = GKDConfig(
            output_dir=os.path.join(cfg.paths.output_dir, "trl"),
            per_device_train_batch_size=batch["input_ids"].shape[0],
            lmbda=lmbda,
            beta=beta,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            max_length=None,
            learning_rate=args.lr,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            use_cpu=args.device == "cpu",
            # TRL's configs default to gradient checkpointing, which recomputes the forward in the
            # backward and turns the KV cache off in its generation; kdlab checkpoints nothing, so the
            # comparison turns it off (--trl-defaults keeps TRL's default)
            gradient_checkpointing=args.trl_defaults,
            bf16=False,
            fp16=False,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = GKDTrainer(
            model=model,
            teacher_model=trl_teacher,
            args=config,
            data_collator=collate,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        inputs = trainer.data_collator(features)
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=args.lr)
        trainer.optimizer = optimizer
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop, which is not run here
        key = f"TRL {name}"
        tokens[key], sampling[key] = [], []
        if lmbda > 0:  # GKDTrainer samples with the student's own generate()
            trainer.model.generate = timing(trainer.model.generate, sampling[key], args.device)

        def run(trainer=trainer, optimizer=optimizer, key=key, inputs=inputs):
            step_inputs = dict(inputs)  # GKDTrainer replaces input_ids/attention_mask/labels in place on a student-sample step
            trainer.training_step(trainer.model, step_inputs)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens[key].append(int((step_inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))  # compute_loss shifts by one

        fns[key] = run

    t = interleaved_medians(fns, args.device, args.repeats, warmup=args.warmup)
    rate = {k: sum(tokens[k]) / len(tokens[k]) / t[k] for k in fns}

    shape = tuple(batch["input_ids"].shape)
    print(
        f"kdlab vs TRL {trl_version} GKDTrainer (transformers {transformers.__version__}, torch {torch.__version__}); "
        f"device={args.device} threads={torch.get_num_threads()} batch={shape} vocab={len(tokenizer)} "
        f"max_new_tokens={max_new_tokens} temperature=1.0 repeats={args.repeats} (medians)"
    )
    r = cfg.loss.rollout
    print(
        f"kdlab: loss=onpolicy lambda_onpolicy={cfg.loss.lambda_onpolicy} (kdlab/conf/loss/onpolicy.yaml otherwise: base={cfg.loss.base}, "
        f"teacher_mix={r.teacher_mix}, temperature={r.temperature}, top_p={r.top_p}, top_k={r.top_k}, max_new_tokens={r.max_new_tokens}, "
        f"use_cache={r.use_cache}, num_rollouts={r.num_rollouts}, epochs={r.epochs}); onpolicy(jsd) adds loss.base=jsd; loss=fkl, loss=jsd as configured"
    )
    print(f"TRL: GKDConfig(lmbda, beta, temperature=1.0, max_new_tokens={max_new_tokens}, seq_kd=False, disable_dropout=True, "
          f"gradient_checkpointing={args.trl_defaults}); same AdamW(lr={args.lr}) on both sides")
    print("tokens = labelled tokens per step (positions whose next token reaches the divergence), mean over the steps")
    print("sampling = median ms per step in the sampler (kdlab's rollout sampler, TRL's model.generate), on-policy rows")
    print(f"{'step':<24} {'tokens/step':>11} {'ms/step':>9} {'tokens/s':>10} {'sampling':>9} {'share':>6}")
    for k in fns:
        line = f"{k:<24} {sum(tokens[k]) / len(tokens[k]):>11.1f} {t[k] * 1e3:>9.2f} {rate[k]:>10.0f}"
        if sampling[k]:
            ms = statistics.median(sampling[k]) * 1e3
            line += f" {ms:>9.2f} {ms / (t[k] * 1e3):>6.0%}"
        print(line)
    print(f"\n{'kdlab / TRL tokens/s':<58} {'ratio':>6}  goal")
    pairs = (
        ("on-policy  onpolicy(fkl) vs lmbda=1 beta=0", "kdlab onpolicy(fkl)", "TRL lmbda=1 beta=0", ">= 1.50"),
        ("on-policy  onpolicy(jsd) vs lmbda=1 beta=0.5", "kdlab onpolicy(jsd)", "TRL lmbda=1 beta=0.5", ">= 1.50"),
        ("off-policy fkl vs lmbda=0 beta=0", "kdlab fkl", "TRL lmbda=0 beta=0", ">= 1.00"),
        ("off-policy jsd vs lmbda=0 beta=0.5", "kdlab jsd", "TRL lmbda=0 beta=0.5", ">= 1.00"),
        (f"off-policy fkl, teacher_cache.k={args.cache_k} vs lmbda=0 beta=0", "kdlab fkl cached", "TRL lmbda=0 beta=0", ">= 1.50"),
        (f"off-policy jsd, teacher_cache.k={args.cache_k} vs lmbda=0 beta=0.5", "kdlab jsd cached", "TRL lmbda=0 beta=0.5", ">= 1.50"),
    )
    for label, a, b, goal in pairs:
        print(f"{label:<58} {rate[a] / rate[b]:>6.2f}  {goal}")


if __name__ == "__main__":
    main()
