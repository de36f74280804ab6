"""The NixOS secrets module: each container or VM listing age secrets gets a unit that decrypts
them with the host's key into /run/qnix-secrets/<compartment> before it starts (as its user,
0400) and removes them when it stops; the container binds that folder read-only at /run/secrets,
the VM gets it as a read-only virtiofs share there. The ciphertexts travel in the build and reach
the store as they are. No plaintext is in any file of a build, and every option set is a NixOS
25.11 (or microvm.nix) one.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import check_references, load
from qnix.compile.nix import modules
from qnix.compile.nix.compartments import SECRETS_INSIDE, SECRETS_RUNTIME_DIR, compartments_module
from qnix.compile.nix.modules import HOST_IDENTITY, secrets_module
from qnix.compile.nix.printer import NixValue, Raw, render
from qnix.compile.nix.vms import vms_module
from qnix.runtime import secrets as runtime_secrets
from qnix.runtime.paths import DEFAULT_RUN_ROOT
from qnix.spec.model import Workstation
from tests.compile.nix import reference
from tests.conftest import EXAMPLES, need

DEMO_KEY = EXAMPLES / "keys" / "demo-only.agekey"
AGE_KEY = "age14etvufpqjyhty3mmt88xdph427sglwpa699jkxhe3m9n9vrssg5st08shd"
STUBS = '{ config = { }; lib = { }; pkgs = { age = { outPath = "pkg:age"; }; }; }'
# The options this module sets, as NixOS 25.11 declares them (tests/data: the systemd.services
# lines of nixos-25.11-options.tsv, environment.systemPackages of nixos-25.11-audit-options.tsv).
UNIT_LIST = (
    "list of string matching the pattern [a-zA-Z0-9@%:_.\\-]+"
    "[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)"
)
NIXOS_2511_LINES = (
    ("environment.systemPackages", "list of package"),
    ("systemd.services", "attribute set of (submodule)"),
    ("systemd.services.<name>.before", UNIT_LIST),
    ("systemd.services.<name>.partOf", UNIT_LIST),
    ("systemd.services.<name>.requiredBy", UNIT_LIST),
    ("systemd.services.<name>.serviceConfig", "attribute set of (systemd option)"),
    ("systemd.services.<name>.unitConfig", "attribute set of (systemd option)"),
)


def _workstation(document: Mapping[str, Any]) -> Workstation:
    ws = Workstation.model_validate({"host": {"hostname": "ws"}, **document})
    assert check_references("synthetic", ws) == []
    return ws


MIXED = {
    "compartments": {
        "box": {"isolation": "container", "secrets": ["vpn", "otp"]},
        "vmx": {"isolation": "vm", "secrets": ["otp"]},
        "plain": {"isolation": "container"},
        "local": {"secrets": ["otp", "pass-token"]},
    },
    "disposable_templates": {"dvm": {"secrets": ["vpn"]}},
    "secrets": {
        "vpn": {"file": "secrets/vpn.age", "recipients": [AGE_KEY]},
        "otp": {"file": "secrets/otp.age", "recipients": [AGE_KEY]},
        "pass-token": {"source": "pass", "path": "work/token"},
    },
}


def _decrypt_command(compartment: str, secret: str) -> Raw:
    return Raw(
        '"${pkgs.age}/bin/age --decrypt --identity %d/qnix-host.agekey --output '
        f'/run/qnix-secrets/{compartment}/{secret} ${{../secrets/{secret}.age}}"'
    )


def _unit(
    compartment: str, unit: str, secrets: list[str], share: str | None = None
) -> dict[str, Any]:
    shares = [share] if share is not None else []
    return {
        "before": [unit, *shares],
        "partOf": [unit],
        "requiredBy": [unit, *shares],
        "serviceConfig": {
            "ExecStart": [_decrypt_command(compartment, s) for s in secrets],
            "Group": f"qx-{compartment}",
            "LoadCredential": "qnix-host.agekey:/etc/qnix/host.agekey",
            "RemainAfterExit": True,
            "RuntimeDirectory": f"qnix-secrets/{compartment}",
            "RuntimeDirectoryMode": "0700",
            "Type": "oneshot",
            "UMask": "0277",
            "User": f"qx-{compartment}",
        },
        "unitConfig": {
            "Description": f"qnix: the secrets of compartment {compartment}, in "
            f"/run/qnix-secrets/{compartment}"
        },
    }


def test_containers_and_vms_get_a_unit_namespace_compartments_get_theirs_at_start() -> None:
    assert secrets_module(_workstation(MIXED)) == {
        "environment": {"systemPackages": [Raw("pkgs.age")]},
        "systemd": {
            "services": {
                "qnix-secrets-box": _unit("box", "container@box.service", ["vpn", "otp"]),
                "qnix-secrets-vmx": _unit(
                    "vmx", "microvm@vmx.service", ["otp"], "microvm-virtiofsd@vmx.service"
                ),
            }
        },
    }


def test_no_age_secret_no_module() -> None:
    assert secrets_module(_workstation({})) == {}
    only_pass = {
        "compartments": {"local": {"secrets": ["t"]}},
        "secrets": {"t": {"source": "pass", "path": "t"}},
    }
    assert secrets_module(_workstation(only_pass)) == {}
    assert HOST_IDENTITY == "/etc/qnix/host.agekey"


def _home(compartment: str) -> dict[str, Any]:
    return {
        "hostPath": f"/var/lib/qnix/compartments/{compartment}/home",
        "isReadOnly": False,
        "mountPoint": "/home/user",
    }


def test_a_container_binds_its_folder_read_only_at_run_secrets() -> None:
    ws = _workstation(MIXED)
    containers: Any = compartments_module(ws)["containers"]
    assert containers["box"]["bindMounts"] == {
        "/home/user": _home("box"),
        "/run/secrets": {
            "hostPath": "/run/qnix-secrets/box",
            "isReadOnly": True,
            "mountPoint": "/run/secrets",
        },
    }
    assert containers["plain"]["bindMounts"] == {"/home/user": _home("plain")}
    disposable = _workstation(
        {
            "compartments": {
                "once": {"isolation": "container", "persistence": "disposable", "secrets": ["o"]}
            },
            "secrets": {"o": {"file": "o.age", "recipients": [AGE_KEY]}},
        }
    )
    once: Any = compartments_module(disposable)["containers"]
    assert once["once"]["bindMounts"] == {
        "/run/secrets": {
            "hostPath": "/run/qnix-secrets/once",
            "isReadOnly": True,
            "mountPoint": "/run/secrets",
        }
    }


def test_a_vm_gets_its_folder_as_a_read_only_virtiofs_share_at_run_secrets() -> None:
    guest: Any = vms_module(_workstation(MIXED))["microvm"]
    shares = guest["vms"]["vmx"]["config"].body["microvm"]["shares"]
    assert shares == [
        {
            "mountPoint": "/home/user",
            "proto": "virtiofs",
            "source": "/var/lib/qnix/compartments/vmx/home",
            "tag": "qx" + hashlib.sha256(b"/home/user").hexdigest()[:12],
        },
        {
            "mountPoint": "/run/secrets",
            "proto": "virtiofs",
            "readOnly": True,
            "source": "/run/qnix-secrets/vmx",
            "tag": "qx" + hashlib.sha256(b"/run/secrets").hexdigest()[:12],
        },
    ]


def test_the_bind_mount_and_the_share_are_options_of_the_right_type() -> None:
    ws = _workstation(MIXED)
    seen: set[str] = set()
    for tree in (compartments_module(ws), vms_module(ws)):
        report = reference.check(tree)
        assert report.errors == [], report.errors
        seen |= report.options
    assert {
        "containers.<name>.bindMounts.<name>.hostPath",
        "containers.<name>.bindMounts.<name>.isReadOnly",
        "containers.<name>.bindMounts.<name>.mountPoint",
        "microvm.shares.*.readOnly",
        "microvm.shares.*.source",
    } <= seen


def test_the_decrypted_folders_are_outside_what_qnix_down_removes() -> None:
    """`qnix down` removes the whole run root; the units' folders must not be in it."""
    assert SECRETS_RUNTIME_DIR == "/run/qnix-secrets"
    assert not Path(SECRETS_RUNTIME_DIR).is_relative_to(DEFAULT_RUN_ROOT)
    assert SECRETS_INSIDE == runtime_secrets.SECRETS_INSIDE == "/run/secrets"


@pytest.mark.parametrize("isolation", ["container", "vm"])
@pytest.mark.parametrize("path", ["/run/secrets", "/run/secrets/cache"])
def test_a_persistent_path_over_the_secrets_is_refused(isolation: str, path: str) -> None:
    ws = _workstation(
        {
            "compartments": {
                "box": {"isolation": isolation, "persistent_paths": [path], "secrets": ["o"]}
            },
            "secrets": {"o": {"file": "o.age", "recipients": [AGE_KEY]}},
        }
    )
    emitter = compartments_module if isolation == "container" else vms_module
    with pytest.raises(ValueError) as raised:
        emitter(ws)
    assert str(raised.value) == f"persistent path {path!r} overlaps /run/secrets"


def _evaluate(module: Path) -> Any:
    wrapper = module.parent / "evaluate-secrets.nix"
    wrapper.write_text(f"import {render(str(module))} {STUBS}\n")
    result = subprocess.run(
        [need("nix-instantiate"), "--eval", "--strict", "--json", str(wrapper)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _store_path(file: Path) -> str:
    """Where Nix puts `file` when a string interpolates it (computed, nothing is written)."""
    result = subprocess.run(
        [
            need("nix-instantiate"),
            "--eval",
            "--json",
            "--expr",
            f'"${{/. + {render(str(file))}}}"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    path = json.loads(result.stdout)
    assert isinstance(path, str)
    return path


def _build(spec: Path, out: Path) -> dict[str, bytes]:
    files = dict(compile_spec(load(spec)).files)
    for relative, data in files.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    return files


def test_the_built_module_ships_exactly_the_ciphertexts_to_the_store(tmp_path: Path) -> None:
    files = _build(EXAMPLES / "smb-office.toml", tmp_path)
    evaluated = _evaluate(tmp_path / "modules" / "secrets.nix")
    (command,) = evaluated["systemd"]["services"]["qnix-secrets-banking"]["serviceConfig"][
        "ExecStart"
    ]
    match = re.fullmatch(
        r"pkg:age/bin/age --decrypt --identity %d/qnix-host\.agekey --output "
        r"/run/qnix-secrets/banking/bank-otp (/nix/store/[0-9a-z]{32}-bank-otp\.age)",
        command,
    )
    assert match is not None, command
    # A store path names its content: the same bytes under the same name give the same path.
    same = tmp_path / "same" / "bank-otp.age"
    other = tmp_path / "other" / "bank-otp.age"
    same.parent.mkdir()
    other.parent.mkdir()
    same.write_bytes(files["secrets/bank-otp.age"])
    other.write_bytes(files["secrets/bank-otp.age"] + b"\n")
    assert _store_path(same) == match.group(1) != _store_path(other)
    assert evaluated["environment"] == {"systemPackages": ["pkg:age"]}


@pytest.mark.parametrize("spec", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_no_plaintext_is_in_any_file_of_a_build(spec: Path) -> None:
    loaded = load(spec)
    files = compile_spec(loaded).files
    blob = b"\0".join(files.values())
    assert loaded.secret_files, "every example has age secrets"
    for name, ciphertext in loaded.secret_files:
        assert files[f"secrets/{name}.age"] == ciphertext
        plaintext = subprocess.run(
            [need("age"), "--decrypt", "--identity", str(DEMO_KEY)],
            input=ciphertext,
            capture_output=True,
            check=True,
        ).stdout
        assert plaintext.strip() and plaintext.strip() not in blob
    assert b"AGE-SECRET-KEY" not in blob


def _reference_with_systemd() -> reference.Node:
    """Both references and the audit namespaces' options, which hold environment.*."""
    audit_lines = reference.tsv_lines(reference.AUDIT_OPTIONS_TSV)
    lines = [*reference.reference_lines(), *audit_lines]
    assert set(NIXOS_2511_LINES) <= set(lines)
    return reference.tree_of(lines)


def _with_evaluated_strings(tree: NixValue, evaluated: Any) -> NixValue:
    """The tree with each string qnix writes as Nix code (interpolating the store) replaced by
    what it evaluates to, so that its type can be checked."""
    if isinstance(tree, Raw) and tree.code.startswith('"'):
        assert isinstance(evaluated, str)
        return evaluated
    if isinstance(tree, Mapping):
        return {key: _with_evaluated_strings(value, evaluated[key]) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_with_evaluated_strings(v, e) for v, e in zip(tree, evaluated, strict=True)]
    return tree


def test_every_option_set_is_a_nixos_option_of_the_right_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference, "CHECKED", (*reference.CHECKED, "environment", "systemd"))
    root = _reference_with_systemd()
    checked = set()
    for spec in sorted(EXAMPLES.glob("*.toml")):
        out = tmp_path / spec.stem
        _build(spec, out)
        tree = secrets_module(load(spec).workstation)
        typed = _with_evaluated_strings(tree, _evaluate(out / "modules" / "secrets.nix"))
        assert isinstance(typed, Mapping)
        report = reference.check(typed, root)
        assert report.errors == [], report.errors
        checked |= report.options
    assert checked == {name for name, _ in NIXOS_2511_LINES}
    # The checker is not vacuous: a made-up option and a wrong type are errors.
    bad = {"systemd": {"services": {"x": {"requiredBy": ["not a unit"], "secretz": True}}}}
    assert len(reference.check(bad, root).errors) == 2


@settings(max_examples=8, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=40))
def test_text_in_an_interpolated_string_means_exactly_itself(texts: list[str]) -> None:
    """Spec text beside `${...}` in a string qnix writes is escaped by the printer: quotes,
    backslashes, `$` and `${` stay text. One nix-instantiate call per batch."""
    texts = [t.replace("\0", "") for t in texts]
    parts = [modules._interpolated(text, Raw('"!"'), text) for text in texts]
    result = subprocess.run(
        [need("nix-instantiate"), "--eval", "--strict", "--json", "--expr", render(parts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [f"{text}!{text}" for text in texts]
