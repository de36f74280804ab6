"""Shared by the flake emitter tests: workstations to render, and Nix to parse and evaluate them.

Nothing here evaluates NixOS (there is no nixpkgs in a test): a module is a function of
`{ config, lib, pkgs, ... }`, so it is called with stand-ins. `pkgs.<name>` is
`{ outPath = "pkg:<name>"; }` (JSON shows a set with an `outPath` as that string), and the few
functions qnix calls (`lib.mkForce`, `pkgs.makeDesktopItem`, `pkgs.buildEnv`) return their
argument. A string interpolating an age ciphertext of the build (`${../secrets/NAME.age}`) gets
a stand-in file there, which Nix copies to the store: it evaluates to its store path. The
evaluated module must then equal, as JSON, the value tree it was rendered from: that proves the
printed Nix means exactly what the emitter built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qnix.compile import nft
from qnix.compile.inputs import check_references, load
from qnix.compile.nix.flake import render_nix_files
from qnix.compile.nix.modules import module_trees
from qnix.compile.nix.printer import Call, Function, NixValue, Raw, render
from qnix.runner import run
from qnix.spec.model import Workstation
from tests.conftest import EXAMPLES, need

# Functions qnix calls in a module; their stand-ins return the argument.
IDENTITY_CALLS = {
    "lib.mkForce": ("lib", "mkForce"),
    "pkgs.makeDesktopItem": ("pkgs", "makeDesktopItem"),
    "pkgs.buildEnv": ("pkgs", "buildEnv"),
}
QNIX_PACKAGES = (
    "age",
    "aide",
    "bubblewrap",
    "iproute2",
    "nftables",
    "shadow",
    "systemd",
    "util-linux",
)
_ATTR = r'(?:[A-Za-z_][A-Za-z0-9_\'-]*|"[^"\\]*")'
_PKGS_PATH = re.compile(rf"pkgs((?:\.{_ATTR})+)")
# The code qnix writes inside `${...}` of a string: a package (its store path) or an age
# ciphertext of the build, relative to the modules/ folder (copied to the store).
_PKGS_INTERPOLATION = re.compile(r"\$\{pkgs\.([A-Za-z0-9_-]+)\}")
_SECRET_INTERPOLATION = re.compile(r"\$\{\.\./(secrets/([A-Za-z0-9._+-]+\.age))\}")
# A string literal qnix writes whose only code is such an interpolation; no escapes.
_CODE_STRING = re.compile(
    r'"(?:[^"\\$]|\$\{pkgs\.[A-Za-z0-9_-]+\}|\$\{\.\./secrets/[A-Za-z0-9._+-]+\.age\})*"'
)
_INTERPOLATION = re.compile(f"{_PKGS_INTERPOLATION.pattern}|{_SECRET_INTERPOLATION.pattern}")
# A store path's hash: 32 characters of Nix's base-32 alphabet (no e, o, u, t).
_STORE_HASH = "[0-9a-df-np-sv-z]{32}"
# What write_files puts where a module interpolates a ciphertext: the start of an age file.
STAND_IN_CIPHERTEXT = b"age-encryption.org/v1\n"


# ---- workstations ----------------------------------------------------------------------------


def workstation(
    host: Mapping[str, Any] | None = None,
    compartments: Mapping[str, Any] | None = None,
    **rest: Any,
) -> Workstation:
    """A validated workstation whose cross references hold, as `qnix check` would demand."""
    document = {"host": {"hostname": "ws-1", **(host or {})}, **rest}
    if compartments is not None:
        document["compartments"] = compartments
    ws = Workstation.model_validate(document)
    problems = check_references("synthetic", ws)
    assert not problems, problems
    return ws


# Every isolation level and persistence, a net compartment with clients, a 31-character name.
MIXED_COMPARTMENTS: dict[str, Any] = {
    "sys-net": {
        "isolation": "container",
        "network": "uplink",
        "provides_network": True,
        "persistence": "disposable",
        "autostart": True,
        "memory_mb": 512,
        "firewall": [{"cidr": "0.0.0.0/0", "comment": "everything the clients may send"}],
    },
    "work": {
        "isolation": "container",
        "network": "sys-net",
        "persistent_paths": ["/home/user/.mozilla", "/srv/data"],
        "packages": ["firefox", "python3Packages.requests"],
        "apps": ["firefox"],
        "autostart": True,
        "memory_mb": 4096,
        "cpus": 4,
        "pids": 2048,
        "firewall": [{"dns": True}, {"proto": "tcp", "host": "mail.example.com", "ports": [993]}],
    },
    "build": {
        "isolation": "vm",
        "network": "uplink",
        "persistent_paths": ["/var/lib/build"],
        "packages": ["gcc"],
        "apps": ["gcc"],
        "memory_mb": 8192,
        "cpus": 4,
        "autostart": True,
        "firewall": [{"proto": "tcp", "cidr": "203.0.113.0/24", "ports": [443]}],
    },
    "scratch": {"isolation": "vm", "network": "none", "persistence": "disposable"},
    "vault": {"network": "none", "packages": ["keepassxc"], "apps": ["keepassxc"]},
    "browse": {
        "network": "sys-net",
        "persistence": "disposable",
        "packages": ["firefox"],
        "apps": ["firefox"],
        "gui": True,
        "label": "orange",
        "user": "alice",
        "firewall": [{"dns": True}, {"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [443]}],
    },
    "a-compartment-name-of-31-chars1": {"isolation": "container", "network": "uplink"},
}
TEMPLATES: dict[str, Any] = {
    "default-dvm": {"network": "sys-net", "packages": ["firefox", "evince"], "apps": ["firefox"]}
}


def synthetic_workstations() -> dict[str, Workstation]:
    """Every profile, file system, system, encryption and Secure Boot setting, with and without
    compartments of every kind."""
    cases: dict[str, Workstation] = {}
    systems = ("x86_64-linux", "aarch64-linux", "riscv64-linux")
    for index, (profile, filesystem) in enumerate(
        (p, f) for p in ("baseline", "strict", "paranoid") for f in ("btrfs", "bcachefs", "ext4")
    ):
        encrypted = index % 2 == 0
        host = {
            "hostname": f"{profile}-{filesystem}",
            "hardening": profile,
            "system": systems[index % 3],
            "secure_boot": index % 4 == 0,
            "disk": {
                "filesystem": filesystem,
                "encryption": "luks2" if encrypted else "none",
                "tpm2": encrypted and index % 3 != 1,
                "swap_gb": (0, 8, 32)[index % 3],
            },
            "desktop": {
                "hyprland": index % 2 == 1,
                "lid_switch": (
                    "hibernate"
                    if can_hibernate(profile, encrypted, (0, 8, 32)[index % 3])
                    else ("suspend", "lock", "poweroff", "ignore")[index % 4]
                ),
            },
        }
        with_compartments = index % 3 != 2
        cases[f"{profile}-{filesystem}"] = workstation(
            host,
            MIXED_COMPARTMENTS if with_compartments else None,
            **({"disposable_templates": TEMPLATES} if with_compartments else {}),
        )
    return cases


def can_hibernate(profile: str, encrypted: bool, swap_gb: int) -> bool:
    """The spec refuses hibernation with random-keyed swap, no swap, or paranoid lockdown."""
    return profile != "paranoid" and not encrypted and swap_gb > 0


def example_workstations() -> dict[str, Workstation]:
    return {path.name: load(path).workstation for path in sorted(EXAMPLES.glob("*.toml"))}


def all_workstations() -> dict[str, Workstation]:
    return {**example_workstations(), **synthetic_workstations()}


def nix_files(ws: Workstation) -> dict[str, str]:
    return render_nix_files(ws, nft.render_table_body(ws))


def trees(ws: Workstation) -> dict[str, dict[str, NixValue]]:
    return module_trees(ws, nft.render_table_body(ws))


# ---- Nix -------------------------------------------------------------------------------------


def write_files(root: Path, files: Mapping[str, str]) -> list[Path]:
    """Write the files; a module interpolating `${../secrets/NAME.age}` gets a stand-in
    ciphertext there, so that Nix can evaluate it. Returns the paths of `files` only."""
    paths = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
        for match in _SECRET_INTERPOLATION.finditer(text):
            ciphertext = path.parent.parent / match.group(1)
            ciphertext.parent.mkdir(parents=True, exist_ok=True)
            ciphertext.write_bytes(STAND_IN_CIPHERTEXT)
    return paths


def nix_parse(paths: Iterable[Path]) -> None:
    """Parse every file in one nix-instantiate call; it stops at, and names, the first bad one."""
    result = run([need("nix-instantiate"), "--parse", *map(str, paths)], timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def nix_eval(expression_file: Path) -> Any:
    result = run(
        [need("nix-instantiate"), "--eval", "--strict", "--json", str(expression_file)],
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _package_paths(ws: Workstation) -> set[tuple[str, ...]]:
    bodies = [*ws.compartments.values(), *ws.disposable_templates.values()]
    paths = {tuple(package.split(".")) for body in bodies for package in body.packages}
    return paths | {(name,) for name in QNIX_PACKAGES}


def _pkgs_stub(paths: set[tuple[str, ...]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for depth, part in enumerate(path):
            node = node.setdefault(part, {"outPath": "pkg:" + ".".join(path[: depth + 1])})
    for scope, name in IDENTITY_CALLS.values():
        if scope == "pkgs":
            root[name] = Raw("x: x")
    return root


def stub_args(workstations: Iterable[Workstation]) -> str:
    """The `{ config, lib, pkgs }` stand-ins for the modules of these workstations."""
    packages: set[tuple[str, ...]] = set()
    for ws in workstations:
        packages |= _package_paths(ws)
    return render({"config": {}, "lib": {"mkForce": Raw("x: x")}, "pkgs": _pkgs_stub(packages)}, 1)


def module_evaluation(
    stubs: str, modules: Mapping[str, Path], extra: Mapping[str, str] | None = None
) -> str:
    """An expression: each module file called with the stubs, functions inside called too;
    `extra` adds entries of Nix code written by the test."""
    entries = "\n".join(
        [
            f"  {render(key)} = resolve (import {render(str(path))});"
            for key, path in modules.items()
        ]
        + [f"  {render(key)} = {code};" for key, code in (extra or {}).items()]
    )
    return (
        "let\n"
        f"  stubs = {stubs};\n"
        "  resolve = v:\n"
        "    if builtins.isFunction v then resolve (v stubs)\n"
        "    else if builtins.isAttrs v then builtins.mapAttrs (_: resolve) v\n"
        "    else if builtins.isList v then map resolve v\n"
        "    else v;\n"
        "in {\n" + entries + "\n}\n"
    )


@dataclass(frozen=True)
class Matching:
    """An expected string known by its shape only: one holding a store path Nix computes."""

    pattern: str


def _code_string(code: str) -> str | Matching:
    """What a string literal qnix writes (`_CODE_STRING`) evaluates to with the stand-ins."""
    text = code[1:-1]
    if not _SECRET_INTERPOLATION.search(text):
        return _PKGS_INTERPOLATION.sub(lambda m: f"pkg:{m.group(1)}", text)
    pattern, start = "", 0
    for match in _INTERPOLATION.finditer(text):
        pattern += re.escape(text[start : match.start()])
        package, stored_name = match.group(1), match.group(3)
        if package:
            pattern += re.escape(f"pkg:{package}")
        else:
            # A file copied to the store keeps its base name after the hash.
            pattern += f"/nix/store/{_STORE_HASH}-{re.escape(stored_name)}"
        start = match.end()
    return Matching(pattern + re.escape(text[start:]))


def expected_json(value: NixValue) -> Any:
    """What a value tree evaluates to with the stand-ins, as JSON would show it."""
    if isinstance(value, Call):
        if value.function.code not in IDENTITY_CALLS:
            raise AssertionError(f"no stand-in for {value.function.code}")
        return expected_json(value.argument)
    if isinstance(value, Function):
        return expected_json(value.body)
    if isinstance(value, Raw):
        path = _PKGS_PATH.fullmatch(value.code)
        if path:
            parts = re.findall(_ATTR, path.group(1))
            return "pkg:" + ".".join(json.loads(p) if p.startswith('"') else p for p in parts)
        if _CODE_STRING.fullmatch(value.code):
            return _code_string(value.code)
        raise AssertionError(f"no stand-in for code {value.code!r}")
    if isinstance(value, Mapping):
        return {key: expected_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [expected_json(item) for item in value]
    return value


def same(actual: Any, expected: Any, at: str = "") -> None:
    """Equal as JSON values, types included (Python's `True == 1` would hide a wrong type); a
    `Matching` expects a string matching its pattern whole."""
    if isinstance(expected, Matching):
        assert isinstance(actual, str), f"{at}: {actual!r} is not a string"
        assert re.fullmatch(expected.pattern, actual), f"{at}: {actual!r} !~ {expected.pattern}"
        return
    assert type(actual) is type(expected), f"{at}: {actual!r} is not {expected!r}"
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), (
            f"{at}: keys {sorted(actual)} != {sorted(expected)}"
        )
        for key in expected:
            same(actual[key], expected[key], f"{at}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{at}: {len(actual)} items, expected {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            same(a, e, f"{at}[{index}]")
    else:
        assert actual == expected, f"{at}: {actual!r} != {expected!r}"
