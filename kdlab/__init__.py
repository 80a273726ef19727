"""kdlab: a knowledge-distillation lab for causal language models."""

from pathlib import Path

# The Hydra configuration ships inside the package (kdlab/conf), so an installed kdlab composes
# it from anywhere; scripts and tests that compose by hand (hydra.initialize_config_dir) use this.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
