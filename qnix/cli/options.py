"""The --state-root / --run-root options every command acting on the host takes, and the
RuntimePaths they name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.runtime.paths import RuntimePaths

_F = TypeVar("_F", bound=Callable[..., Any])

STATE_ROOT = click.option(
    "--state-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="State folder (default /var/lib/qnix; environment QNIX_STATE_ROOT).",
)
RUN_ROOT = click.option(
    "--run-root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Runtime folder (default /run/qnix; environment QNIX_RUN_ROOT).",
)


def runtime_options(command: _F) -> _F:
    """--state-root then --run-root, as they are listed in every host command's --help."""
    return STATE_ROOT(RUN_ROOT(command))


def runtime_paths(state_root: Path | None, run_root: Path | None) -> RuntimePaths:
    """The roots named by the options (None: environment, then default), or a QnixError."""
    # Imported here: the CLI's import time matters, and only commands that act use it.
    from qnix.runtime.paths import PathError, RuntimePaths

    try:
        return RuntimePaths.from_options(state_root, run_root)
    except PathError as exc:
        raise QnixError(str(exc)) from exc
