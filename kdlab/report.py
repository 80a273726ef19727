"""Compare finished runs: one or more sweep folders → a tidy table (pandas) and plots (matplotlib PNGs).

    python -m kdlab.report outputs/sweeps/<date>/<time> [another sweep ...] [--out DIR]

    from kdlab.report import report, group_table, best_groups
    df = report(["outputs/sweeps/2026-11-22/10-00-00"], out_dir="report")   # tidy: one row per value
    group_table(df)                                                          # objectives x metrics, mean/std over seeds
    best_groups(df)                                                          # the winner of each key metric

Jobs are grouped by their overrides minus ``seed=`` (and minus the overrides every job shares),
so that the seeds of one objective — in one sweep or spread over several — become error bars.
Written to ``out_dir`` (default ``<first sweep>/report``): ``report.csv`` (the tidy table),
``groups.csv`` (``group_table``), and the PNGs ``final_metrics.png`` (key test metrics per
group, mean ± std over seeds, seeds as dots, the teacher as a dashed line), ``per_domain.png``
(test exact match per domain, and the student/teacher perplexity ratio DDK steers by),
``learning_curves.png`` and ``domain_curves.png`` (validation curves, mean over seeds with the
seeds' range shaded) and ``ddk_weights.png`` (DDK's domain weights over steps, DDK jobs only).

Learning curves are read from each job's CSV logger (``csv/metrics.csv``, ``logger=csv``) or
else from its offline W&B run (``wandb/offline-run-*/run-*.wandb``, the default logger): that
file is W&B's record log (LevelDB log blocks of protobuf ``Record``s), read with W&B's own
protobuf classes (:func:`wandb_history`). Online-only runs need ``logger=csv`` or the W&B API.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

TEACHER = "teacher"
# (metric, higher is better): the panels of final_metrics.png, in this order, where present
FINAL_METRICS = (
    ("test/exact_match", True),
    ("test/ppl", False),
    ("test/rougeL", True),
    ("test/grammar/valid_fraction", True),
    ("test/grammar/true_kl", False),
    ("test/ece", False),
    ("test/top1_agreement", True),
    ("test/top5_consistency", True),
    ("test/top20_overlap", True),
)
CURVE_METRICS = ("train/loss", "val/loss", "val/exact_match", "val/rougeL", "val/grammar/true_kl", "val/ece")


# -- reading sweeps -------------------------------------------------------------------------------
def jobs(sweep_dirs) -> pd.DataFrame:
    """One row per job folder (``<sweep>/<job>/.hydra/overrides.yaml``): sweep, job, path, overrides,
    group, seed, status and every value of its ``metrics.json``."""
    rows = []
    for sweep in map(Path, [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else sweep_dirs):
        if not sweep.is_dir():
            raise FileNotFoundError(f"sweep folder {sweep} does not exist; pass outputs/sweeps/<date>/<time>")
        for job in sorted(
            (p for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=lambda p: p.name
        ):
            overrides = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
            row = {
                "sweep": str(sweep),
                "job": job.name,
                "path": str(job),
                "overrides": overrides,
                "seed": _seed(job, overrides),
            }
            metrics = job / "metrics.json"
            row["status"] = "done" if metrics.is_file() else "no metrics.json (failed or unfinished)"
            if metrics.is_file():
                row.update(json.loads(metrics.read_text()))
            rows.append(row)
    if not rows:
        raise ValueError(f"no jobs (folders with .hydra/overrides.yaml) in {sweep_dirs}; is this a sweep folder?")
    df = pd.DataFrame(rows)
    not_seed = [[o for o in ov if not o.startswith("seed=")] for ov in df["overrides"]]
    shared = set.intersection(*map(set, not_seed))
    df.insert(2, "group", [" ".join(o for o in ov if o not in shared) or "(defaults)" for ov in not_seed])
    for _, row in df[df["status"] != "done"].iterrows():
        log.warning("job %s: %s", row["path"], row["status"])
    return df


def _seed(job: Path, overrides: list[str]) -> int:
    for o in overrides:
        if o.startswith("seed="):
            return int(o.split("=", 1)[1])
    config = job / ".hydra" / "config.yaml"
    return int(OmegaConf.load(config).get("seed", 0)) if config.is_file() else 0


def tidy(jobs_df: pd.DataFrame) -> pd.DataFrame:
    """Long format, one row per (job, model, metric): the teacher's values (``…teacher_…`` keys)
    become rows of model "teacher" and group "teacher" under the student's metric name."""
    ids = ["sweep", "job", "group", "seed"]
    metric_cols = [c for c in jobs_df.columns if c.startswith(("val/", "test/"))]
    long = (
        jobs_df[jobs_df["status"] == "done"]
        .melt(id_vars=ids, value_vars=metric_cols, var_name="metric")
        .dropna(subset=["value"])
    )
    is_teacher = long["metric"].str.contains("teacher_", regex=False)
    long["model"] = is_teacher.map({True: TEACHER, False: "student"})
    long.loc[is_teacher, "metric"] = long.loc[is_teacher, "metric"].str.replace("teacher_", "", regex=False)
    long.loc[is_teacher, "group"] = TEACHER
    return long[[*ids, "model", "metric", "value"]].reset_index(drop=True)


def group_table(df: pd.DataFrame, metrics=None, as_text: bool = False) -> pd.DataFrame:
    """Groups × metrics: mean, std (over seeds; ddof=1) and count, the teacher as the last row.

    ``as_text``: one column per metric holding "mean ± std (n)" strings, for reading (the teacher's
    value alone: every job has the same teacher)."""
    metrics = list(metrics or [m for m, _ in FINAL_METRICS if m in set(df["metric"])])
    sel = df[df["metric"].isin(metrics)]
    table = sel.groupby(["group", "metric"])["value"].agg(["mean", "std", "count"]).unstack("metric")
    table = table.swaplevel(axis=1).reindex(columns=pd.MultiIndex.from_product([metrics, ["mean", "std", "count"]]))
    order = [g for g in table.index if g != TEACHER] + ([TEACHER] if TEACHER in table.index else [])
    present = [m for m in metrics if table[(m, "mean")].notna().any()]  # std is all NaN with one seed: kept
    table = table.loc[order, present]
    if not as_text:
        return table
    text = pd.DataFrame(index=table.index)
    for metric in dict.fromkeys(table.columns.get_level_values(0)):
        mean, std, n = (table[(metric, k)] for k in ("mean", "std", "count"))
        cells = []
        for g, m, s, c in zip(table.index, mean, std, n):
            spread = "" if pd.isna(s) else f" ± {s:.2g}"
            cells.append("" if pd.isna(m) else f"{m:.4g}" if g == TEACHER else f"{m:.4g}{spread} ({int(c)})")
        text[metric] = cells
    return text


def best_groups(df: pd.DataFrame) -> pd.Series:
    """For each key test metric, the student group with the best mean over seeds."""
    students = df[df["model"] == "student"]
    best = {}
    for metric, higher in FINAL_METRICS:
        means = students[students["metric"] == metric].groupby("group")["value"].mean()
        if len(means):
            best[metric] = (
                "(all equal)"
                if means.nunique() == 1 and len(means) > 1
                else means.idxmax()
                if higher
                else means.idxmin()
            )
    return pd.Series(best, name="best group")


# -- learning curves ------------------------------------------------------------------------------
def wandb_records(path):
    """The protobuf ``Record``s of an offline W&B run file (``run-*.wandb``).

    The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log blocks of 32 KiB;
    each chunk has a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last), and a
    block's tail shorter than a header is padding. wandb 0.31 ships no reader of it (its Go core
    writes it), so this follows the format; a truncated last record (a killed run) ends the scan.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            break
        pos += 7 + length
        parts = [chunk] if kind in (1, 2) else [*parts, chunk]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def wandb_history(path) -> pd.DataFrame:
    """The numeric history of an offline W&B run, one row per ``log`` call (``step`` = trainer step)."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[item.key or "/".join(item.nested_key)] = float(value)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.rename(columns={"trainer/global_step": "step"}) if "trainer/global_step" in df else df


def history(job_dir) -> pd.DataFrame | None:
    """A job's logged values by trainer step (the first value logged at each step), or None."""
    job_dir = Path(job_dir)
    csv_file = job_dir / "csv" / "metrics.csv"
    runs = sorted(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    if csv_file.is_file():
        df = pd.read_csv(csv_file)
    elif runs:
        df = wandb_history(runs[-1])
    else:
        return None
    if "step" not in df:
        return None
    # The final validation and test of the best checkpoint are logged after training, at the step
    # where test/ values appear; they are not points of the training curve.
    tested = df.filter(like="test/").notna().any(axis=1)
    df = df[~df["step"].isin(df.loc[tested, "step"])]
    return df.dropna(subset=["step"]).groupby("step").first().copy().reset_index()  # copy: consolidate the columns


# -- plots ----------------------------------------------------------------------------------------
def _groups(df: pd.DataFrame) -> list[str]:
    return sorted(g for g in df["group"].unique() if g != TEACHER)


def plot_final_metrics(df: pd.DataFrame):
    """Key test metrics per group: bars are means over seeds, error bars one std, dots the seeds."""
    import matplotlib.pyplot as plt

    present = [(m, up) for m, up in FINAL_METRICS if m in set(df.loc[df["model"] == "student", "metric"])]
    groups = _groups(df)
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (metric, up) in zip(axes.flat, present):
        values = df[(df["metric"] == metric) & (df["model"] == "student")]
        stats = values.groupby("group")["value"].agg(["mean", "std"]).reindex(groups)
        x = range(len(groups))
        ax.bar(x, stats["mean"], yerr=stats["std"].fillna(0), capsize=4, color="tab:blue", alpha=0.7)
        for i, g in enumerate(groups):
            seeds = values.loc[values["group"] == g, "value"]
            ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
        teacher = df[(df["metric"] == metric) & (df["model"] == TEACHER)]["value"]
        if len(teacher):
            ax.axhline(teacher.mean(), color="k", linestyle="--", linewidth=1, label="teacher")
            ax.legend(fontsize="small")
        ax.set_xticks(list(x), groups, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{metric} ({'higher' if up else 'lower'} is better)", fontsize="medium")
    for ax in axes.flat[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _domains(df: pd.DataFrame, split: str = "test", suffix: str = "exact_match") -> list[str]:
    names = df["metric"].str.extract(rf"^{split}/([^/]+)/{suffix}$")[0].dropna().unique()
    return sorted(names)


def plot_per_domain(df: pd.DataFrame):
    """Per domain: test exact match (teacher as a black tick) and the student/teacher perplexity ratio."""
    import matplotlib.pyplot as plt
    import numpy as np

    domains, groups = _domains(df), _groups(df)
    fig, (ax_em, ax_ratio) = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / max(1, len(groups))
    student = df[df["model"] == "student"]
    teacher = df[df["model"] == TEACHER].groupby("metric")["value"].mean()
    for k, g in enumerate(groups):
        rows = student[student["group"] == g].set_index(["metric", "seed"])["value"]
        em = [rows.get(f"test/{d}/exact_match", pd.Series(dtype=float)) for d in domains]
        ratio = []
        for d in domains:
            ppl = rows.get(f"test/{d}/ppl", pd.Series(dtype=float))
            ratio.append(ppl / teacher.get(f"test/{d}/ppl", np.nan))
        x = np.arange(len(domains)) + (k - (len(groups) - 1) / 2) * width
        for ax, series in ((ax_em, em), (ax_ratio, ratio)):
            ax.bar(
                x,
                [s.mean() for s in series],
                width,
                yerr=[s.std() if len(s) > 1 else 0 for s in series],
                capsize=3,
                label=g,
            )
    ax_em.plot(
        np.arange(len(domains)),
        [teacher.get(f"test/{d}/exact_match", np.nan) for d in domains],
        "k_",
        markersize=20,
        mew=2,
        label="teacher",
    )
    ax_ratio.axhline(1.0, color="k", linestyle="--", linewidth=1)
    for ax, title in (
        (ax_em, "test exact match per domain (higher is better)"),
        (ax_ratio, "student / teacher perplexity per domain (DDK's gap)"),
    ):
        ax.set_xticks(np.arange(len(domains)), domains)
        ax.set_title(title, fontsize="medium")
    ax_em.legend(fontsize="small")
    fig.tight_layout()
    return fig


def curves(jobs_df: pd.DataFrame) -> pd.DataFrame:
    """Every job's history, stacked, with its group and seed (empty if no job has one)."""
    parts = []
    for _, job in jobs_df.iterrows():
        h = history(job["path"])
        if h is not None:
            parts.append(h.assign(group=job["group"], seed=job["seed"], job=job["job"], path=job["path"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_curves(curves_df: pd.DataFrame, metrics, teacher: dict | None = None, ncols: int = 3):
    """One panel per metric, one line per group (mean over seeds at each step; shade: the seeds' range);
    ``teacher``: {metric: value} drawn as dashed lines. None if no metric was logged."""
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in curves_df]
    if not metrics:
        return None
    cols = min(ncols, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        points = curves_df.dropna(subset=[metric])
        for g, part in points.groupby("group"):
            stats = part.groupby("step")[metric].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], marker="." if len(stats) < 30 else None, label=g)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
        if teacher and metric in teacher:
            ax.axhline(teacher[metric], color="k", linestyle="--", linewidth=1, label="teacher")
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("step")
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_ddk_weights(jobs_df: pd.DataFrame, curves_df: pd.DataFrame):
    """DDK's domain weights over steps, one panel per job that logged them (None if none did)."""
    import matplotlib.pyplot as plt

    from kdlab.plots import WEIGHT_PREFIX, plot_domain_weights

    if curves_df.empty or not any(c.startswith(WEIGHT_PREFIX) for c in curves_df):
        return None
    weighted = [
        p for p, part in curves_df.groupby("path", sort=False) if part.filter(like=WEIGHT_PREFIX).notna().any().any()
    ]
    fig, axes = plt.subplots(1, len(weighted), figsize=(5 * len(weighted), 3.5), squeeze=False)
    for ax, path in zip(axes.flat, weighted):
        part = curves_df[curves_df["path"] == path]
        plot_domain_weights(part.dropna(axis=1, how="all"), ax=ax)
        ax.set_title(
            f"{part['group'].iloc[0]} (seed {part['seed'].iloc[0]}, job {part['job'].iloc[0]})", fontsize="medium"
        )
    fig.tight_layout()
    return fig


# -- the report -----------------------------------------------------------------------------------
def report(sweep_dirs, out_dir=None) -> pd.DataFrame:
    """The tidy table of ``sweep_dirs`` (one or more sweep folders); writes CSVs and PNGs to ``out_dir``.

    Returns the tidy DataFrame (columns sweep, job, group, seed, model, metric, value); its
    ``attrs["figures"]`` lists the PNGs written and ``attrs["out_dir"]`` the folder.
    """
    import matplotlib.pyplot as plt

    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    jobs_df = jobs(sweep_dirs)
    df = tidy(jobs_df)
    if df.empty:
        raise ValueError(f"no finished job (with metrics.json) in {sweep_dirs}")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "report.csv", index=False)
    group_table(df).to_csv(out / "groups.csv")

    curves_df = curves(jobs_df)
    teacher = df[df["model"] == TEACHER].groupby("metric")["value"].mean().to_dict()
    figures = {"final_metrics": plot_final_metrics(df), "per_domain": plot_per_domain(df)}
    if curves_df.empty:
        log.warning("no learning curves: no job has csv/metrics.csv or an offline W&B run file")
    else:
        figures["learning_curves"] = plot_curves(curves_df, CURVE_METRICS)
        domains = sorted(
            {
                c.split("/")[1]
                for c in curves_df.columns
                if c.count("/") == 2 and c.startswith("val/") and c.endswith("/loss")
            }
        )
        teacher_losses = {
            f"val/{d}/loss": math.log(teacher[f"val/{d}/ppl"]) for d in domains if f"val/{d}/ppl" in teacher
        }
        figures["domain_curves"] = plot_curves(curves_df, [f"val/{d}/loss" for d in domains], teacher_losses)
        figures["ddk_weights"] = plot_ddk_weights(jobs_df, curves_df)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            written.append(str(out / f"{name}.png"))
    df.attrs["figures"], df.attrs["out_dir"] = written, str(out)
    return df


def latest_sweep(start=None) -> Path:
    """The newest ``outputs/sweeps/<date>/<time>`` with at least one job, searched from ``start``
    (default: the working directory) upwards, so a notebook in ``notebooks/`` finds it too."""
    start = Path(start or Path.cwd()).resolve()
    for root in (start, *start.parents):
        sweeps = root / "outputs" / "sweeps"
        if sweeps.is_dir():
            found = sorted(
                p.parents[2] for p in sweeps.glob("*/*/*/.hydra/overrides.yaml")
            )  # <date>/<time>/<job>/.hydra
            if found:
                return found[-1]
    raise FileNotFoundError(
        f"no sweep under outputs/sweeps from {start} upwards; run `python -m kdlab.train -m loss=ce,fkl` first"
    )


def samples(job_dir, split: str | None = None) -> pd.DataFrame:
    """A job's table of sample generations (``samples.jsonl``), optionally of one split only."""
    df = pd.read_json(Path(job_dir) / "samples.jsonl", lines=True)
    return df if split is None else df[df["split"] == split]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Tidy table and comparison plots of one or more kdlab sweeps.")
    parser.add_argument("sweeps", nargs="+", help="sweep folders (outputs/sweeps/<date>/<time>)")
    parser.add_argument("--out", default=None, help="output folder (default: <first sweep>/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    df = report(args.sweeps, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(group_table(df, as_text=True).T.to_string())
    print(
        f"\nwritten to {df.attrs['out_dir']}: report.csv, groups.csv, "
        + ", ".join(Path(f).name for f in df.attrs["figures"])
    )


if __name__ == "__main__":
    main()
