"""A 2-process CPU DDP run (gloo) of the tiny default job, for tests/test_devices.py.

    python tests/ddp_run.py OUT_DIR CACHE_DIR [override ...]

Run as a script of its own, never inside pytest: Lightning's DDP launcher re-runs this command
line as rank 1. Rank 0 writes OUT_DIR/metrics.json (kdlab.train.run).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import compose_tiny  # noqa: E402


def main(out_dir: str, cache_dir: str, *overrides: str) -> None:
    from kdlab.train import run

    run(compose_tiny(out_dir, cache_dir, ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *overrides]))


if __name__ == "__main__":
    main(*sys.argv[1:])
