"""Resuming an interrupted run folder: which checkpoint, whether the config still matches, the logger's run.

    python -m kdlab.train ... hydra.run.dir=outputs/runs/my-run                 # first start
    python -m kdlab.train ... hydra.run.dir=outputs/runs/my-run resume=auto     # continue it after an interruption
    python -m kdlab.train ... ckpt_path=outputs/runs/my-run/checkpoints/last.ckpt

A run writes ``<run>/kdlab/config.yaml`` (the resolved config it was started with) and, with W&B,
``<run>/kdlab/wandb_id``. ``resume=auto`` continues from ``checkpoints/last.ckpt`` (written at every
validation and on SIGTERM or SIGUSR1; under SLURM, Lightning's own requeue checkpoint if newer), restoring the student, optimiser, schedule, step, the data stream
(the sampler's exact position and DDK's weights), the rollout buffer and the random streams, and
logs into the same W&B run. A folder started with another config is refused, naming the keys;
``ckpt_path=`` is compared with the config of the run that wrote the checkpoint.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

IGNORED = ("resume", "ckpt_path", "paths")  # where and how to resume, not what the run is


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "kdlab"


def last_checkpoint(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / "last.ckpt"


def newest_checkpoint(out_dir: Path) -> Path | None:
    """``last.ckpt``, or the newer checkpoint Lightning's SLURM plugin saved before a requeue (``hpc_ckpt_*.ckpt``)."""
    found = [p for p in (last_checkpoint(out_dir), *Path(out_dir).glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is whole in torch.save's format (a zip archive, whose directory is written last: a
    file cut short has none). Checked before the models are built, not found by torch.load after them."""
    return zipfile.is_zipfile(path)


def _plain(cfg: DictConfig) -> dict:
    """The config as it decides the run: resolved, with the paths as placeholders, so that values
    made from them (the checkpoint folder, the trainer's root) do not differ when a folder moves."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in list(cfg.get("paths") or {}):
            cfg.paths[key] = f"<paths.{key}>"
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED:
        plain.pop(key, None)
    return plain


def check_same_config(saved: Path, cfg: DictConfig, what: str) -> None:
    """The config a run folder was started with (``saved``) is this one, but for where and how to resume."""
    differ = differing_keys(_with_placeholders(OmegaConf.to_container(OmegaConf.load(saved)), cfg), _plain(cfg))
    if differ:
        raise ValueError(
            f"{what} was started with another config; differing keys: {', '.join(differ[:20])}. Resume with the same "
            "overrides, or start a new run folder"
        )


def _with_placeholders(tree, cfg: DictConfig):
    """A config saved by an earlier kdlab holds its paths resolved: they become the placeholders
    :func:`_plain` writes, so that such a run still resumes in place."""
    if isinstance(tree, dict):
        return {k: _with_placeholders(v, cfg) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_with_placeholders(v, cfg) for v in tree]
    if isinstance(tree, str):
        for key, value in (cfg.get("paths") or {}).items():
            if isinstance(value, str) and value and value in tree:
                tree = tree.replace(value, f"<paths.{key}>")
    return tree


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def differing_keys(saved: dict, current: dict) -> list[str]:
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def checkpoint_to_resume(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint this run continues from (None: a fresh run), after checking the folder."""
    saved = state_dir(out_dir) / "config.yaml"
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} is not a checkpoint file")
        if not is_checkpoint(path):
            raise ValueError(f"ckpt_path={cfg.ckpt_path} is not a PyTorch checkpoint (a run's checkpoints/*.ckpt)")
        # <run>/checkpoints/<name>.ckpt: the config of the run that wrote it, when it is there
        origin = state_dir(path.resolve().parent.parent) / "config.yaml"
        if origin.is_file():
            check_same_config(origin, cfg, f"ckpt_path: the run that wrote {path}")
        else:
            log.warning("ckpt_path=%s: no config of the run that wrote it (%s); its settings cannot be compared with this run's", path, origin)
        return str(path)
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise ValueError(f"resume={resume!r} is unknown; use resume=auto (continue this run folder) or ckpt_path=<file>")
    last = newest_checkpoint(out_dir)
    if resume is None:
        if last is not None:
            raise FileExistsError(
                f"the run folder {out_dir} already holds a run ({last}); continue it with resume=auto, "
                "or give the new run another hydra.run.dir"
            )
        return None
    if last is None:
        log.info("resume=auto: %s has no checkpoint yet; starting the run", out_dir)
        return None
    if not is_checkpoint(last):
        others = sorted(str(p) for p in Path(out_dir).glob("**/*.ckpt") if p != last and is_checkpoint(p))
        fix = f"continue from another with ckpt_path= (here: {', '.join(others)})" if others else "delete it to start the run again"
        raise ValueError(
            f"resume=auto: {last} is damaged, not a complete PyTorch checkpoint (a write cut short, e.g. by a full disk "
            f"or an earlier kdlab without atomic checkpoint writes); {fix}"
        )
    if saved.is_file():
        check_same_config(saved, cfg, f"resume=auto: the run in {out_dir}")
    log.info("Resuming %s from %s", out_dir, last)
    return str(last)


def save_config(cfg: DictConfig, out_dir: Path) -> None:
    folder = state_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(_plain(cfg)))


def logger_kwargs(cfg: DictConfig, out_dir: Path, resuming: bool) -> dict:
    """A resumed run logs into its W&B run again (same id; the id of a new one is saved by
    :func:`save_logger_id`), or continues its CSV file (kdlab.csv_logger)."""
    saved = state_dir(out_dir) / "wandb_id"
    target = str(cfg.logger.get("_target_", ""))
    if resuming and "wandb" in target.lower() and saved.is_file():
        return {"id": saved.read_text().strip(), "resume": "allow"}
    if resuming and target == "kdlab.csv_logger.CSVLogger":
        return {"resuming": True}
    return {}


def save_logger_id(logger, out_dir: Path) -> None:
    experiment = getattr(logger, "experiment", None)
    run_id = getattr(experiment, "id", None)
    if isinstance(run_id, str):
        state_dir(out_dir).mkdir(parents=True, exist_ok=True)
        (state_dir(out_dir) / "wandb_id").write_text(run_id)
