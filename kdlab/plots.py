"""Plots of finished runs, for notebooks (matplotlib; ``pip install matplotlib`` if it is missing).

    from kdlab.plots import plot_domain_weights
    fig = plot_domain_weights("outputs/runs/<date>/<time>/csv/metrics.csv")   # logger=csv
    fig.savefig("weights.png")
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_PREFIX = "data/weight/"


def plot_domain_weights(metrics, ax=None):
    """DDK's domain sampling weights (``data/weight/<domain>``) over training steps.

    ``metrics`` is a CSV logger's ``metrics.csv`` (a path) or a DataFrame with its columns
    (``step`` and ``data/weight/<domain>``). The weights are drawn as steps: each one holds from
    the update that set it until the next. Draws on ``ax`` when given; returns the figure.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics) if isinstance(metrics, (str, Path)) else metrics
    columns = [c for c in df.columns if c.startswith(WEIGHT_PREFIX)]
    if not columns or "step" not in df.columns:
        raise ValueError(
            f"no {WEIGHT_PREFIX}<domain> columns with a step column in the metrics; "
            "they are logged by DDK runs (data/mixing=ddk) with logger=csv"
        )
    # The CSV logger writes one row per log call: keep each step's logged weights.
    weights = df.groupby("step")[columns].first().dropna(how="all").sort_index()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for column in columns:
        ax.step(weights.index, weights[column], where="post", label=column[len(WEIGHT_PREFIX) :])
    ax.set_xlabel("step")
    ax.set_ylabel("domain weight")
    ax.set_ylim(0, None)
    ax.legend(title="domain", fontsize="small")
    return ax.figure
