"""Hostile specs: whatever text a valid spec carries, the modules keep their structure.

Hypothesis builds valid workstations whose free-text and name-like fields are as adversarial
as validation lets them be: paths full of Nix punctuation and non-ASCII letters, firewall
comments with quotes, `${` and backslashes, package names that are Nix keywords, and an nftables
body with any text at all appended. Every module of a batch of them is evaluated (with stand-in
arguments) in one `nix-instantiate --eval --strict --json` call and must equal the value tree it
was rendered from - the same keys everywhere, the same strings - and the flake's inputs must be
the expected ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.compile import nft
from qnix.compile.nix.flake import render_nix_files
from qnix.compile.nix.modules import module_trees
from qnix.compile.nix.printer import render
from qnix.spec.model import (
    APP_RE,
    HOSTNAME_RE,
    RESERVED_NAMES,
    UNIX_USER_RE,
    Workstation,
)
from tests.compile.nix.support import (
    expected_json,
    module_evaluation,
    nix_eval,
    same,
    stub_args,
    workstation,
    write_files,
)

NIX_PUNCTUATION = [*"{}[]()#:=,.!?*&|~^%<>@+-_", "${", "''", "or", "if", "rec"]
# What a path or a device may hold: no whitespace, quotes, `$`, `` ` ``, `;`, `\`, controls.
path_char = st.characters(
    blacklist_categories=("C", "Z"), blacklist_characters="/\"'\\$`;\x00"
) | st.sampled_from([c for c in NIX_PUNCTUATION if "$" not in c and "'" not in c])
segment = (
    st.lists(path_char, min_size=1, max_size=8)
    .map("".join)
    .filter(lambda s: s not in (".", "..") and ".." not in s)
)
absolute_path = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
comment = st.text(st.characters(blacklist_categories=("C",)), max_size=40) | st.sampled_from(
    ['${builtins.abort "x"}', '"; } evil = 1; {', "\\${", "''", "a\\", "日本 🐧"]
)
compartment_name = st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True).filter(
    lambda name: name not in RESERVED_NAMES
)
package = st.sampled_from(
    ["firefox", "if", "or", "inherit", "rec", "a-b", "_x", "python3Packages.requests", "xs.if"]
) | (
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True).filter(
        lambda name: name not in ("makeDesktopItem", "buildEnv")
    )
)
NIX_HOSTILE = [
    '${builtins.abort "x"}',
    "${",
    "\\${",
    "$${",
    '"',
    "\\",
    "''",
    "''${",
    "\n",
    "\r",
    "}",
    ";",
]
nft_body = st.lists(
    st.sampled_from(NIX_HOSTILE)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    max_size=8,
).map("".join)


@st.composite
def compartment(draw: st.DrawFn) -> dict[str, Any]:
    persistence = draw(st.sampled_from(["persistent", "disposable"]))
    network = draw(st.sampled_from(["none", "uplink"]))
    body: dict[str, Any] = {
        "isolation": draw(st.sampled_from(["namespace", "container", "vm"])),
        "persistence": persistence,
        "network": network,
        "packages": draw(st.lists(package, max_size=3, unique=True)),
        "apps": draw(
            st.lists(
                st.from_regex(APP_RE, fullmatch=True).filter(lambda a: len(a) <= 64),
                max_size=2,
                unique=True,
            )
        ),
        "user": draw(st.from_regex(UNIX_USER_RE, fullmatch=True)),
        "autostart": draw(st.booleans()),
    }
    if persistence == "persistent":
        body["persistent_paths"] = draw(st.lists(absolute_path, max_size=3, unique=True))
    if network != "none":
        body["firewall"] = [
            {"cidr": "0.0.0.0/0", "comment": text}
            for text in draw(st.lists(comment, min_size=1, max_size=2))
        ]
    return body


@st.composite
def hostile_workstation(draw: st.DrawFn) -> Workstation:
    encrypted = draw(st.booleans())
    host = {
        "hostname": draw(st.from_regex(HOSTNAME_RE, fullmatch=True)),
        "system": draw(st.sampled_from(["x86_64-linux", "aarch64-linux", "riscv64-linux"])),
        "hardening": draw(st.sampled_from(["baseline", "strict", "paranoid"])),
        "secure_boot": draw(st.booleans()),
        "timezone": draw(
            st.from_regex(r"[A-Za-z0-9_+-]{1,8}(/[A-Za-z0-9_+-]{1,8}){0,2}", fullmatch=True)
        ),
        "disk": {
            "device": "/dev" + draw(absolute_path),
            "encryption": "luks2" if encrypted else "none",
            "tpm2": encrypted and draw(st.booleans()),
            "filesystem": draw(st.sampled_from(["btrfs", "bcachefs", "ext4"])),
            "swap_gb": draw(st.integers(0, 64)),
        },
        "desktop": {
            "hyprland": draw(st.booleans()),
            "lid_switch": draw(st.sampled_from(["suspend", "lock", "poweroff"])),
        },
    }
    compartments = draw(st.dictionaries(compartment_name, compartment(), max_size=3))
    return workstation(host, compartments)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(hostile_workstation(), nft_body), min_size=1, max_size=3))
def test_hostile_specs_keep_the_structure_of_every_module(
    batch: list[tuple[Workstation, str]],
) -> None:
    # The real table, with hostile text after it: the module must carry it byte for byte.
    cases = [(ws, nft.render_table_body(ws) + extra) for ws, extra in batch]
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        modules: dict[str, Path] = {}
        flakes: dict[str, str] = {}
        expected: dict[str, Any] = {}
        for index, (ws, body) in enumerate(cases):
            write_files(root / str(index), render_nix_files(ws, body))
            for concern, tree in module_trees(ws, body).items():
                modules[f"{index}/{concern}"] = root / str(index) / "modules" / f"{concern}.nix"
                expected[f"{index}/{concern}"] = expected_json(tree)
            # Importing the flake parses it; its inputs are plain data.
            flake = render(str(root / str(index) / "flake.nix"))
            flakes[f"{index}/flake-inputs"] = f"builtins.attrNames (import {flake}).inputs"
            has_vms = any(c.isolation == "vm" for c in ws.compartments.values())
            expected[f"{index}/flake-inputs"] = sorted(
                ["disko", "nixpkgs", "qnix"]
                + (["lanzaboote"] if ws.host.secure_boot else [])
                + (["microvm"] if has_vms else [])
            )
        wrapper = root / "evaluate.nix"
        stubs = stub_args(ws for ws, _ in cases)
        wrapper.write_text(module_evaluation(stubs, modules, flakes), encoding="utf-8")
        result = nix_eval(wrapper)

    for index, (_, body) in enumerate(cases):
        assert result[f"{index}/network"]["networking"]["nftables"]["tables"]["qnix"] == {
            "content": body,
            "family": "inet",
        }
    same(result, expected)
