"""Secrets in the spec: an age file (the default source) or a pass entry, listed by compartments
and disposable templates; the loader carries each age ciphertext for the build."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.compile.inputs import load
from qnix.errors import Problem, SpecError
from qnix.spec.model import PASS_ENTRY_RE, Secret
from tests.conftest import EXAMPLES

AGE_KEY = "age14etvufpqjyhty3mmt88xdph427sglwpa699jkxhe3m9n9vrssg5st08shd"
HOST = '[host]\nhostname = "h"\n'
CIPHERTEXT = EXAMPLES.joinpath("secrets/work-vpn.age").read_bytes()


def write(tmp_path: Path, text: str, files: dict[str, bytes] | None = None) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(HOST + text)
    for name, data in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return spec


def only_problem(spec: Path) -> Problem:
    with pytest.raises(SpecError) as caught:
        load(spec)
    problems = caught.value.problems
    assert len(problems) == 1, [p.render() for p in problems]
    return problems[0]


def test_a_pass_secret_and_a_template_listing_secrets_load(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        '[compartments.work]\nsecrets = ["vpn", "otp"]\n'
        '[disposable_templates.dvm]\nsecrets = ["otp"]\n'
        '[secrets.vpn]\nsource = "pass"\npath = "work/vpn"\n'
        f'[secrets.otp]\nfile = "secrets/otp.age"\nrecipients = ["{AGE_KEY}"]\n',
        {"secrets/otp.age": CIPHERTEXT},
    )
    loaded = load(spec)
    ws = loaded.workstation
    assert ws.secrets["vpn"] == Secret(source="pass", path="work/vpn")
    assert (ws.secrets["vpn"].file, ws.secrets["vpn"].recipients) == (None, ())
    assert ws.secrets["otp"].source == "age"
    assert ws.disposable_templates["dvm"].secrets == ("otp",)
    # Only age secrets have a ciphertext beside the spec.
    assert loaded.secret_files == (("otp", CIPHERTEXT),)


CASES = [
    (
        f'[secrets.s]\nfile = "s.age"\nrecipients = ["{AGE_KEY}"]\npath = "a/b"\n',
        "secrets.s.path",
        "an age secret has no path",
        'drop path, or set source = "pass"',
    ),
    (
        f'[secrets.s]\nrecipients = ["{AGE_KEY}"]\n',
        "secrets.s.file",
        "an age secret needs its file",
        "qnix secret add NAME writes it",
    ),
    (
        '[secrets.s]\nfile = "s.age"\n',
        "secrets.s.recipients",
        "an age secret needs recipients",
        "the public keys that may decrypt it",
    ),
    (
        '[secrets.s]\nsource = "pass"\npath = "a/b"\nfile = "s.age"\n',
        "secrets.s.file",
        "a pass secret has no file",
        "pass encrypts to its own gpg keys",
    ),
    (
        f'[secrets.s]\nsource = "pass"\npath = "a/b"\nrecipients = ["{AGE_KEY}"]\n',
        "secrets.s.recipients",
        "a pass secret has no recipients",
        'or set source = "age"',
    ),
    (
        '[secrets.s]\nsource = "pass"\n',
        "secrets.s.path",
        "a pass secret needs the path of its entry",
        'add path = "work/vpn"',
    ),
    (
        '[secrets.s]\nsource = "pass"\npath = "-rf"\n',
        "secrets.s.path",
        "is not a valid password-store entry",
        "none starting with '.' or '-'",
    ),
    (
        '[secrets.s]\nsource = "vault"\n',
        "secrets.s.source",
        "must be one of: age, pass",
        None,
    ),
    (
        '[disposable_templates.dvm]\nsecrets = ["nope"]\n',
        "disposable_templates.dvm.secrets[0]",
        "names no secret",
        "declare it under [secrets]",
    ),
    (
        '[compartments.box]\nisolation = "container"\nsecrets = ["s"]\n'
        '[secrets.s]\nsource = "pass"\npath = "a/b"\n',
        "compartments.box.secrets[0]",
        "a pass secret cannot reach a container compartment",
        'make it an age secret, or use isolation = "namespace"',
    ),
]


@pytest.mark.parametrize(("text", "path", "message", "hint"), CASES, ids=[c[2] for c in CASES])
def test_a_secret_that_does_not_fit_its_source_is_one_located_problem(
    tmp_path: Path, text: str, path: str, message: str, hint: str | None
) -> None:
    problem = only_problem(write(tmp_path, text, {"s.age": CIPHERTEXT}))
    assert (problem.path, problem.message) == (path, message)
    if hint is None:
        assert problem.hint == ""
    else:
        assert hint in problem.hint


def test_a_missing_file_is_no_problem_only_where_qnix_secret_add_will_write_it(
    tmp_path: Path,
) -> None:
    spec = write(tmp_path, f'[secrets.s]\nfile = "secrets/s.age"\nrecipients = ["{AGE_KEY}"]\n')
    problem = only_problem(spec)
    assert (problem.path, problem.message) == ("secrets.s.file", "file not found")
    assert "qnix secret add s --spec spec.toml" in problem.hint
    assert load(spec, missing_secrets_ok=True).secret_files == ()
    # A plaintext where the ciphertext belongs is refused either way.
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "s.age").write_text("hunter2\n")
    with pytest.raises(SpecError, match="1 problem"):
        load(spec, missing_secrets_ok=True)


def test_the_examples_carry_every_age_ciphertext_unchanged() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    assert dict(loaded.secret_files) == {
        name: (EXAMPLES / secret.file).read_bytes()
        for name, secret in loaded.workstation.secrets.items()
        if secret.file is not None
    }


_PART = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]*")


@settings(max_examples=400, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(
            [*string.ascii_letters[:6], *"09._@+-/", " ", "\n", "\0", "$", "'", "\\", "é", "~"]
        ),
        max_size=40,
    )
)
def test_a_pass_entry_is_never_an_option_a_hidden_file_or_a_way_up(entry: str) -> None:
    """Whatever a spec says, an accepted entry is a relative path of plain parts: `pass show --
    ENTRY` and the store's `ENTRY.gpg` stay inside the store."""
    try:
        secret = Secret(source="pass", path=entry)
    except ValueError:
        assert re.fullmatch(PASS_ENTRY_RE, entry) is None
        return
    assert secret.path == entry
    parts = entry.split("/")
    assert all(_PART.fullmatch(part) for part in parts)
    assert not entry.startswith(("/", "-", ".")) and ".." not in parts
