"""The qnix services table (qnix.compile.services): its unit files pass `systemd-analyze verify`
and reach the exposure level each unit's job allows (`systemd-analyze security --offline`,
figures printed); its NixOS module is the committed nix/module.nix, parses, evaluates to the
table, and sets only NixOS 25.11 options of the right type; the root flake parses and has the
outputs it promises."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from qnix.compile import services
from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import load
from qnix.compile.nix.printer import Raw, render
from qnix.runner import run
from tests.compile.nix import reference
from tests.compile.nix.support import nix_eval, nix_parse, same
from tests.compile.nix.test_audit_module import full_reference, with_evaluated_strings
from tests.conftest import EXAMPLES, ROOT, need

# What each unit may be rated at most: the boot unit makes namespaces, links, tables and mounts
# in the host's own mount namespace and starts the compartments, which inherit its limits; gc
# undoes the same. The units that only touch files are closed in.
LEVELS = ("SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE")
AIMS = {
    "qnix-audit-seal.service": "OK",
    "qnix-received-append-only.service": "OK",
    "qnix-boot.service": "MEDIUM",
    "qnix-gc.service": "MEDIUM",
    "qnix-host-key.service": "OK",
    "qnix-integrity.service": "OK",
    "qnix-pull.service": "MEDIUM",  # it starts compartments, as boot does
}
_OVERALL = re.compile(r"Overall exposure level for (\S+): ([0-9.]+) ([A-Z]+)")


def real_tools() -> dict[services.Tool, str]:
    """Programs that exist here, so that `verify` checks the command lines for real."""
    qnix = Path(sys.executable).with_name("qnix")  # this checkout's, beside the interpreter
    assert qnix.is_file()
    return {"qnix": str(qnix), "age-keygen": need("age-keygen"), "systemd-run": need("systemd-run")}


def every_unit_file(tools: dict[services.Tool, str]) -> dict[str, str]:
    """What `qnix install` and `qnix pull --install-timer` put in place, together."""
    return {**services.unit_files(tools), **services.unit_files(tools, "pull")}


def write_units(folder: Path, files: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths


def verify(paths: list[Path]) -> Any:
    return run(
        [need("systemd-analyze"), "verify", "--man=no", *map(str, paths)],
        check=False,
        timeout=120,
    )


def exposure(unit: Path) -> tuple[float, str]:
    result = run(
        [need("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
        check=False,
        timeout=120,
    )
    match = _OVERALL.search(result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(2)), match.group(3)


def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    paths = write_units(tmp_path, every_unit_file(real_tools()))
    assert sorted(p.name for p in paths) == [
        "qnix-audit-seal.service",
        "qnix-audit-seal.timer",
        "qnix-boot.service",
        "qnix-gc.service",
        "qnix-gc.timer",
        "qnix-host-key.service",
        "qnix-integrity.service",
        "qnix-integrity.timer",
        "qnix-pull.service",
        "qnix-pull.timer",
        "qnix-received-append-only.service",
        "qnix-received-append-only.timer",
    ]
    result = verify(paths)
    assert result.returncode == 0, result.stderr


def test_verify_catches_a_command_that_is_not_there(tmp_path: Path) -> None:
    """The control: the same units with a qnix that does not exist fail `verify`."""
    tools: dict[services.Tool, str] = {**real_tools(), "qnix": str(tmp_path / "no-such-qnix")}
    paths = write_units(tmp_path / "units", services.unit_files(tools))
    result = verify(paths)
    assert result.returncode != 0
    assert "no-such-qnix is not executable" in result.stderr
    # The pull's command is systemd-run's, checked the same way.
    tools = {**real_tools(), "systemd-run": str(tmp_path / "no-such-systemd-run")}
    paths = write_units(tmp_path / "pull", services.unit_files(tools, "pull"))
    result = verify(paths)
    assert result.returncode != 0
    assert "no-such-systemd-run is not executable" in result.stderr


def unhardened(text: str) -> str:
    """The unit with only what makes it run: the description, the commands and the type."""
    keep = ("[", "Description=", "Exec", "Type=", "RemainAfterExit=")
    return "".join(line + "\n" for line in text.splitlines() if line.startswith(keep))


def test_each_unit_reaches_the_exposure_its_job_allows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = every_unit_file(real_tools())
    hardened = write_units(tmp_path / "hardened", files)
    bare = write_units(
        tmp_path / "bare", {n: unhardened(t) for n, t in files.items() if n.endswith(".service")}
    )
    figures = {p.name: exposure(p) for p in hardened if p.name.endswith(".service")}
    controls = {p.name: exposure(p) for p in bare}
    with capsys.disabled():
        print("\nsystemd-analyze security --offline=true (aim; without the hardening):")
        for name, (score, level) in sorted(figures.items()):
            bare_score, bare_level = controls[name]
            print(
                f"  {name:24} {score:4.1f} {level:8} (aim {AIMS[name]}; "
                f"unhardened {bare_score:.1f} {bare_level})"
            )
    assert set(figures) == set(AIMS)
    for name, (score, level) in figures.items():
        assert LEVELS.index(level) <= LEVELS.index(AIMS[name]), (name, score, level)
        # The control: without its directives the same unit is rated worse.
        assert controls[name][0] > score, (name, controls[name], score)
        assert controls[name][1] in ("EXPOSED", "UNSAFE"), (name, controls[name])


def test_the_unit_files_are_exactly_the_table() -> None:
    boot = services.unit_files({"qnix": "/opt/qnix/bin/qnix", "age-keygen": "/usr/bin/age-keygen"})
    assert boot["qnix-gc.timer"] == (
        "[Unit]\n"
        "Description=qnix: remove what a crash left behind, daily\n"
        "\n"
        "[Timer]\n"
        "OnBootSec=15min\n"
        "OnUnitActiveSec=1d\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    text = boot["qnix-boot.service"]
    assert text.startswith(
        "[Unit]\n"
        "Description=qnix: the host brought to the live generation\n"
        "Wants=network-pre.target\n"
        "After=network-pre.target nftables.service systemd-tmpfiles-setup.service"
        " qnix-host-key.service\n"
        "ReloadPropagatedFrom=nftables.service\n"
        "\n"
        "[Service]\n"
        "ExecStart=/opt/qnix/bin/qnix boot\n"
        "ExecStop=/opt/qnix/bin/qnix down\n"
        "ExecReload=/opt/qnix/bin/qnix gc\n"
    )
    assert text.endswith("[Install]\nWantedBy=multi-user.target\n")
    # The boot unit keeps the host's mount namespace: nothing that would make one of its own.
    for directive in ("ProtectSystem", "PrivateTmp", "ReadWritePaths", "PrivateDevices"):
        assert f"\n{directive}=" not in text
    assert services.enabled_units() == (
        "qnix-host-key.service",
        "qnix-boot.service",
        "qnix-gc.timer",
        "qnix-audit-seal.timer",
        "qnix-received-append-only.timer",
        "qnix-integrity.timer",
    )
    assert services.enabled_units("pull") == ("qnix-pull.timer",)
    assert services.tmpfiles_conf() == (
        "d /etc/qnix 0700 root root -\n"
        "d /var/lib/qnix 0700 root root -\n"
        "d /var/lib/qnix/audit 0700 root root -\n"
        "d /run/qnix 0700 root root -\n"
    )


PULL_SERVICE = """\
[Unit]
Description=qnix: follow the fleet repository (qnix pull)
Wants=network-online.target
After=network-online.target qnix-boot.service
ConditionPathExists=/var/lib/qnix/pull/trust.json

[Service]
ExecStart=/usr/bin/systemd-run --scope --quiet --collect --property=Before=qnix-boot.service \
/opt/qnix/bin/qnix pull
CapabilityBoundingSet=~CAP_AUDIT_CONTROL CAP_AUDIT_READ CAP_BLOCK_SUSPEND CAP_LEASE \
CAP_LINUX_IMMUTABLE CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_SYS_BOOT CAP_SYS_MODULE CAP_SYS_PACCT \
CAP_SYS_RAWIO CAP_SYS_TIME CAP_SYS_TTY_CONFIG CAP_SYSLOG CAP_WAKE_ALARM
LockPersonality=yes
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6 AF_PACKET AF_VSOCK
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
SystemCallErrorNumber=EPERM
SystemCallFilter=~@clock @cpu-emulation @obsolete @raw-io @reboot @swap
TimeoutStartSec=30min
Type=oneshot
UMask=0077
"""
PULL_TIMER = """\
[Unit]
Description=qnix: follow the fleet repository, every 5 minutes

[Timer]
OnBootSec=5min
OnUnitActiveSec=5min
RandomizedDelaySec=1min

[Install]
WantedBy=timers.target
"""
PULL_TOOLS: dict[services.Tool, str] = {
    "qnix": "/opt/qnix/bin/qnix",
    "systemd-run": "/usr/bin/systemd-run",
}


def test_the_pull_units_are_exactly_the_table() -> None:
    """The pull runs in a scope of its own (systemd-run --scope), so the keepers it starts
    outlive this oneshot; the scope is stopped after qnix-boot at shutdown."""
    assert services.unit_files(PULL_TOOLS, "pull") == {
        "qnix-pull.service": PULL_SERVICE,
        "qnix-pull.timer": PULL_TIMER,
    }
    # `qnix install` leaves them out: only a desk of a fleet needs them.
    assert not [
        name for name in services.unit_files({**PULL_TOOLS, "age-keygen": "/a"}) if "pull" in name
    ]


# ---- the NixOS module and the root flake -----------------------------------------------------


def test_the_committed_module_is_what_the_table_renders() -> None:
    """nix/module.nix is generated; after a change of the table, regenerate it (its header and
    docs/install.md say how) and commit both."""
    assert (ROOT / services.MODULE_FILE).read_text() == services.module_file()


def test_the_nix_files_parse() -> None:
    nix_parse([ROOT / "flake.nix", ROOT / services.MODULE_FILE, ROOT / "nix" / "package.nix"])


STUB_LIB = """{
  mkIf = condition: value: if condition then value else { };
  mkEnableOption = description: { enableOption = description; };
  mkOption = option: option;
  literalExpression = text: text;
  optionalString = condition: text: if condition then text else "";
  types.package = "package";
  types.path = "path";
  types.nullOr = type: "null or " + type;
}"""
# The generation option's value in the evaluations below: a string, as `./.` in a flake is a
# path that interpolation would copy to the store.
GENERATION = "/nix/store/0000000000000000000000000000000-source"
OPTIONAL_GENERATION = (
    '${lib.optionalString (config.services.qnix.generation != null) " --generation '
    '${config.services.qnix.generation}"}'
)


def evaluate_module(tmp_path: Path, enable: bool, generation: str | None = None) -> Any:
    wrapper = tmp_path / f"module-{enable}-{generation is None}.nix"
    wrapper.write_text(
        f"""
import {render(str(ROOT / services.MODULE_FILE))} {{
  lib = {STUB_LIB};
  pkgs = {{
    age = {{ outPath = "pkg:age"; }};
    callPackage = path: args: {{ outPath = "pkg:" + baseNameOf path; }};
  }};
  config.services.qnix = {{
    enable = {render(enable)};
    package = {{ outPath = "pkg:qnix"; }};
    generation = {render(generation)};
  }};
  config.systemd.package = {{ outPath = "pkg:systemd"; }};
}}
"""
    )
    return nix_eval(wrapper)


def nix_expected(value: Any, generation: str | None = None) -> Any:
    """What the table's tree evaluates to with the stand-ins above."""
    if isinstance(value, Raw):
        if value.code == "config.services.qnix.package":
            return "pkg:qnix"  # JSON shows a derivation as its outPath
        assert value.code.startswith('"${'), value.code
        return (
            value.code[1:-1]
            .replace("${config.services.qnix.package}", "pkg:qnix")
            .replace("${pkgs.age}", "pkg:age")
            .replace("${config.systemd.package}", "pkg:systemd")
            .replace(
                OPTIONAL_GENERATION, "" if generation is None else f" --generation {generation}"
            )
        )
    if isinstance(value, dict):
        return {key: nix_expected(item, generation) for key, item in value.items()}
    if isinstance(value, list):
        return [nix_expected(item, generation) for item in value]
    return value


def test_the_module_evaluates_to_the_table(tmp_path: Path) -> None:
    module = evaluate_module(tmp_path, enable=True)
    same(module["config"], nix_expected(services.nixos_config()))
    boot = module["config"]["systemd"]["services"]["qnix-boot"]
    # No generation set: the one `qnix apply` installed.
    assert boot["serviceConfig"]["ExecStart"] == "pkg:qnix/bin/qnix boot"
    # A switch must not stop the compartments (its ExecStop is `qnix down`).
    assert boot["restartIfChanged"] is False
    options = module["options"]["services"]["qnix"]
    assert options["package"]["default"] == "pkg:package.nix"
    assert {k: v for k, v in options["generation"].items() if k != "description"} == {
        "default": None,
        "example": "./.",
        "type": "null or path",
    }
    assert "qnix boot --generation" in options["generation"]["description"]
    # The integrity check is the generated flake's own AIDE unit on NixOS.
    assert sorted(module["config"]["systemd"]["services"]) == [
        "qnix-audit-seal",
        "qnix-boot",
        "qnix-gc",
        "qnix-host-key",
        "qnix-pull",
        "qnix-received-append-only",
    ]
    pull = module["config"]["systemd"]["services"]["qnix-pull"]["serviceConfig"]
    assert pull["ExecStart"] == (
        "pkg:systemd/bin/systemd-run --scope --quiet --collect"
        " --property=Before=qnix-boot.service pkg:qnix/bin/qnix pull"
    )
    assert module["config"]["systemd"]["timers"]["qnix-pull"]["timerConfig"] == {
        "OnBootSec": "5min",
        "OnUnitActiveSec": "5min",
        "RandomizedDelaySec": "1min",
    }


def test_with_a_generation_the_boot_unit_boots_from_it(tmp_path: Path) -> None:
    module = evaluate_module(tmp_path, enable=True, generation=GENERATION)
    same(module["config"], nix_expected(services.nixos_config(), GENERATION))
    boot = module["config"]["systemd"]["services"]["qnix-boot"]["serviceConfig"]
    assert boot["ExecStart"] == f"pkg:qnix/bin/qnix boot --generation {GENERATION}"
    assert boot["ExecStop"] == "pkg:qnix/bin/qnix down"
    assert boot["ExecReload"] == "pkg:qnix/bin/qnix gc"


def test_the_built_flake_boots_from_its_own_folder_in_the_store(tmp_path: Path) -> None:
    """The flake `qnix build` writes, with this module: the boot unit's command names the
    store copy of the flake's folder, the folder that holds manifest.json."""
    folder = tmp_path / "office"
    for relative, data in compile_spec(load(EXAMPLES / "smb-office.toml")).files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    wrapper = tmp_path / "built.nix"
    wrapper.write_text(
        f"""
let
  flake = import {render(str(folder / "flake.nix"))};
  stand-in = name: {{ nixosModules.${{name}} = name; }};
  out = flake.outputs {{
    self = out;
    nixpkgs.lib.nixosSystem = args: args;
    disko = stand-in "disko";
    lanzaboote = stand-in "lanzaboote";
    microvm = stand-in "host";
    qnix = stand-in "qnix";
  }};
  settings = builtins.head (builtins.filter (m: m ? services)
    (builtins.filter builtins.isAttrs out.nixosConfigurations.office-01.modules));
  module = import {render(str(ROOT / services.MODULE_FILE))} {{
    lib = {STUB_LIB};
    pkgs = {{ age = "pkg:age"; callPackage = path: args: "pkg:qnix"; }};
    config.services.qnix = settings.services.qnix // {{ package = "pkg:qnix"; }};
  }};
in module.config.systemd.services.qnix-boot.serviceConfig.ExecStart
"""
    )
    # Evaluated without a store, Nix names the path the folder would be copied to.
    assert re.fullmatch(
        r"pkg:qnix/bin/qnix boot --generation /nix/store/[0-9a-z]{32}-office", nix_eval(wrapper)
    )


def test_the_module_sets_nothing_unless_enabled(tmp_path: Path) -> None:
    assert evaluate_module(tmp_path, enable=False)["config"] == {}


NAMESPACES = ("environment", "systemd")
OPTIONS_SET = {
    "environment.systemPackages",
    "systemd.services",
    "systemd.services.<name>.after",
    "systemd.services.<name>.before",
    "systemd.services.<name>.restartIfChanged",
    "systemd.services.<name>.serviceConfig",
    "systemd.services.<name>.unitConfig",
    "systemd.services.<name>.wantedBy",
    "systemd.services.<name>.wants",
    "systemd.timers",
    "systemd.timers.<name>.timerConfig",
    "systemd.timers.<name>.unitConfig",
    "systemd.timers.<name>.wantedBy",
    "systemd.tmpfiles.rules",
}


def test_every_option_set_is_a_25_11_one_of_the_right_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference, "CHECKED", (*reference.CHECKED, *NAMESPACES))
    config = services.nixos_config()
    evaluated = evaluate_module(tmp_path, enable=True)["config"]
    tree = with_evaluated_strings(config, evaluated)
    assert isinstance(tree, dict)
    report = reference.check(tree, full_reference())
    assert report.errors == []
    assert report.options == OPTIONS_SET
    # The control: a setting NixOS has no option for is named.
    bad = {"systemd": {"services": {"qnix-boot": {"ExecStart": "qnix boot"}}}}
    errors = reference.check(bad, full_reference()).errors
    assert len(errors) == 1 and errors[0].startswith("systemd.services.qnix-boot.ExecStart: no")


def flake_outputs(tmp_path: Path) -> Any:
    """The root flake's outputs, called with a stand-in nixpkgs (no network, no channel)."""
    wrapper = tmp_path / "flake-outputs.nix"
    wrapper.write_text(
        f"""
let
  flake = import {render(str(ROOT / "flake.nix"))};
  pkgsFor = system: {{
    stdenv.hostPlatform.system = system;
    callPackage = path: args: {{ outPath = "pkg:" + baseNameOf path; }};
  }};
  systems = [ "x86_64-linux" "aarch64-linux" "riscv64-linux" ];
  nixpkgs = {{
    lib.genAttrs = names: f: builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) names);
    legacyPackages = builtins.listToAttrs (map (s: {{ name = s; value = pkgsFor s; }}) systems);
  }};
  out = flake.outputs {{ self = out; inherit nixpkgs; }};
  names = builtins.mapAttrs (_: builtins.attrNames);
in {{
  inputs = flake.inputs;
  arguments = builtins.attrNames (builtins.functionArgs flake.outputs);
  outputs = builtins.attrNames out;
  packages = names out.packages;
  apps = names out.apps;
  devShells = names out.devShells;
  nixosModules = builtins.attrNames out.nixosModules;
  app = out.apps.x86_64-linux.default;
  package = out.packages.aarch64-linux.qnix.outPath;
  module = map baseNameOf out.nixosModules.qnix.imports;
}}
"""
    )
    return nix_eval(wrapper)


def test_the_root_flake_has_its_outputs(tmp_path: Path) -> None:
    systems = ["aarch64-linux", "riscv64-linux", "x86_64-linux"]
    same(
        flake_outputs(tmp_path),
        {
            "inputs": {"nixpkgs": {"url": "github:NixOS/nixpkgs/nixos-25.11"}},
            "arguments": ["nixpkgs", "self"],
            "outputs": ["apps", "devShells", "nixosModules", "packages"],
            "packages": {s: ["default", "qnix"] for s in systems},
            "apps": {s: ["default"] for s in systems},
            "devShells": {s: ["default"] for s in systems},
            "nixosModules": ["default", "qnix"],
            "app": {"type": "app", "program": "pkg:package.nix/bin/qnix"},
            "package": "pkg:package.nix",
            "module": ["module.nix"],
        },
    )


def package_attributes(tmp_path: Path) -> Any:
    """nix/package.nix called with stand-ins that return the attributes they are given, so
    that what it asks of nixpkgs can be read (buildPythonApplication's argument)."""
    wrapper = tmp_path / "package.nix"
    wrapper.write_text(
        f"""
let
  given = attrs: attrs;
  python3Packages = {{
    buildPythonApplication = given;
    buildPythonPackage = attrs: {{ pyseccomp = attrs.pname; }};
    click = "click"; nftables = "nftables"; pydantic = "pydantic"; pyroute2 = "pyroute2";
    qrcode = "qrcode";
    rich = "rich"; setuptools = "setuptools"; wheel = "wheel";
  }};
  lib = {{
    importTOML = file: builtins.fromTOML (builtins.readFile file);
    fileset = {{ toSource = args: "source"; unions = files: files; }};
    getLib = package: package;
    makeBinPath = packages: builtins.concatStringsSep ":" (map (p: p + "/bin") packages);
    licenses.asl20 = "asl20";
    platforms.linux = [ "linux" ];
  }};
  tools = builtins.listToAttrs (map (name: {{ inherit name; value = "/pkg/" + name; }}) [
    "age" "aide" "bubblewrap" "btrfs-progs" "e2fsprogs" "git" "gnupg" "iproute2" "nebula"
    "nftables" "openssh" "pass" "procps" "util-linux"
  ]);
  package = import {render(str(ROOT / "nix" / "package.nix"))} (tools // {{
    inherit lib python3Packages;
    fetchPypi = args: args;
    libseccomp = "libseccomp";
  }});
in {{
  inherit (package) pname version pythonRemoveDeps pythonRelaxDeps makeWrapperArgs;
  dependencies = map (d: if builtins.isAttrs d then d.pyseccomp else d) package.dependencies;
  mainProgram = package.meta.mainProgram;
}}
"""
    )
    return nix_eval(wrapper)


def test_the_package_takes_every_dependency_of_pyproject_from_nixpkgs(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    package = package_attributes(tmp_path)
    assert (package["pname"], package["version"]) == ("qnix", project["version"])
    assert package["mainProgram"] == "qnix"
    # Each requirement of pyproject.toml is a nixpkgs package of its name, built here
    # (pyseccomp), or replaced: ansibleguy-nftables by nixpkgs' own nftables binding.
    required = {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0] for spec in project["dependencies"]}
    provided = set(package["dependencies"]) | set(package["pythonRemoveDeps"])
    assert required == provided - {"nftables"}
    assert package["pythonRemoveDeps"] == ["ansibleguy-nftables"]
    assert "nftables" in package["dependencies"]
    assert set(package["pythonRelaxDeps"]) <= required
    path = package["makeWrapperArgs"]
    assert path[:3] == ["--prefix", "PATH", ":"]
    tools = {"bubblewrap", "nftables", "iproute2", "age", "aide", "util-linux", "git", "nebula"}
    assert {f"/pkg/{tool}/bin" for tool in tools} <= set(path[3].split(":"))
