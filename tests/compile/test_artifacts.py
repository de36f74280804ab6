"""The build as a whole: canonical, order-independent, with a truthful manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.artifacts import checked_artifacts, compile_spec, listed_files
from qnix.compile.inputs import load
from tests.conftest import EXAMPLES

EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.toml"))


def _reversed(value: Any) -> Any:
    """The same document with every table's keys in reverse order (lists keep theirs)."""
    if isinstance(value, dict):
        return {key: _reversed(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed(item) for item in value]
    return value


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_build_twice_is_byte_identical(spec: Path) -> None:
    first = compile_spec(load(spec)).files
    second = compile_spec(load(spec)).files
    assert dict(first) == dict(second)


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_order_of_compartments_and_keys_does_not_matter(spec: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "examples"
    shutil.copytree(EXAMPLES, workdir)
    document = tomllib.loads(spec.read_text())
    reordered = workdir / (spec.stem + ".json")
    reordered.write_text(json.dumps(_reversed(document), indent=1))
    assert list(_reversed(document)["compartments"]) != list(document["compartments"])
    original = compile_spec(load(workdir / spec.name)).files
    shuffled = compile_spec(load(reordered)).files
    assert dict(original) == dict(shuffled)


def test_manifest_hashes_every_file_and_names_the_generation() -> None:
    artifacts = compile_spec(load(EXAMPLES / "smb-office.toml"))
    manifest = json.loads(artifacts.files["manifest.json"])
    files = {p: d for p, d in artifacts.files.items() if p != "manifest.json"}
    assert manifest["files"] == {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    assert manifest["spec_sha256"] == hashlib.sha256(files["spec.json"]).hexdigest()
    expected_generation = hashlib.sha256(
        json.dumps(manifest["files"], sort_keys=True).encode()
    ).hexdigest()
    assert manifest["generation"] == expected_generation == artifacts.generation
    assert manifest["hostname"] == "office-01"


def test_flake_layout() -> None:
    paths = set(compile_spec(load(EXAMPLES / "smb-office.toml")).files)
    concerns = ("compartments", "network", "users", "hardening", "audit", "secrets", "desktop")
    assert {f"modules/{c}.nix" for c in (*concerns, "vms", "disk")} <= paths
    assert {"flake.nix", "nftables/qnix.nft", "manifest.json", "spec.json"} <= paths
    assert {"policy/00-spec.policy", "policy/30-office.policy"} <= paths


def test_policy_files_keep_the_folder_unchanged_and_render_inline_rules() -> None:
    artifacts = compile_spec(load(EXAMPLES / "smb-office.toml"))
    original = (EXAMPLES / "policy.d" / "30-office.policy").read_bytes()
    assert artifacts.files["policy/30-office.policy"] == original
    inline = artifacts.files["policy/00-spec.policy"].decode().splitlines()
    assert inline[1:] == [
        "qnix.Filecopy * vault @anyvm deny",
        "qnix.Clipboard * vault @anyvm deny",
        "qnix.OpenInDisposable * @anyvm @dispvm:offline-dvm allow",
    ]


def test_a_changed_spec_is_a_new_generation(tmp_path: Path) -> None:
    workdir = tmp_path / "examples"
    shutil.copytree(EXAMPLES, workdir)
    spec = workdir / "smb-office.toml"
    before = compile_spec(load(spec)).generation
    spec.write_text(spec.read_text().replace('label = "yellow"', 'label = "orange"'))
    assert compile_spec(load(spec)).generation != before


def test_no_secret_plaintext_or_key_reaches_the_build() -> None:
    artifacts = compile_spec(load(EXAMPLES / "smb-office.toml"))
    blob = b"".join(artifacts.files.values())
    for marker in (b"demo-vault-passphrase", b"demo-not-a-real-key", b"AGE-SECRET-KEY"):
        assert marker not in blob


def test_artifacts_read_back_are_taken_only_whole() -> None:
    """What `qnix boot` reads from the state root: the same files give the same generation;
    a file changed, missing or added, or a manifest that lies, is named and refused."""
    built = compile_spec(load(EXAMPLES / "smb-office.toml"))
    files = dict(built.files)
    assert checked_artifacts(files) == built
    ruleset = "nftables/qnix.nft"
    cases = {
        "changed": ({**files, ruleset: files[ruleset] + b"#"}, f"{ruleset} differs from its hash"),
        "missing": ({k: v for k, v in files.items() if k != ruleset}, f"{ruleset} is missing"),
        "added": ({**files, "extra.nix": b"{}"}, "extra.nix is not in manifest.json"),
        "no manifest": (
            {k: v for k, v in files.items() if k != "manifest.json"},
            "manifest.json is missing or unreadable",
        ),
    }
    manifest = json.loads(files["manifest.json"])
    manifest["generation"] = "0" * 64
    lying = {**files, "manifest.json": json.dumps(manifest).encode()}
    cases["lying"] = (lying, "the generation in manifest.json is not the hash of its files")
    for name, (damaged, message) in cases.items():
        with pytest.raises(ValueError) as raised:
            checked_artifacts(damaged)
        assert str(raised.value).startswith(message), name


def test_a_manifest_lists_only_paths_inside_the_generation() -> None:
    """`qnix boot --generation DIR` reads what the manifest lists from DIR: every name must
    stay inside it."""
    built = compile_spec(load(EXAMPLES / "smb-office.toml"))
    assert listed_files(built.files["manifest.json"]) == tuple(
        sorted(set(built.files) - {"manifest.json"})
    )
    for path in ("../etc/shadow", "/etc/shadow", "policy/../../x", "./spec.json", "a//b", ""):
        manifest = json.dumps({"files": {path: "0" * 64}, "generation": "0" * 64}).encode()
        with pytest.raises(ValueError) as raised:
            listed_files(manifest)
        assert str(raised.value) == (
            f"manifest.json lists {path!r}, not a path inside the generation"
        ), path
