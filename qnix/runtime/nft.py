"""nftables through libnftables, in-process: the same parser and output as the `nft` tool,
without a process per step.

Each call is one `nft_run_cmd_from_buffer` of the whole text, which the library sends as one
netlink batch: a transaction, all of it or nothing. `qnix --debug` shows the exact text.
The context is made inside the namespace and dropped before leaving it, so its netlink socket
belongs to that namespace and does not keep it alive.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from qnix.errors import QnixError
from qnix.runtime import netlink

log = logging.getLogger("qnix.net")

SONAME = "libnftables.so.1"
_library: str | None = None  # where libnftables was found, once it has been


def _library_beside_nft() -> str | None:
    """libnftables next to the `nft` tool: on NixOS no loader path holds it, but the tool in
    PATH is a link into its package, whose lib/ has it."""
    tool = shutil.which("nft")
    if tool is None:
        return None
    candidate = Path(tool).resolve().parent.parent / "lib" / SONAME
    return str(candidate) if candidate.exists() else None


def _context() -> Any:
    """A new libnftables context (the `nftables` module's Nftables)."""
    global _library
    try:
        import nftables  # loaded only when a table is touched
    except ImportError as exc:
        raise QnixError(
            "the Python module nftables (the binding of libnftables) is not installed",
            hint="reinstall qnix (pip install -e .): it depends on ansibleguy-nftables",
        ) from exc
    if _library is not None:
        return nftables.Nftables(sofile=_library)
    for candidate in (SONAME, _library_beside_nft()):
        if candidate is None:
            continue
        try:
            context = nftables.Nftables(sofile=candidate)
        except OSError:
            continue
        _library = candidate
        return context
    raise QnixError(
        f"{SONAME} is not installed",
        hint="install it: apt-get install libnftables1 (Debian) or add pkgs.nftables (NixOS)",
    )


def load() -> None:
    """Load the binding and libnftables now (a context made and dropped)."""
    _context()


def _run(commands: str, terse: bool) -> tuple[int, str, str]:
    context = _context()
    if terse:
        context.set_terse_output(True)
    if "\n" not in commands.strip("\n"):
        rc, output, error = context.cmd(commands)
        return int(rc), str(output), str(error)  # the context is freed here, still inside
    # Text of several lines goes in as an included file: from a buffer, libnftables 1.0.6
    # echoes the buffer's first line beside any error, not the statement that failed. The
    # include is part of the same transaction.
    transaction = os.memfd_create("qnix-nft-transaction", os.MFD_CLOEXEC)
    try:
        os.write(transaction, commands.encode())
        path = f"/proc/self/fd/{transaction}"
        rc, output, error = context.cmd(f'include "{path}"')
    finally:
        os.close(transaction)
    lines = [line for line in str(error).splitlines() if not line.startswith("In file included")]
    return int(rc), str(output), "\n".join(lines).replace(f"{path}:", "line ")


def run(path: Path | None, label: str, commands: str, *, terse: bool = False) -> str:
    """Run `commands` in the namespace at `path` (None: this one) as one transaction; their
    output (listings). A QnixError with libnftables' own message if it refuses them."""
    text = commands.strip("\n")
    if "\n" in text:
        log.debug("nft: %s: transaction:\n%s", label, text)
    else:
        log.debug("nft: %s: %s", label, text)
    with netlink.entered(path, label):
        rc, output, error = _run(commands, terse)
    if rc != 0:
        first = commands.strip().splitlines()[0] if commands.strip() else ""
        more = " (and what follows it)" if "\n" in commands.strip() else ""
        raise QnixError(
            f"nft: {label}: `{first}`{more} failed:\n{error.strip()}",
            hint="nothing of it was applied; `qnix --debug` shows the whole transaction",
        )
    return output


def try_run(path: Path | None, label: str, commands: str) -> bool:
    """`run`, where a refusal is an answer (False), not an error."""
    try:
        run(path, label, commands)
    except QnixError as exc:
        said = [line for line in exc.message.splitlines() if "Error:" in line]
        log.debug("nft: %s: refused: %s", label, said[0] if said else exc.message)
        return False
    return True
