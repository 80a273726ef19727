"""Which failures are the user's to fix, and how they are shown: kdlab's message alone, exit status 2.

Every check of kdlab raises a plain exception whose message names the cause and the fix (a
``ValueError`` for a setting, ``FileNotFoundError``/``PermissionError`` for a path, a
``FloatingPointError`` for a diverged run, and Hydra's ``InstantiationException`` around the ones
raised while a config node is built). Those are shown as one short block, without the Python
traceback, and the process exits with :data:`USER_ERROR`, distinct from a crash (1, with its
traceback) and from an interrupted run (143). ``KDLAB_TRACEBACK=1`` shows the traceback too.

What makes such an exception a user error is where it was raised (:func:`raised_by_kdlab`): by a
``raise`` statement of kdlab's own code. The same types raised inside torch, transformers or any
other library, or by a failing built-in operation inside kdlab (a bug, not a check), are crashes
and keep their traceback.
"""

from __future__ import annotations

import dis
import os
import re

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

USER_ERROR = 2  # the exit status of a run stopped by a user error (as argparse's usage errors)


class NotEnoughSpace(OSError):
    """A run folder without room for what the run will write (found before training)."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, FloatingPointError, NotEnoughSpace)
PACKAGE = os.path.dirname(os.path.realpath(__file__))  # kdlab's own code: the files under this folder
TRACEBACK_HINT = "(for the Python traceback, rerun with KDLAB_TRACEBACK=1)"


# options whose Hydra plugin comes with an extra: without it Hydra says only that the group has no such option
PLUGINS = {
    "launcher=local": "hydra_plugins.hydra_joblib_launcher",
    "launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper",
}


def missing_plugin(overrides: list[str]) -> str | None:
    """The install hint for an option on the command line whose Hydra plugin is not installed, or None."""
    import importlib.util

    for option, plugin in PLUGINS.items():
        if option in overrides and importlib.util.find_spec(plugin) is None:
            return f"{option} needs a Hydra plugin that is not installed ({plugin}): pip install -e '.[cluster]' (or pip install 'kdlab[cluster]')"
    return None


def show_user_error(err: BaseException, log) -> str | None:
    """Logs a user error's message alone and returns it; None (nothing logged) for a crash."""
    message = None if wants_traceback() else user_message(err)
    if message is not None:
        log.error("%s\n%s", message, TRACEBACK_HINT)
    return message


def stop_for_user_error(err: BaseException, log) -> None:
    """A user error: its message alone, then exit with :data:`USER_ERROR`. A crash: returns (the
    caller re-raises it with its traceback)."""
    if show_user_error(err, log) is not None:
        raise SystemExit(USER_ERROR)


def wants_traceback() -> bool:
    return os.environ.get("KDLAB_TRACEBACK", "").strip() not in ("", "0")


def user_message(err: BaseException) -> str | None:
    """The message to show for a user error, or None for a crash (shown with its traceback)."""
    where = ""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        found = re.search(r"full_key: (\S+)", str(err))
        where = found.group(1) if found else where
        err = err.__cause__
    if isinstance(err, TypeError) and where:  # a setting the target does not take, e.g. +loss.k=3 on fkl
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown:
            return f"{where}.{unknown.group(1)} is not a setting of {_target_name(str(err))} ({where}); remove it or check its spelling"
        return f"{where}: {err}"
    if isinstance(err, OmegaConfBaseException):  # e.g. a mandatory value (???) left unset
        return str(err).splitlines()[0]
    if isinstance(err, USER_ERRORS) and raised_by_kdlab(err):
        return str(err)
    return None


def raised_by_kdlab(err: BaseException) -> bool:
    """Whether ``err`` was raised by a ``raise`` statement of kdlab's own code: the innermost frame of
    its traceback lies in the kdlab package and stopped at a raise. Not one raised inside a library
    (torch, transformers, ...), nor one of a built-in operation failing in kdlab's code (an unpacking,
    ``int()``: a bug). An error re-raised from a worker process (``data.num_proc``) is judged by the
    worker's traceback, which the pool hands on as the error's cause."""
    remote = getattr(err.__cause__, "tb", None)  # multiprocessing's RemoteTraceback: the worker's traceback as text
    if type(err.__cause__).__name__.endswith("RemoteTraceback") and isinstance(remote, str):
        frames = re.findall(r'File "([^"]+)", line \d+, in \S+\n[ \t]*(.*)', remote)
        return bool(frames) and _in_package(frames[-1][0]) and frames[-1][1].startswith("raise")
    tb = err.__traceback__
    if tb is None:  # never raised: nothing says where it comes from
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not _in_package(code.co_filename):
        return False
    instruction = next((i for i in dis.get_instructions(code) if i.offset == tb.tb_lasti), None)
    return instruction is None or instruction.opname == "RAISE_VARARGS"  # unknown offset (another Python): the frame decides


def _in_package(filename: str) -> bool:
    return os.path.realpath(filename).startswith(PACKAGE + os.sep)


def _target_name(message: str) -> str:
    found = re.search(r"(\w+)\.__init__\(\)", message)
    return found.group(1) if found else "its target"
