"""The comparison table printed and saved (``summary.csv``) at the end of a sweep."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

FAILED = "failed.txt"  # written by kdlab.train into a sweep job's folder when the job fails

log = logging.getLogger(__name__)

# then each domain's exact match; every metric is in summary.csv (kdlab.report plots them)
DEFAULT_COLUMNS = (
    "test/exact_match",
    "test/ppl",
    "test/rougeL",
    "test/ece",
    "test/grammar/true_kl",
    "test/grammar/valid_fraction",
    "test/top5_consistency",
    "train/tokens_per_sec",
)


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per finished job of a sweep folder: its overrides and final metrics.

    A job without ``metrics.json`` (it failed or is still running) is listed with its status so
    that a failed job is visible in the table rather than silently missing.
    """
    rows = []
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: p.name):
        overrides = job / ".hydra" / "overrides.yaml"
        if not overrides.is_file():
            continue
        row = {"job": job.name, "overrides": list(OmegaConf.load(overrides))}
        metrics, failed = job / "metrics.json", job / FAILED
        if failed.is_file():  # a failure after metrics.json (an old layout, or a job rerun in place) wins
            row["status"] = f"failed: {failed.read_text().strip()}"
        elif metrics.is_file():
            row.update(json.loads(metrics.read_text()))
        else:
            row["status"] = "no metrics.json (unfinished)"
        rows.append(row)
    return rows


def teacher_row(rows: list[dict]) -> dict | None:
    """The teacher's test metrics, read off any job (the teacher is the same in every job)."""
    for row in rows:
        teacher = {k.replace("teacher_", ""): v for k, v in row.items() if "/teacher_" in k or k.startswith("test/teacher_")}
        if teacher:
            return {"job": "teacher", "overrides": "(reference)", **teacher}
    return None


def format_table(rows: list[dict], columns: list[str]) -> str:
    header = ["job", "overrides", *columns]
    cells = [[str(r.get("job", "")), str(r.get("overrides", ""))] + [_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _varying_overrides(rows: list[dict]) -> list[str]:
    """Show each job's overrides that differ between jobs; return the ones all jobs share."""
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in common) or "(defaults)"
    return sorted(common)


def summarize(sweep_dir: str | Path) -> str:
    """Write ``summary.csv`` into ``sweep_dir`` and return the printable table."""
    rows = collect(sweep_dir)
    common = _varying_overrides(rows)
    reference = teacher_row(rows)
    student_rows = [{k: v for k, v in r.items() if "teacher_" not in k} for r in rows]
    table_rows = student_rows + ([reference] if reference else [])
    # each domain's exact match where the data has a checker, else its ROUGE-L (user data)
    per_domain = {k for r in student_rows for k in r if k.startswith("test/") and k.count("/") == 2}
    test_domains = sorted(k for k in per_domain if k.endswith("/exact_match")) or sorted(k for k in per_domain if k.endswith("/rougeL"))
    columns = [c for c in (*DEFAULT_COLUMNS, *test_domains) if any(c in r for r in table_rows)]
    if any("status" in r for r in table_rows):
        columns.append("status")
    all_keys = ["job", "overrides", *sorted({k for r in table_rows for k in r} - {"job", "overrides"})]
    with open(Path(sweep_dir) / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=all_keys)
        writer.writeheader()
        writer.writerows(table_rows)
    shared = f"shared overrides: {' '.join(common)}\n" if common else ""
    return shared + format_table(table_rows, columns)


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print the comparison table and save summary.csv; exit 1
    if a job failed or ended without metrics.json."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summarize(sweep_dir)
        print(f"\nSweep summary ({sweep_dir / 'summary.csv'}):\n{table}\n", flush=True)
        # Every job has ended by now: one without metrics.json failed, also where it could not say so
        # (its failed.txt not written, e.g. on a full disk), and the sweep must not exit 0 without it.
        failed = [r for r in collect(sweep_dir) if "status" in r]
        if failed:
            lines = "\n".join(f"  job {r['job']} ({' '.join(r['overrides'])}): {_ended(r['status'])}" for r in failed)
            print(f"{len(failed)} job(s) failed or did not finish (their logs: <job>/train.log):\n{lines}", file=sys.stderr, flush=True)
            sys.exit(1)  # the finished jobs are in the table; the sweep as a whole did not succeed


def _ended(status: str) -> str:
    if status.startswith("failed"):
        return status
    return "did not finish: no metrics.json and no failed.txt (it stopped without recording why, e.g. on a full disk)"
