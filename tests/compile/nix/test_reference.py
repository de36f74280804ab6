"""Every option qnix sets in the namespaces the references cover exists in NixOS 25.11 (or
microvm.nix) with a type that admits the value set. The checker itself is tested to fail on
made-up options and wrong types, so a pass means something.
"""

from __future__ import annotations

from typing import Any

import pytest

from qnix.compile.nix.printer import Call, Function, Raw
from tests.compile.nix.reference import (
    UnknownType,
    check,
    parse_type,
    reference_lines,
    split_option_name,
)
from tests.compile.nix.support import all_workstations, synthetic_workstations, trees

WORKSTATIONS = all_workstations()


@pytest.mark.parametrize("name", sorted(WORKSTATIONS))
def test_every_emitted_option_is_declared_with_a_matching_type(name: str) -> None:
    for concern, tree in trees(WORKSTATIONS[name]).items():
        report = check(tree)
        assert report.errors == [], f"{concern}: {report.errors}"


def test_the_checker_saw_every_kind_of_option_qnix_writes() -> None:
    """Not vacuous: the walk reached the options of containers, VMs and their insides."""
    seen: set[str] = set()
    for ws in synthetic_workstations().values():
        for tree in trees(ws).values():
            seen |= check(tree).options
    assert {
        "boot.kernel.sysctl",
        "boot.kernelParams",
        "boot.kernelModules",
        "boot.kexec.enable",
        "containers.<name>.autoStart",
        "containers.<name>.bindMounts.<name>.hostPath",
        "containers.<name>.bindMounts.<name>.isReadOnly",
        "containers.<name>.bindMounts.<name>.mountPoint",
        "containers.<name>.config",
        "containers.<name>.ephemeral",
        "containers.<name>.extraVeths.<name>.hostAddress",
        "containers.<name>.extraVeths.<name>.localAddress",
        "containers.<name>.privateNetwork",
        "containers.<name>.privateUsers",
        "microvm.host.enable",
        "microvm.vms.<name>.autostart",
        "microvm.vms.<name>.config",
        "microvm.hypervisor",
        "microvm.mem",
        "microvm.vcpu",
        "microvm.interfaces.*.id",
        "microvm.interfaces.*.mac",
        "microvm.interfaces.*.type",
        "microvm.shares.*.mountPoint",
        "microvm.shares.*.proto",
        "microvm.shares.*.source",
        "microvm.shares.*.tag",
        "networking.nftables.enable",
        "networking.nftables.tables.<name>.content",
        "networking.nftables.tables.<name>.family",
        "security.allowSimultaneousMultithreading",
        "security.allowUserNamespaces",
        "security.apparmor.enable",
        "security.apparmor.killUnconfinedConfinables",
        "security.audit.enable",
        "security.audit.rules",
        "security.auditd.enable",
        "services.logind.settings.Login",
    } <= seen


def test_every_reference_type_is_understood() -> None:
    unknown = []
    for name, type_text in reference_lines():
        try:
            parse_type(type_text)
        except UnknownType:
            unknown.append(name)
    # qnix writes no sysfs attributes; their value type is the one description not modelled.
    assert unknown == ["boot.kernel.sysfs"]


def test_option_names_split_at_unquoted_dots() -> None:
    assert split_option_name('boot.kernel.sysctl."net.core.rmem_max"') == [
        "boot",
        "kernel",
        "sysctl",
        "net.core.rmem_max",
    ]
    assert split_option_name("containers.<name>.allowedDevices.*.node") == [
        "containers",
        "<name>",
        "allowedDevices",
        "*",
        "node",
    ]


# ---- the checker fails when it should --------------------------------------------------------

BAD_TREES: dict[str, tuple[dict[str, Any], str]] = {
    "logind lidSwitch is gone in 25.11": (
        {"services": {"logind": {"lidSwitch": "suspend"}}},
        "services.logind.lidSwitch: no such option",
    ),
    "logind extraConfig is gone in 25.11": (
        {"services": {"logind": {"extraConfig": "HandleLidSwitch=ignore"}}},
        "services.logind.extraConfig: no such option",
    ),
    "containers localMacAddress is not in 25.11": (
        {"containers": {"work": {"localMacAddress": "02:00:00:00:00:01"}}},
        "containers.work.localMacAddress: no such option",
    ),
    "a made-up bind mount option": (
        {"containers": {"w": {"bindMounts": {"/a": {"hostPath": "/b", "readWrite": True}}}}},
        'containers.w.bindMounts."/a".readWrite: no such option',
    ),
    "services.auditd does not exist": (
        {"security": {"auditd": {"enable": True}}, "services": {"logind": {"auditd": 1}}},
        "services.logind.auditd: no such option",
    ),
    "a made-up microvm option inside a VM's config": (
        {"microvm": {"vms": {"v": {"config": Function(("pkgs",), {"microvm": {"ram": 512}})}}}},
        "microvm.vms.v.config/microvm.ram: no such option",
    ),
    "autostart is spelled autoStart for containers": (
        {"containers": {"w": {"autostart": True}}},
        "containers.w.autostart: no such option",
    ),
    "a bool where a list belongs": (
        {"boot": {"kernelParams": True}},
        "boot.kernelParams: bool True is not a list of string",
    ),
    "a kernel parameter with a bare space": (
        {"boot": {"kernelParams": ["a b"]}},
        "boot.kernelParams.0: str 'a b' is not a kernel param",
    ),
    "a string where a bool belongs": (
        {"containers": {"w": {"ephemeral": "yes"}}},
        "containers.w.ephemeral: str 'yes' is not a boolean",
    ),
    "an int where a bool belongs": (
        {"security": {"allowUserNamespaces": 1}},
        "security.allowUserNamespaces: int 1 is not a boolean",
    ),
    "a value outside an enum": (
        {"networking": {"nftables": {"tables": {"qnix": {"family": "inet6"}}}}},
        "networking.nftables.tables.qnix.family: str 'inet6' is not a one of",
    ),
    "audit enable is a bool or lock": (
        {"security": {"audit": {"enable": "on"}}},
        "security.audit.enable: str 'on' is not a one of",
    ),
    "privateUsers is a number or a word": (
        {"containers": {"w": {"privateUsers": "any"}}},
        "containers.w.privateUsers: str 'any' is not a",
    ),
    "memory is a positive number": (
        {"microvm": {"mem": 0}},
        "microvm.mem: int 0 is not a positive",
    ),
    "a string where a number belongs": (
        {"microvm": {"vcpu": "2"}},
        "microvm.vcpu: str '2' is not a positive",
    ),
    "interfaces are a list": (
        {"microvm": {"interfaces": {"id": "qx1"}}},
        "microvm.interfaces: dict",
    ),
    "a made-up field of a list item": (
        {"microvm": {"interfaces": [{"type": "tap", "name": "qx1"}]}},
        "microvm.interfaces.0.name: no such option",
    ),
    "an unknown tap type": (
        {"microvm": {"interfaces": [{"type": "veth"}]}},
        "microvm.interfaces.0.type: str 'veth' is not a one of",
    ),
    "shares need an absolute mount point": (
        {"microvm": {"shares": [{"mountPoint": "home"}]}},
        "microvm.shares.0.mountPoint: str 'home' is not a absolute path",
    ),
    "a value where a set of options belongs": (
        {"networking": {"nftables": "table inet x {}"}},
        "networking.nftables: a set of options, given a value",
    ),
    "code where a bool belongs": (
        {"microvm": {"host": {"enable": Raw("pkgs.firefox")}}},
        "microvm.host.enable: code `pkgs.firefox` is not a boolean",
    ),
    "mkForce of a wrong type": (
        {"microvm": {"host": {"enable": Call(Raw("lib.mkForce"), "yes")}}},
        "microvm.host.enable: str 'yes' is not a boolean",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_the_checker_rejects(case: str) -> None:
    tree, message = BAD_TREES[case]
    errors = check(tree).errors
    assert errors, case
    assert any(message in error for error in errors), errors


def test_the_checker_rejects_a_bad_option_planted_in_a_real_module() -> None:
    ws = WORKSTATIONS["smb-office.toml"]
    tree = trees(ws)["compartments"]
    containers = dict(tree["containers"])  # type: ignore[call-overload]
    containers["banking"] = {**containers["banking"], "localMacAddress": "02:00:00:00:00:01"}
    errors = check({**tree, "containers": containers}).errors
    assert errors == ["containers.banking.localMacAddress: no such option in the reference"]


def test_options_outside_the_checked_namespaces_are_left_alone() -> None:
    tree = {"environment": {"systemPackages": [Raw("pkgs.firefox")]}, "time": {"timeZone": "UTC"}}
    report = check(tree)
    assert report.errors == []
    assert report.options == set()


def test_a_mkforce_is_looked_through() -> None:
    report = check({"security": {"allowUserNamespaces": Call(Raw("lib.mkForce"), True)}})
    assert report.errors == []
    assert report.options == {"security.allowUserNamespaces"}
