"""Checkpoints: Lightning's ModelCheckpoint resumable in a moved run folder, and atomic checkpoint writes.

Lightning reloads a checkpoint callback's record of the best checkpoint (its score, its path, the
last path) only when the checkpoint folder is the one it was written in; otherwise it keeps only
``best_model_path`` (which then points at the old place) and forgets the best score, so the next
validation becomes "best" whatever its loss. Here the recorded paths are moved with the folder
(``resume=auto`` after ``mv``).

Lightning's writer stages a checkpoint in the system's temporary folder and moves it onto its path,
which across file systems is a copy into that path: a full disk or a kill during it leaves a
truncated ``last.ckpt``/``best.ckpt`` in place of the previous good one. :class:`AtomicCheckpointIO`
writes into a temporary file beside the target and renames it over the target when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer and reader, with every local write atomic: ``torch.save`` into
    ``.<name>.tmp-<pid>`` in the checkpoint's own folder, flushed to disk, then ``os.replace`` onto the
    checkpoint's path. A write cut short leaves the previous checkpoint whole and removes its temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_checkpoints(trainer) -> None:
    """Writes the trainer's checkpoints with :class:`AtomicCheckpointIO` where it would use Lightning's plain
    TorchCheckpointIO (a writer of one's own, given in ``trainer.plugins`` or by the strategy, is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class RunCheckpoint(ModelCheckpoint):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:

            def moved(path):
                if isinstance(path, str) and path and Path(path).parent == Path(old):
                    return str(Path(self.dirpath) / Path(path).name)
                return path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)
