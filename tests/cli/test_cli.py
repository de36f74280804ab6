"""The installed `qnix` command: exit codes, messages without tracebacks, written files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner

from qnix.cli.main import cli
from tests.conftest import EXAMPLES
from tests.spec.test_invalid import CASES, Bad, write_case

QNIX = str(Path(sys.executable).with_name("qnix"))
OFFICE = str(EXAMPLES / "smb-office.toml")


def qnix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QNIX, *args], capture_output=True, text=True, timeout=120, check=False)


def test_check_accepts_the_office_example() -> None:
    result = qnix("check", OFFICE)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "8 compartments" in result.stdout


def test_invalid_spec_exits_2_with_key_path_value_and_hint(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(
        '[host]\nhostname = "h"\n'
        '[compartments.work]\nnetwrok = "uplink"\nlabel = "blu"\n'
        'firewall = [{ proto = "tcp", cidr = "192.0.2.0/24", ports = [70000] }]\n'
    )
    result = qnix("check", str(spec))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    err = result.stderr
    assert f"{spec}: compartments.work.netwrok: unknown key" in err
    assert "did you mean 'network'?" in err
    assert f"{spec}: compartments.work.label: must be one of" in err
    assert "did you mean 'blue'?" in err
    assert "compartments.work.firewall[0].ports[0]" in err
    assert "70000" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('[host]\nhostname = "BAD HOST"\n')
    result = qnix("--debug", "check", str(spec))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_missing_spec_is_a_clear_error(tmp_path: Path) -> None:
    result = qnix("check", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read spec" in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_writes_the_flake_and_replaces_only_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "flake"
    result = qnix("build", OFFICE, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "generation" in result.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "flake.nix" in written
    assert "manifest.json" in written
    first = {p: (out / p).read_bytes() for p in written}
    # What the flake's user adds stays: its lock, its repository.
    (out / "flake.lock").write_text("{}")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    # A file an earlier build wrote (its manifest lists it) and this one does not is removed.
    (out / "old" / "gone.nix").parent.mkdir()
    (out / "old" / "gone.nix").write_text("old")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["old/gone.nix"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert qnix("build", OFFICE, "-o", str(out)).returncode == 0
    assert {p: (out / p).read_bytes() for p in written} == first
    assert not (out / "old").exists()
    assert (out / "flake.lock").read_text() == "{}"
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_build_does_not_write_through_a_link_out_of_its_folder(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "flake", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert qnix("build", OFFICE, "-o", str(out)).returncode == 0
    modules = out / "modules"
    shutil.rmtree(modules)
    modules.symlink_to(elsewhere)
    result = qnix("build", OFFICE, "-o", str(out))
    assert result.returncode == 1
    assert "a symbolic link in" in result.stderr
    assert not list(elsewhere.iterdir())
    # Control: with the folder a folder again, the same build writes it.
    modules.unlink()
    assert qnix("build", OFFICE, "-o", str(out)).returncode == 0
    assert list(modules.iterdir())


def test_build_refuses_a_file_as_output(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = qnix("build", OFFICE, "-o", str(target))
    assert result.returncode != 0
    assert target.read_text() == "x"


def test_graph_draws_svg(tmp_path: Path) -> None:
    picture = tmp_path / "office.svg"
    result = qnix("graph", OFFICE, "-o", str(picture))
    assert result.returncode == 0, result.stderr
    root = ElementTree.fromstring(picture.read_text())
    texts = {element.text for element in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"work", "banking", "vault", "sys-firewall"} <= texts


def test_graph_refuses_unknown_formats(tmp_path: Path) -> None:
    result = qnix("graph", OFFICE, "-o", str(tmp_path / "x.gif"))
    assert result.returncode == 1
    assert "hint: end the file name in .svg" in result.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_every_invalid_spec_exits_2_naming_its_key_path(case: Bad, tmp_path: Path) -> None:
    """The same cases as the loader's tests, through the command (in-process for speed)."""
    spec = write_case(case, tmp_path)
    result = CliRunner().invoke(cli, ["check", str(spec)])
    assert result.exit_code == 2, result.output
    where = f"{spec}: {case.path}: " if case.path else f"{spec}: "
    assert where in result.stderr
    assert "Traceback" not in result.stderr
