"""Lightning's ModelCheckpoint, resumable in a run folder that has moved (``resume=auto`` after ``mv``).

Lightning reloads a checkpoint callback's record of the best checkpoint (its score, its path, the
last path) only when the checkpoint folder is the one it was written in; otherwise it keeps only
``best_model_path`` (which then points at the old place) and forgets the best score, so the next
validation becomes "best" whatever its loss. Here the recorded paths are moved with the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


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
