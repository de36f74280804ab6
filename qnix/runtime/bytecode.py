"""Python programs compiled by the interpreter that runs them inside a compartment.

The agent starts in every compartment and disposable; compiling its source there costs each
start a few milliseconds (under a VM's TCG, far more). It is compiled once by that same
interpreter (bytecode is for one interpreter version) and kept in the run root, under a name
made of the interpreter's identity and the source's hash: an upgraded interpreter or a changed
program compiles anew. The cache is root's and holds nothing secret.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qnix.errors import QnixError
from qnix.runner import run
from qnix.runtime.files import atomic_write

CACHE_DIR = "bytecode"  # in the run root (paths.RUN_ROOT_ENTRIES)

# Run by the inside interpreter on the host. The .pyc is unchecked-hash (PEP 552): no source
# beside it is ever looked at. Hex both ways, as the runner speaks text.
_COMPILE = """\
import importlib.util, marshal, sys
source = bytes.fromhex(sys.stdin.read())
code = compile(source, sys.argv[1], "exec", dont_inherit=True)
flags = (1).to_bytes(4, "little")
header = importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source)
sys.stdout.write((header + marshal.dumps(code)).hex())
"""


def compiled_by(interpreter: str, source: bytes, filename: str) -> bytes:
    """`source` compiled by `interpreter`, as a .pyc it runs as a script."""
    compiled = run([interpreter, "-I", "-S", "-c", _COMPILE, filename], input=source.hex())
    return bytes.fromhex(compiled.stdout)


def interpreter_identity(interpreter: str) -> bytes:
    """What tells one build of an interpreter from another (an upgrade replaces the file)."""
    real = os.path.realpath(interpreter)
    try:
        info = os.stat(real)
    except OSError as exc:
        raise QnixError(f"the compartments' interpreter {interpreter} is missing: {exc}") from None
    return f"{real}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}".encode()


def cached_bytecode(interpreter: str, source: bytes, filename: str, run_root: Path) -> bytes:
    """`compiled_by`, kept in the run root's cache."""
    digest = hashlib.sha256(interpreter_identity(interpreter) + b"\0" + filename.encode())
    digest.update(b"\0" + hashlib.sha256(source).digest())
    path = run_root / CACHE_DIR / f"{digest.hexdigest()[:32]}.pyc"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    compiled = compiled_by(interpreter, source, filename)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, compiled, 0o600)
    return compiled
