"""The one funnel every subprocess goes through.

argv lists only (never a shell string), an explicit timeout, the copy-pasteable command in the
debug log, and a QnixError carrying the command's stderr when it fails.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qnix.errors import QnixError

log = logging.getLogger("qnix.run")

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def require_tool(name: str, package: str) -> str:
    """Path of a required executable, or a QnixError naming the package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise QnixError(
            f"{name} is not installed",
            hint=f"install it: apt-get install {package} (Debian) or add pkgs.{package} (NixOS)",
        )
    return path


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: str | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run argv, capture its output as text, raise QnixError on failure when `check`."""
    args = tuple(argv)
    if not args or not all(isinstance(a, str) for a in args):
        raise TypeError("run() takes a non-empty sequence of str")
    log.debug("$ %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise QnixError(f"command not found: {args[0]}", hint=f"is {args[0]} installed?") from exc
    except subprocess.TimeoutExpired as exc:
        raise QnixError(
            f"command timed out after {timeout:g}s: {shlex.join(args)}",
            hint="the tool hung; run the command by hand to see why",
        ) from exc
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        stderr = proc.stderr.strip()
        raise QnixError(
            f"command failed with exit code {proc.returncode}: {shlex.join(args)}"
            + (f"\n{stderr}" if stderr else ""),
            hint="run it by hand (qnix --debug shows every command) to see the full output",
        )
    return result
