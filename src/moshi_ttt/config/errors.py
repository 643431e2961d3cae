"""Bad settings as one line (key, value, what is allowed) and exit status 2 at the command line.

Hydra prints its own multi-line report (or a traceback) for a failed composition and exits 1.
``run_cli`` asks Hydra to re-raise instead (HYDRA_FULL_ERROR), turns errors that are bad
settings into one line on stderr and status 2, and lets every other error through with its
full traceback. With HYDRA_FULL_ERROR=1 set by the user, bad settings keep their traceback too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable

EXIT_BAD_SETTING = 2
_FULL_ERROR = "HYDRA_FULL_ERROR"
_SET_BY_US = "MOSHI_TTT_CLI_SET_HYDRA_FULL_ERROR"  # inherited by DDP ranks, which re-run train.py


class ConfigError(ValueError):
    """A setting that cannot work; ``str()`` is one line naming the key, the value and what is allowed."""


def bad(key: str, value, allowed: str) -> ConfigError:
    """``key=value: allowed`` (strings quoted, so an empty or odd value shows)."""
    shown = repr(value) if isinstance(value, str) else str(value)
    return ConfigError(f"{key}={shown}: {allowed}")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exn: BaseException) -> str | None:
    """One line for an exception that is a bad setting, None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exn, ConfigError):
        return str(exn)
    if isinstance(exn, MissingConfigException):
        # e.g. model=no_such_model: name the group option and list what exists.
        missing = exn.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        where = f"{group.replace('/', '.')}={option}" if group else missing
        options = f"; available: {', '.join(exn.options)}" if exn.options else ""
        return f"{where}: no such config{options}" if missing else _one_line(exn)
    if isinstance(exn, OverrideParseException):
        return f"cannot parse the override: {_one_line(exn)}"
    if isinstance(exn, ConfigCompositionException):
        cause = exn.__cause__
        if isinstance(cause, OmegaConfBaseException) and cause.full_key:
            override = re.search(r"override '?([^'\s]+?)'?\.?(?:\s|$)", str(exn))
            return _omegaconf_line(cause, override.group(1) if override else None)
        return _one_line(exn)
    if isinstance(exn, OmegaConfBaseException) and exn.full_key:
        return _omegaconf_line(exn, None)
    return None


def _omegaconf_line(exn, override: str | None) -> str:
    """``optim.lr=abc: optim.lr takes a float`` / ``optim.lrr: no such key`` from OmegaConf's report."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = re.sub(r"\[(\d+)\]", r".\1", str(exn.full_key))  # curriculum.stages[1].steps -> .1.steps
    first = str(exn.msg or exn).splitlines()[0]
    if isinstance(exn, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"{key}: no such key (keys: python -m moshi_ttt.config explain {parent}".rstrip() + ")"
    value = override.split("=", 1)[1] if override and "=" in override else None
    converted = re.match(r"Value '.*' of type '.*' could not be converted to (\w+)", first)
    if converted:
        kind = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false"}.get(
            converted.group(1), converted.group(1))
        return f"{key}={value}: {key} takes {kind}" if value is not None else f"{key}: {first}"
    return f"{key}={value}: {first}" if value is not None else f"{key}: {first}"


def _user_wants_traceback() -> bool:
    return os.environ.get(_FULL_ERROR, "") not in ("", "0") and not os.environ.get(_SET_BY_US)


@contextlib.contextmanager
def exit_on_bad_setting():
    """Inside the Hydra task: a bad setting -> one line and SystemExit(2).

    Hydra would otherwise report the job as failed on stderr before re-raising."""
    try:
        yield
    except Exception as exn:  # noqa: BLE001 - sorted below: bad settings vs everything else
        line = None if _user_wants_traceback() else describe(exn)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_SETTING) from None


def run_cli(main: Callable[[], object]) -> int:
    """Run a ``@hydra.main`` function; a bad setting (also in composition) -> one line, status 2."""
    user_wants_traceback = _user_wants_traceback()
    if not user_wants_traceback:
        os.environ[_FULL_ERROR] = os.environ[_SET_BY_US] = "1"  # Hydra re-raises instead of exiting 1
    try:
        with exit_on_bad_setting():
            main()
    except SystemExit as exn:
        return 0 if exn.code is None else exn.code if isinstance(exn.code, int) else 1
    finally:
        if not user_wants_traceback:
            os.environ.pop(_FULL_ERROR, None)
            os.environ.pop(_SET_BY_US, None)
    return 0
