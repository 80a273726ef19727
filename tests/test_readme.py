"""The README's and docs' kdlab.train commands compose: an option renamed or removed fails here, not for a reader."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def train_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m kdlab.train`` line of a bash block in README.md and docs/*.md, as Hydra overrides."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not line.startswith("python -m kdlab.train"):
                    continue
                words = shlex.split(re.sub(r"<[^>]*>", "X", line).replace("$PWD", "/w"))[3:]  # <run folder>: a placeholder
                overrides = [w for w in words if w not in ("-m", "--multirun") and not w.startswith(("hydra.", "--"))]
                # a sweep's first value stands for the rest (each value is one composed job)
                found.append((f"{page.name}: {line[:70]}", [re.sub(r"^([^=]+=)([^,{\[]+),.*$", r"\1\2", o) for o in overrides]))
    return found


COMMANDS = train_commands()


def test_the_pages_hold_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("overrides", [o for _, o in COMMANDS], ids=[name for name, _ in COMMANDS])
def test_every_documented_train_command_composes(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        compose("train", overrides=overrides)
