"""``logger=csv``: Lightning's CSVLogger, except that a resumed run continues its ``metrics.csv``.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so ``resume=auto`` would
lose the history logged before the interruption; this writer keeps the file and its header, and
widens the header when the resumed run logs new keys (the test metrics at the end).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer, keeping the run's earlier ``metrics.csv`` (used when the run resumes)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # an earlier part of this run: its rows stay, its keys are known
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """``resuming``: this run continues an interrupted one (kdlab.resume), whose rows are kept."""

    def __init__(self, *args, resuming: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._resuming = resuming

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._resuming:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return super().experiment
