"""`snapshots = N`: how many encrypted snapshots of a compartment's state are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from qnix.compile.inputs import load
from qnix.errors import SpecError

HOST = '[host]\nhostname = "h"\n'


def write(tmp_path: Path, body: str) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(HOST + "[compartments.work]\n" + body)
    return spec


def test_five_are_kept_by_default(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).workstation.compartments["work"].snapshots == 5


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_the_bounds_are_accepted(tmp_path: Path, count: int) -> None:
    spec = write(tmp_path, f"snapshots = {count}\n")
    assert load(spec).workstation.compartments["work"].snapshots == count


@pytest.mark.parametrize(
    ("value", "message", "shown"),
    [
        ("-1", "must be at least 0", "-1"),
        ("1001", "must be at most 1000", "1001"),
        ('"5"', "must be a whole number", '"5"'),
        ("2.5", "must be a whole number", "2.5"),
        ("true", "must be a whole number", "true"),
    ],
)
def test_out_of_bounds_or_not_a_number_is_refused_at_its_key(
    tmp_path: Path, value: str, message: str, shown: str
) -> None:
    spec = write(tmp_path, f"snapshots = {value}\n")
    with pytest.raises(SpecError) as caught:
        load(spec)
    (problem,) = caught.value.problems
    assert (problem.path, problem.value) == ("compartments.work.snapshots", shown)
    assert message in problem.message


def test_a_disposable_template_has_no_snapshots(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(HOST + "[disposable_templates.dvm]\nsnapshots = 3\n")
    with pytest.raises(SpecError) as caught:
        load(spec)
    (problem,) = caught.value.problems
    assert (problem.path, problem.message) == ("disposable_templates.dvm.snapshots", "unknown key")
