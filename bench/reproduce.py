"""Each paper's claims, measured over seeds with paired confidence intervals.

    python -m bench.reproduce rlkd|minillm|ddk|main|real|real_rlkd|real_ddk|real_minillm|across [--seeds 0 1 2 3 4] [--jobs 2] [--out DIR] [OVERRIDE ...]
    python -m bench.reproduce real|real_rlkd|real_ddk --seeds 0 1 2     # the real tier (experiment=real)
    python -m bench.reproduce real_minillm --seeds 0 1 2 data.train=$PWD/chat.jsonl   # its chat domain (experiment=real_chat)
    python -m bench.reproduce across --seeds 0 1 2 --jobs 1             # SmolLM2 into a GPT-2: CE vs ULD vs hybrid

A protocol is an ``experiment=reproduce_<method>`` config (its comments give the reasons for every
setting) and a set of variants that differ only in the method. Every (variant, seed) is one
``python -m kdlab.train`` run (on the built-in suite, or for ``real*`` on SmolLM2 and the Python
corpus), ``--jobs`` at a time with one torch thread
each; a run whose ``metrics.json`` exists under ``--out`` is not run again, so an interrupted
bench continues where it stopped. The first run goes alone, as it trains and caches the teacher
(under $KDLAB_CACHE) that the others load.

Printed: per variant, mean ± std over seeds of each metric; per claim, the paper's number, the
paired difference variant − baseline (same seed: same warm start, same data order) with its 95%
confidence interval (Student's t, n − 1 degrees of freedom), and a verdict:
``reproduced`` (the interval lies on the side the paper claims), ``not reproduced`` (it lies on
the other side) or ``inconclusive`` (it contains 0). The table is also written to DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile(df: int) -> float:
    return T_975.get(df) or (T_975[max(k for k in T_975 if k <= df)] if df < 30 else 1.96)


@dataclass(frozen=True)
class Claim:
    text: str
    metric: str
    variant: str
    baseline: str
    higher_is_better: bool
    paper: str  # the paper's numbers for it, as the paper reports them


@dataclass(frozen=True)
class Protocol:
    experiment: str
    variants: dict[str, list[str]]  # name -> overrides
    metrics: dict[str, str]  # column -> metric key
    claims: list[Claim]
    gaps: bool = False  # add the per-domain student/teacher perplexity ratios (ddk_gaps) to each run's metrics
    student: bool = False  # the runs' student is bench.across's GPT-2 folder, built once under --out


def _rlkd_claims(base: str, name: str) -> list[Claim]:
    paper = {
        "top5": {"KL": "7.97% → 12.65%", "TVD": "not reported"},
        "top20": {"KL": "72.05% → 76.75%", "TVD": "not reported"},
        "exact": {"KL": "GSM8K 219 → 267 of 1319", "TVD": "GSM8K 0 → 240 of 1319"},
    }
    out = []
    for setting, suffix in (("paper", "+R"), ("authors' code", "+R (logits)")):
        variant = f"{name}{suffix}"
        out += [
            Claim(f"{variant} raises top-5 consistency ({setting})", "test/top5_consistency", variant, name, True, paper["top5"][name]),
            Claim(f"{variant} raises top-20 overlap ({setting})", "test/top20_overlap", variant, name, True, paper["top20"][name]),
            Claim(f"{variant} lowers the grammar's true KL ({setting})", "test/grammar/true_kl", variant, name, False, "multi-modal case, no number"),
            Claim(f"{variant} raises task accuracy ({setting})", "test/exact_match", variant, name, True, paper["exact"][name]),
        ]
    return out


RLKD = Protocol(
    experiment="reproduce_rlkd",
    variants={
        "KL": ["loss=fkl"],
        "KL+R": ["loss=rlkd", "loss.base=fkl"],
        "KL+R (logits)": ["loss=rlkd", "loss.base=fkl", "loss.rank_logits=true"],
        "TVD": ["loss=tvd"],
        "TVD+R": ["loss=rlkd", "loss.base=tvd"],
        "TVD+R (logits)": ["loss=rlkd", "loss.base=tvd", "loss.rank_logits=true"],
    },
    metrics={"top-5 consistency": "test/top5_consistency", "top-20 overlap": "test/top20_overlap",
             "grammar true KL": "test/grammar/true_kl", "exact match": "test/exact_match"},
    claims=_rlkd_claims("fkl", "KL") + _rlkd_claims("tvd", "TVD"),
)

MINILLM_LR = "module.lr=3.0e-5"  # 1/100 of the token-level rate, as the paper's 5e-6 vs 5e-4 (protocol file)
EXPOSURE_LENGTH = 25  # the story domain's longest answer
MINILLM = Protocol(
    experiment="reproduce_minillm",
    variants={"SFT": ["loss=ce"], "KD": ["loss=fkl"], "MiniLLM": ["loss=minillm", MINILLM_LR]},
    metrics={"exact match": "test/exact_match", "ROUGE-L": "test/rougeL", "story exact": "test/story/exact_match",
             "story ROUGE-L": "test/story/rougeL", "ECE": "test/ece", f"ExAccErr@{EXPOSURE_LENGTH}": "exposure/exaccerr",
             "seq. reverse KL": "exposure/rev_kl"},
    claims=[
        Claim("MiniLLM beats SFT (overall quality)", "test/exact_match", "MiniLLM", "SFT", True, "ROUGE-L 23.3 → 24.6 (Dolly)"),
        Claim("MiniLLM beats word-level KD (overall quality)", "test/exact_match", "MiniLLM", "KD", True, "ROUGE-L 23.5 → 24.6 (Dolly)"),
        Claim("MiniLLM beats KD on sampled ROUGE-L", "test/rougeL", "MiniLLM", "KD", True, "ROUGE-L 23.5 → 24.6 (Dolly)"),
        Claim("MiniLLM beats KD on long responses", "test/story/exact_match", "MiniLLM", "KD", True, "gap grows with response length (Fig.)"),
        Claim("MiniLLM has lower exposure bias than KD", "exposure/exaccerr", "MiniLLM", "KD", False, "ExAccErr stays low as length grows (Fig.)"),
        Claim("MiniLLM is better calibrated than KD", "test/ece", "MiniLLM", "KD", False, "lower ECE than KD/SeqKD (Table)"),
        Claim("MiniLLM lowers the sequence-level reverse KL", "exposure/rev_kl", "MiniLLM", "KD", False, "its objective"),
    ],
)

DDK = Protocol(
    experiment="reproduce_ddk",
    variants={"uniform": ["data/mixing=uniform"], "DDK w/o smoothing": ["data/mixing=ddk_no_smoothing"], "DDK": ["data/mixing=ddk"]},
    metrics={"mean gap l_S/l_T": "gap/mean", "worst-domain gap": "gap/worst", "exact match": "test/exact_match"},
    claims=[
        Claim("DDK narrows the mean gap vs uniform", "gap/mean", "DDK", "uniform", False, "avg. score 55.01 → 57.46"),
        Claim("DDK narrows the worst-domain gap vs uniform", "gap/worst", "DDK", "uniform", False, "its aim: the weakest domains"),
        Claim("smoothing helps: DDK vs DDK w/o smoothing (mean gap)", "gap/mean", "DDK", "DDK w/o smoothing", False, "avg. score 56.56 → 57.46"),
        Claim("DDK beats uniform on exact match", "test/exact_match", "DDK", "uniform", True, "avg. score 55.01 → 57.46"),
    ],
    gaps=True,
)

MAIN = Protocol(
    experiment="",  # the main job: the defaults
    variants={name: [f"loss={name}"] for name in ("ce", "fkl", "rkl", "jsd", "tvd")},
    metrics={"exact match": "test/exact_match", "ppl": "test/ppl", "grammar true KL": "test/grammar/true_kl",
             "top-5 consistency": "test/top5_consistency"},
    claims=[Claim(f"{name} beats ce (SFT) on exact match", "test/exact_match", name, "ce", True, "distillation > SFT")
            for name in ("fkl", "rkl", "jsd", "tvd")],
)

# -- the real tier: SmolLM2-135M-Instruct into its depth-pruned 6-layer student (experiment=real) ------------

REAL_METRICS = {"test ppl": "test/ppl", "mean S/T ppl ratio": "gap/mean", "mean log S/T (nats)": "gap/mean_log",
                "worst-domain S/T ratio": "gap/worst", "top-5 consistency": "test/top5_consistency",
                "top-20 overlap": "test/top20_overlap", "top-1 agreement": "test/top1_agreement"}
REAL = Protocol(
    experiment="real",
    variants={name: [f"loss={name}"] for name in ("ce", "fkl", "rkl", "jsd", "tvd")},
    metrics=REAL_METRICS,
    # perplexity ratios of the objectives span ten orders of magnitude here: compared on the log scale
    claims=[Claim(f"{name} recovers the pruned student better than ce (mean log S/T ppl ratio)", "gap/mean_log", name, "ce",
                  False, "Minitron: KD retraining > CE retraining") for name in ("fkl", "rkl", "jsd", "tvd")]
    + [Claim(f"{name} agrees with the teacher's top-1 more than ce", "test/top1_agreement", name, "ce", True, "not reported")
       for name in ("fkl", "rkl", "jsd", "tvd")],
    gaps=True,
)
REAL_RLKD = Protocol(
    experiment="real",
    variants={"KL": ["loss=fkl"], "KL+R (logits)": ["loss=rlkd", "loss.base=fkl", "loss.rank_logits=true"]},
    metrics=REAL_METRICS,
    claims=[Claim("KL+R (logits) raises top-5 consistency", "test/top5_consistency", "KL+R (logits)", "KL", True, "7.97% → 12.65%"),
            Claim("KL+R (logits) raises top-20 overlap", "test/top20_overlap", "KL+R (logits)", "KL", True, "72.05% → 76.75%"),
            Claim("KL+R (logits) raises top-1 agreement", "test/top1_agreement", "KL+R (logits)", "KL", True, "not reported"),
            Claim("KL+R (logits) lowers the mean log S/T ppl ratio", "gap/mean_log", "KL+R (logits)", "KL", False, "not reported")],
    gaps=True,
)
REAL_DDK = Protocol(
    experiment="real",
    # DDK reweights at each validation: both variants validate at steps 10, 20 and 30
    variants={"uniform": ["data/mixing=uniform", "trainer.val_check_interval=10"],
              "DDK": ["data/mixing=ddk", "trainer.val_check_interval=10"]},
    metrics=REAL_METRICS,
    claims=[Claim("DDK narrows the mean gap vs uniform", "gap/mean", "DDK", "uniform", False, "avg. score 55.01 → 57.46"),
            Claim("DDK narrows the worst-domain gap vs uniform", "gap/worst", "DDK", "uniform", False, "its aim: the weakest domains")],
    gaps=True,
)

# MiniLLM on the real tier's chat domain (experiment=real_chat): the teacher's own answers, given with
# data.train=<chat.jsonl> among the overrides; every variant starts from the same SFT student
REAL_MINILLM = Protocol(
    experiment="real_chat",
    variants={"SFT": ["loss=ce"], "KD": ["loss=fkl"],
              "MiniLLM": ["loss=minillm", "module.lr=5.0e-6", "loss.rollout.mini_batch_size=4", "loss.rollout.max_new_tokens=128"]},
    metrics={"ROUGE-L": "test/rougeL", "test ppl": "test/ppl", "S/T ppl ratio": "test/ppl_ratio", "ECE": "test/ece",
             "top-1 agreement": "test/top1_agreement"},
    claims=[Claim("MiniLLM beats SFT on sampled ROUGE-L", "test/rougeL", "MiniLLM", "SFT", True, "ROUGE-L 23.3 → 24.6 (Dolly)"),
            Claim("MiniLLM beats word-level KD on sampled ROUGE-L", "test/rougeL", "MiniLLM", "KD", True, "ROUGE-L 23.5 → 24.6 (Dolly)"),
            Claim("MiniLLM is better calibrated than KD", "test/ece", "MiniLLM", "KD", False, "lower ECE than KD/SeqKD (Table)"),
            Claim("KD beats SFT on sampled ROUGE-L", "test/rougeL", "KD", "SFT", True, "KD > SFT (Dolly)")],
)

# -- across tokenizers: SmolLM2-135M-Instruct into a randomly initialised GPT-2 (experiment=across) ------------

ACROSS_DOMAINS = ("code", "docstrings", "reference")
ACROSS = Protocol(
    experiment="across",
    variants={"CE": ["loss=ce"], "ULD": ["loss=uld"], "hybrid": ["loss=gold"]},
    metrics={"test ppl": "test/ppl", **{f"{d} ppl": f"test/{d}/ppl" for d in ACROSS_DOMAINS}},
    claims=[Claim("ULD lowers the student's test perplexity vs CE", "test/ppl", "ULD", "CE", False, "ULD > teacher-text SFT (QA, summaries)"),
            Claim("the hybrid lowers the student's test perplexity vs CE", "test/ppl", "hybrid", "CE", False, "not reported"),
            Claim("the hybrid lowers the student's test perplexity vs ULD", "test/ppl", "hybrid", "ULD", False, "not reported (TRL's GOLD)")],
    student=True,
)

PROTOCOLS = {"rlkd": RLKD, "minillm": MINILLM, "ddk": DDK, "main": MAIN, "real": REAL, "real_rlkd": REAL_RLKD, "real_ddk": REAL_DDK,
             "real_minillm": REAL_MINILLM, "across": ACROSS}


# -- running -------------------------------------------------------------------------------------


def run_one(protocol: Protocol, variant: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """One kdlab.train run (skipped when its metrics.json exists); returns its metrics."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        overrides = [f"experiment={protocol.experiment}"] if protocol.experiment else []
        overrides += [*protocol.variants[variant], f"seed={seed}", "logger=csv", f"hydra.run.dir={run_dir}",
                      "+trainer.enable_progress_bar=false", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "bench.log", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "kdlab.train", *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'bench.log'}")
    return json.loads(metrics_file.read_text())


def ddk_gaps(metrics: dict) -> dict:
    """The student-teacher gap of DDK: test perplexity ratio l_S/l_T per domain, mean and worst; and the
    mean of its logarithm (the test loss gap in nats), the scale on which ratios spanning orders of
    magnitude (a pruned student early in its recovery) are compared."""
    domains = [k.split("/")[1] for k in metrics if k.startswith("test/") and k.endswith("/teacher_ppl") and k.count("/") == 2]
    ratios = {d: metrics[f"test/{d}/ppl"] / metrics[f"test/{d}/teacher_ppl"] for d in domains}
    return {"gap/mean": statistics.fmean(ratios.values()), "gap/worst": max(ratios.values()),
            "gap/mean_log": statistics.fmean(math.log(r) for r in ratios.values()),
            **{f"gap/{d}": r for d, r in ratios.items()}}


def exposure_configs():
    """The MiniLLM protocol's config (its teacher's cache key is the runs') and the same restricted to
    the story domain (its test prompts). The teacher must come from the first: its key hashes the
    data, so a story-only config would train and use another teacher."""
    from hydra import compose, initialize_config_dir

    from kdlab import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={MINILLM.experiment}"])
        story = compose("train", overrides=[f"experiment={MINILLM.experiment}", "data.splits.domains=[story]"])
    return cfg, story


def exposure_metrics(run_dir: Path, seed: int) -> dict:
    """ExAccErr at EXPOSURE_LENGTH on the story domain's test prompts, and the sequence-level reverse KL.

    The exported student against the protocol's cached teacher (trained on all six domains, the
    one the runs distilled), both in eval mode, 4 samples per prompt from a generator seeded by
    the run's seed (the same prompts and sample count for every variant).
    """
    out_file = run_dir / "exposure.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from kdlab.build import build_model
    from kdlab.exposure import accumulated_error, excess_accumulated_error
    from kdlab.models import distillation_vocab_size
    from kdlab.rollout import sample

    torch.set_num_threads(1)
    cfg, story_cfg = exposure_configs()
    tokenizer = instantiate(cfg.model.tokenizer)
    teacher = build_model(cfg, "teacher", tokenizer, instantiate(cfg.data, tokenizer=tokenizer)).eval()
    datamodule = instantiate(story_cfg.data, tokenizer=tokenizer)  # the story prompts only
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student", local_files_only=True).eval()
    vocab = distillation_vocab_size(teacher, student, tokenizer)
    generator = torch.Generator().manual_seed(1000 + seed)
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  max_new_tokens=EXPOSURE_LENGTH, vocab_size=vocab, generator=generator)
    own, oracle, rev_kl = [], [], []
    for batch in datamodule.test_dataloader():
        ids, mask = batch["prompt_ids"].repeat_interleave(4, 0), batch["prompt_mask"].repeat_interleave(4, 0)
        own.append(accumulated_error(student, teacher, ids, mask, sampler=student, **kwargs))
        oracle.append(accumulated_error(student, teacher, ids, mask, sampler=teacher, **kwargs))
        rev_kl.append(sample(student, teacher, ids, mask, **kwargs).sequence_reverse_kl())
    curve = excess_accumulated_error(torch.cat(own), torch.cat(oracle))
    result = {"exposure/exaccerr": float(curve[-1]), "exposure/exaccerr_curve": curve.tolist(),
              "exposure/rev_kl": float(torch.cat(rev_kl).mean())}
    out_file.write_text(json.dumps(result))
    return result


def run_protocol(name: str, protocol: Protocol, seeds: list[int], jobs: int, out: Path, extra: list[str]) -> dict[str, list[dict]]:
    tasks = [(variant, seed) for seed in seeds for variant in protocol.variants]
    start = time.time()

    def one(task):
        variant, seed = task
        run_dir = out / f"{variant.replace(' ', '_').replace('/', '').replace('(', '').replace(')', '')}-seed{seed}"
        t0 = time.time()
        metrics = run_one(protocol, variant, seed, run_dir, extra)
        if protocol.gaps:
            metrics |= ddk_gaps(metrics)
        if name == "minillm":
            metrics |= exposure_metrics(run_dir, seed)
        print(f"[{time.time() - start:6.0f}s] {variant} seed {seed} done ({time.time() - t0:.0f}s)", flush=True)
        return variant, seed, metrics

    results = [one(tasks[0])]  # alone: it trains and caches the teacher the others load
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results += list(pool.map(one, tasks[1:]))
    by_variant: dict[str, list[dict]] = {v: [] for v in protocol.variants}
    for variant, seed, metrics in sorted(results, key=lambda r: r[1]):
        by_variant[variant].append({"seed": seed, **metrics})
    return by_variant


# -- statistics and the table ---------------------------------------------------------------------


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a − b over paired seeds and its two-sided 95% t interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    if math.isnan(low):
        return "inconclusive (one seed)"
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        return "reproduced" if better else "not reproduced"
    return "inconclusive"


def num(x: float, sign: str = "") -> str:
    """Four decimals, or three significant digits for large magnitudes (perplexities early in a recovery)."""
    return f"{x:{sign}.4f}" if abs(x) < 1e5 else f"{x:{sign}.3g}"


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return num(values[0])
    return f"{num(statistics.fmean(values))} ± {num(statistics.stdev(values))}"


def table(name: str, protocol: Protocol, results: dict[str, list[dict]], seeds: list[int]) -> str:
    lines = [f"### {name}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), test split, mean ± std", "",
             "| variant | " + " | ".join(protocol.metrics) + " |", "|---" * (len(protocol.metrics) + 1) + "|"]
    for variant, runs in results.items():
        lines.append(f"| {variant} | " + " | ".join(fmt([r[k] for r in runs]) for k in protocol.metrics.values()) + " |")
    lines += ["", "| claim | paper | kdlab: difference (95% CI) | verdict |", "|---|---|---|---|"]
    for c in protocol.claims:
        a = [r[c.metric] for r in results[c.variant]]
        b = [r[c.metric] for r in results[c.baseline]]
        mean, low, high = paired_ci(a, b)
        lines.append(f"| {c.text} | {c.paper} | {num(mean, '+')} [{num(low, '+')}, {num(high, '+')}] | {verdict(low, high, c.higher_is_better)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--out", help="default: outputs/reproduce/<protocol>")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. a smoke test's trainer.max_steps=5)")
    args = parser.parse_intermixed_args()
    out = Path(args.out or ROOT / "outputs" / "reproduce" / args.protocol)
    protocol = PROTOCOLS[args.protocol]
    start = time.time()
    extra = list(args.overrides)
    if protocol.student:
        from bench.across import build_student

        extra.append(f"model.student.path={build_student(out / 'student')}")
    results = run_protocol(args.protocol, protocol, args.seeds, args.jobs, out, extra)
    report = table(args.protocol, protocol, results, args.seeds) + f"\n\nwall time {time.time() - start:.0f} s ({args.jobs} jobs at a time)\n"
    (out / "table.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report)


if __name__ == "__main__":
    main()
