"""A 2-process CPU DDP run (gloo) of a tiny DDK distillation, for tests/test_ddk.py.

    python tests/ddk_ddp_run.py OUT_DIR CACHE_DIR

Run as a script of its own, never inside pytest: Lightning's DDP launcher re-runs this command
line as rank 1 . Each rank writes OUT_DIR/rank<r>.json: per training batch the step,
the example indices and the sampler's weights, and the weights after every DDK update.
"""

import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import compose_tiny


class Recorder(L.Callback):
    def __init__(self, path: str):
        self.path, self.batches, self.updates = path, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weights = trainer.datamodule.sampler.weight_dict
        self.batches.append({"step": trainer.global_step, "index": batch["index"].tolist(), "weights": weights})

    def on_validation_end(self, trainer, pl_module):  # runs after DDKReweighting's (callback order)
        if trainer.state.fn == "fit":
            self.updates.append(trainer.datamodule.sampler.weight_dict)

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        record = {"rank": rank, "world_size": trainer.world_size, "batches": self.batches, "updates": self.updates}
        Path(self.path, f"rank{rank}.json").write_text(json.dumps(record))


def main(out_dir: str, cache_dir: str) -> None:
    from omegaconf import open_dict

    from kdlab.train import run

    cfg = compose_tiny(
        out_dir,
        cache_dir,
        [
            "data/mixing=ddk",
            "data.splits.n_train=400",  # no domain cycles in this short run: examples never repeat
            "+trainer.strategy=ddp",
            "trainer.devices=2",
            "trainer.max_steps=6",
            "trainer.val_check_interval=2",
        ],
    )
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": "__main__.Recorder", "path": out_dir}
    run(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:3])
