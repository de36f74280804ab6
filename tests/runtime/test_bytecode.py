"""The agent compiled once by the compartments' interpreter, kept in the run root."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qnix.runtime import bytecode
from tests.conftest import need

SOURCE = b"import sys\nprint('ran as', sys.argv[1])\n"


def test_compiled_once_by_the_interpreter_that_runs_it(tmp_path: Path) -> None:
    python = need("python3")
    magic = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    first = bytecode.cached_bytecode(python, SOURCE, "/opt/x/prog.pyc", tmp_path)
    assert first[:4].hex() == magic
    cache = list((tmp_path / bytecode.CACHE_DIR).iterdir())
    assert len(cache) == 1 and cache[0].read_bytes() == first
    assert oct(cache[0].stat().st_mode & 0o777) == "0o600"
    # The next start reads it instead of compiling again: what the file holds is what it gets.
    cache[0].write_bytes(first + b"marked")
    assert (
        bytecode.cached_bytecode(python, SOURCE, "/opt/x/prog.pyc", tmp_path) == first + b"marked"
    )
    cache[0].write_bytes(first)
    # It runs as a script, as the agent does inside.
    program = tmp_path / "prog.pyc"
    program.write_bytes(first)
    ran = subprocess.run([python, "-I", "-S", str(program), "here"], capture_output=True, text=True)
    assert ran.stdout == "ran as here\n", ran.stderr
    # A changed program is compiled anew, beside the old one.
    changed = bytecode.cached_bytecode(python, SOURCE + b"#\n", "/opt/x/prog.pyc", tmp_path)
    assert changed != first
    assert len(list((tmp_path / bytecode.CACHE_DIR).iterdir())) == 2
