"""The NixOS audit module: auditd with qnix's rules, an osquery pack about the compartments, and
AIDE with /etc/aide.conf from the spec and a daily check unit.

Every option it sets exists in NixOS 25.11 with a type that admits the value (the references in
tests/data, with negative controls), none of them read-only; the module parses and evaluates
(stand-in arguments) to exactly the tree it came from, for every example and synthetic
workstation and for hostile aide_paths, in one nix-instantiate call; the aide.conf that comes out
of Nix passes `aide --config-check`; the osquery queries run against the schemas of the osquery
tables they name.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from qnix.compile import names
from qnix.compile.nix.modules import (
    AUDITED_PROGRAMS,
    AUDITED_WRAPPERS,
    audit_module,
    audit_rules,
    compartment_uid_ranges,
    osquery_pack,
)
from qnix.compile.nix.printer import NixValue, Raw, render
from qnix.compile.rsyslog import AUDIT_LOG, receiver_config, rsyslog_config
from qnix.spec.model import Workstation
from tests.compile.nix import reference
from tests.compile.nix.support import (
    MIXED_COMPARTMENTS,
    all_workstations,
    expected_json,
    module_evaluation,
    nix_eval,
    nix_files,
    nix_parse,
    same,
    workstation,
    write_files,
)
from tests.conftest import DATA, need

AUDIT_OPTIONS = DATA / "nixos-25.11-audit-options.tsv"
OSQUERY_TABLES = DATA / "osquery-tables.tsv"
PACKAGES = sorted({"aide", *(package for package, _ in AUDITED_PROGRAMS)})
STUBS = render(
    {
        "config": {},
        "lib": {"mkForce": Raw("x: x")},
        "pkgs": {name: {"outPath": f"pkg:{name}"} for name in PACKAGES},
    }
)
HOSTILE_AIDE_PATHS = ["/srv/@@{HOSTNAME}=[x]*", "/opt/a.b/ü", "/var/#!%|^(", "/"]


def workstations() -> dict[str, Workstation]:
    cases = all_workstations()
    cases["hostile-aide-paths"] = workstation(
        {"hardening": "paranoid", "system": "aarch64-linux"},
        MIXED_COMPARTMENTS,
        audit={"aide_paths": HOSTILE_AIDE_PATHS},
    )
    cases["log-server"] = workstation(
        None,
        None,
        audit={
            "receive": {"peers": ["*.example.com"], "port": 2514},
            "remote_syslog": {
                "hosts": ["logs-a.example.com", "logs-b.example.com"],
                "protocol": "relp",
            },
        },
    )
    return cases


WORKSTATIONS = workstations()


# ---- evaluation ------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{pkgs\.([A-Za-z0-9_-]+)\}")


def expected(value: NixValue) -> Any:
    """What the module evaluates to with the stand-ins: a string literal qnix writes with
    `${pkgs.x}` in it holds `pkg:x` there; everything else as the shared stand-ins say."""
    if isinstance(value, Raw) and value.code.startswith('"') and value.code.endswith('"'):
        inner = value.code[1:-1]
        assert "\\" not in inner and '"' not in inner, value.code  # nothing to unescape
        return _INTERPOLATION.sub(lambda m: f"pkg:{m.group(1)}", inner)
    if isinstance(value, Mapping):
        return {key: expected(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [expected(item) for item in value]
    return expected_json(value)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every workstation's audit.nix, parsed and evaluated in one call each."""
    root = tmp_path_factory.mktemp("audit")
    modules: dict[str, Path] = {}
    for name, ws in WORKSTATIONS.items():
        write_files(root / name, {"audit.nix": nix_files(ws)["modules/audit.nix"]})
        modules[name] = root / name / "audit.nix"
    nix_parse(modules.values())
    wrapper = root / "evaluate.nix"
    wrapper.write_text(module_evaluation(STUBS, modules))
    result = nix_eval(wrapper)
    assert isinstance(result, dict)
    return result


def test_the_module_evaluates_to_its_tree(evaluated: dict[str, Any]) -> None:
    same(evaluated, {name: expected(audit_module(ws)) for name, ws in WORKSTATIONS.items()})


def test_the_aide_conf_out_of_nix_passes_aides_check(
    evaluated: dict[str, Any], tmp_path: Path
) -> None:
    aide = need("aide")
    for name in WORKSTATIONS:
        etc = evaluated[name]["environment"]["etc"]["aide.conf"]
        assert etc["mode"] == "0600"
        config = tmp_path / f"{name}.conf"
        config.write_text(etc["text"])
        result = subprocess.run(
            [aide, "--config-check", f"--config={config}"], capture_output=True, text=True
        )
        assert (result.returncode, result.stderr) == (0, ""), name
    hostile = evaluated["hostile-aide-paths"]["environment"]["etc"]["aide.conf"]["text"]
    assert hostile.endswith(
        "/srv/[\\x{40}][\\x{40}][\\x{7b}]HOSTNAME[\\x{7d}][\\x{3d}][\\x{5b}]x[\\x{5d}][\\x{2a}]"
        "(/|\\z) QnixStatic\n"
        "/opt/a[\\x{2e}]b/[\\x{c3}][\\x{bc}](/|\\z) QnixStatic\n"
        "/var/[\\x{23}][\\x{21}][\\x{25}][\\x{7c}][\\x{5e}][\\x{28}](/|\\z) QnixStatic\n"
        "/ QnixStatic\n"
    )


# ---- the option reference --------------------------------------------------------------------


def audit_reference_lines() -> list[tuple[str, str, bool]]:
    """(name, type, read-only) of tests/data/nixos-25.11-audit-options.tsv."""
    lines = []
    for line in AUDIT_OPTIONS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, type_text, read_only = line.split("\t")
        lines.append((name, type_text, read_only == "true"))
    return lines


def full_reference() -> reference.Node:
    root = reference.Node()
    audit_lines = [(name, type_text) for name, type_text, _ in audit_reference_lines()]
    for name, type_text in [*reference.reference_lines(), *audit_lines]:
        node = root
        for part in reference.split_option_name(name):
            node = node.children.setdefault(part, reference.Node())
        node.type = type_text
    return root


def with_evaluated_strings(tree: NixValue, evaluated: Any) -> NixValue:
    """The tree with each string qnix writes as Nix code replaced by what it evaluated to, so
    that its type can be checked as the string it is."""
    if isinstance(tree, Raw) and tree.code.startswith('"'):
        assert isinstance(evaluated, str)
        return evaluated
    if isinstance(tree, Mapping):
        return {key: with_evaluated_strings(value, evaluated[key]) for key, value in tree.items()}
    if isinstance(tree, list):
        return [with_evaluated_strings(v, e) for v, e in zip(tree, evaluated, strict=True)]
    return tree


NAMESPACES = ("environment", "security", "services.osquery", "services.rsyslogd", "systemd")
OPTIONS_SET = {
    "environment.etc",
    "environment.etc.<name>.mode",
    "environment.etc.<name>.text",
    "environment.systemPackages",
    "security.audit.enable",
    "security.audit.rules",
    "security.auditd.enable",
    "services.osquery.enable",
    "services.osquery.flags",
    "services.osquery.settings",
    "services.rsyslogd.enable",
    "services.rsyslogd.extraConfig",
    "systemd.services",
    "systemd.services.<name>.documentation",
    "systemd.services.<name>.path",
    "systemd.services.<name>.script",
    "systemd.services.<name>.serviceConfig",
    "systemd.tmpfiles.rules",
    "systemd.timers",
    "systemd.timers.<name>.documentation",
    "systemd.timers.<name>.timerConfig",
    "systemd.timers.<name>.wantedBy",
}


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> reference.Node:
    """The reference with the audit namespaces, every path under them checked."""
    monkeypatch.setattr(reference, "CHECKED", (*reference.CHECKED, *NAMESPACES))
    return full_reference()


def test_every_option_is_a_25_11_one_of_the_right_type(
    evaluated: dict[str, Any], strict: reference.Node
) -> None:
    seen: set[str] = set()
    for name, ws in WORKSTATIONS.items():
        tree = with_evaluated_strings(audit_module(ws), evaluated[name])
        assert isinstance(tree, Mapping)
        report = reference.check(tree, strict)
        assert report.errors == [], (name, report.errors)
        seen |= report.options
    assert seen == OPTIONS_SET
    read_only = {name for name, _, is_read_only in audit_reference_lines() if is_read_only}
    assert read_only and not seen & read_only


BAD_TREES = {
    "osquery has no package option in 25.11": (
        {"services": {"osquery": {"package": Raw("pkgs.osquery")}}},
        "services.osquery.package: no such option in the reference",
    ),
    "rsyslogd has no package option in 25.11": (
        {"services": {"rsyslogd": {"package": Raw("pkgs.rsyslog")}}},
        "services.rsyslogd.package: no such option in the reference",
    ),
    "auditd takes no rules": (
        {"security": {"auditd": {"rules": ["-w /etc"]}}},
        "security.auditd.rules: no such option in the reference",
    ),
    "a timer setting belongs in timerConfig": (
        {"systemd": {"timers": {"t": {"OnCalendar": "daily"}}}},
        "systemd.timers.t.OnCalendar: no such option in the reference",
    ),
    "osquery flags are strings": (
        {"services": {"osquery": {"flags": {"disable_audit": True}}}},
        "services.osquery.flags.disable_audit: bool True is not a string",
    ),
    "a unit a timer is wanted by is a unit name": (
        {"systemd": {"timers": {"t": {"wantedBy": ["timers"]}}}},
        "systemd.timers.t.wantedBy.0: str 'timers' is not a string matching the pattern",
    ),
    "audit enable is a bool or lock": (
        {"security": {"audit": {"enable": "yes"}}},
        "security.audit.enable: str 'yes' is not a one of",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_the_checker_rejects(case: str, strict: reference.Node) -> None:
    tree, message = BAD_TREES[case]
    errors = reference.check(tree, strict).errors
    assert len(errors) == 1 and errors[0].startswith(message), errors


# ---- what the module says --------------------------------------------------------------------


def test_audit_rules_name_every_privileged_program() -> None:
    ws = workstation({"system": "x86_64-linux"})
    rules = audit_rules(ws)
    store = [
        f"-a always,exit -F path=${{pkgs.{package}}}/bin/{program} -F perm=x -k qnix-privileged"
        for package, program in AUDITED_PROGRAMS
    ]
    assert rules == [
        "-w /etc -p wa -k qnix-etc",
        "-w /var/lib/qnix -p wa -k qnix-state",
        "-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k qnix-modules",
        "-a always,exit -F arch=b32 -S init_module,finit_module,delete_module -k qnix-modules",
        "-a always,exit -F path=/run/wrappers/bin/sudo -F perm=x -k qnix-privileged",
        "-a always,exit -F path=/run/wrappers/bin/su -F perm=x -k qnix-privileged",
        "-a always,exit -F path=/run/wrappers/bin/mount -F perm=x -k qnix-privileged",
        "-a always,exit -F path=/run/wrappers/bin/umount -F perm=x -k qnix-privileged",
        *(Raw(f'"{rule}"') for rule in store),
        "-a always,exit -F arch=b64 -S execve,execveat -F euid=0 -F auid>=1000"
        " -F auid!=unset -k qnix-root-exec",
        "-a always,exit -F arch=b32 -S execve,execveat -F euid=0 -F auid>=1000"
        " -F auid!=unset -k qnix-root-exec",
    ]
    programs = {program for _, program in AUDITED_PROGRAMS} | set(AUDITED_WRAPPERS)
    assert {"sudo", "su", "mount", "nft", "ip", "bwrap", "systemd-nspawn"} <= programs
    # Other systems have no second system call table to watch.
    arm = audit_rules(workstation({"system": "aarch64-linux"}))
    assert not any("arch=b32" in rule for rule in arm if isinstance(rule, str))


@pytest.mark.parametrize(("hardening", "enable"), [("strict", True), ("paranoid", "lock")])
def test_paranoid_locks_the_rules(hardening: str, enable: object) -> None:
    module = audit_module(workstation({"hardening": hardening}))
    security = module["security"]
    assert isinstance(security, Mapping)
    assert security["audit"]["enable"] == enable
    assert security["auditd"] == {"enable": True}


def test_the_aide_check_runs_daily_and_fails_on_differences() -> None:
    systemd = audit_module(workstation())["systemd"]
    assert systemd == {
        "services": {
            "qnix-aide-check": {
                "documentation": ["man:aide(1)", "man:aide.conf(5)"],
                "path": [Raw("pkgs.aide")],
                "script": "aide --config=/etc/aide.conf --check",
                "serviceConfig": {
                    "IOSchedulingClass": "idle",
                    "Nice": 19,
                    "StateDirectory": "aide",
                    "StateDirectoryMode": "0700",
                    "Type": "oneshot",
                },
            }
        },
        "timers": {
            "qnix-aide-check": {
                "documentation": ["man:aide(1)"],
                "timerConfig": {
                    "OnCalendar": "daily",
                    "Persistent": True,
                    "RandomizedDelaySec": "1h",
                },
                "wantedBy": ["timers.target"],
            }
        },
    }


def test_the_audit_log_goes_to_the_remote_syslog_only_when_the_spec_names_one() -> None:
    remote = {"remote_syslog": {"host": "logs.example.com", "port": 6514, "protocol": "tcp"}}
    forwarding = workstation(None, None, audit=remote)
    services = audit_module(forwarding)["services"]
    assert isinstance(services, Mapping)
    assert services["rsyslogd"] == {
        "enable": True,
        "extraConfig": rsyslog_config(forwarding, AUDIT_LOG),
    }
    assert AUDIT_LOG == "/var/lib/qnix/audit/events.jsonl"
    assert "logs.example.com" in services["rsyslogd"]["extraConfig"]
    silent = audit_module(workstation())["services"]
    assert isinstance(silent, Mapping) and sorted(silent) == ["osquery"]


def test_a_log_server_receives_over_relp_into_one_folder_it_makes_at_boot() -> None:
    server = WORKSTATIONS["log-server"]
    assert server.audit.receive is not None
    module = audit_module(server)
    assert module["services"]["rsyslogd"] == {  # type: ignore[index]
        "enable": True,
        "extraConfig": rsyslog_config(server, AUDIT_LOG)
        + "\n"
        + receiver_config(server.audit.receive, "/var/log/qnix-remote"),
    }
    assert module["systemd"]["tmpfiles"] == {  # type: ignore[index]
        "rules": ["d /var/log/qnix-remote 0700 root root -"]
    }
    assert module["networking"] == {"firewall": {"allowedTCPPorts": [2514]}}
    assert "networking" not in audit_module(workstation())


def test_the_uid_ranges_hold_every_compartment_and_each_container() -> None:
    ws = workstation(None, MIXED_COMPARTMENTS)
    ranges = compartment_uid_ranges(ws)
    low, high = ranges[0]
    assert (low, high) == (names.HOST_ID_BASE + 1, names.HOST_ID_BASE + 32767)  # a /16
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    for link in links.values():
        assert low <= names.host_id(link, ws.host.subnet) <= high
    containers = names.allocate_container_ranges(
        c.name for c in ws.compartments.values() if c.isolation == "container"
    )
    assert len(containers) >= 2
    assert ranges[1:] == sorted((first, first + 0xFFFF) for first in containers.values())
    small = workstation({"subnet": "10.9.0.0/22"})
    assert compartment_uid_ranges(small) == [(names.HOST_ID_BASE + 1, names.HOST_ID_BASE + 511)]


# ---- the osquery pack ------------------------------------------------------------------------


def osquery_schema() -> sqlite3.Connection:
    """An empty database with the columns of the osquery tables, as their specs list them."""
    tables: dict[str, list[str]] = {}
    for line in OSQUERY_TABLES.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        table, column, type_name = line.split("\t")
        tables.setdefault(table, []).append(f'"{column}" {type_name}')
    connection = sqlite3.connect(":memory:")
    for table, columns in tables.items():
        connection.execute(f'CREATE TABLE "{table}" ({", ".join(columns)})')
    return connection


def test_every_query_runs_against_the_osquery_tables() -> None:
    connection = osquery_schema()
    pack = osquery_pack(workstation(None, MIXED_COMPARTMENTS))
    assert pack["platform"] == "linux"
    queries = pack["queries"]
    assert isinstance(queries, Mapping)
    assert sorted(queries) == [
        "qnix_compartment_listening_ports",
        "qnix_compartment_processes",
        "qnix_iptables_rules",
        "qnix_kernel_modules",
        "qnix_nft_ruleset_file",
    ]
    for name, query in queries.items():
        assert isinstance(query, Mapping)
        assert query["interval"] in (300, 600)
        assert connection.execute(query["query"]).fetchall() == [], name
    # Not vacuous: a column or a table osquery does not have is an error.
    for wrong in ("SELECT nft FROM iptables;", "SELECT name FROM nftables;"):
        with pytest.raises(sqlite3.OperationalError):
            connection.execute(wrong)


def test_the_queries_watch_the_compartment_uids_only() -> None:
    ws = workstation(None, MIXED_COMPARTMENTS)
    (low, high), (container_low, container_high), *_ = compartment_uid_ranges(ws)
    queries = osquery_pack(ws)["queries"]
    assert isinstance(queries, Mapping)
    connection = osquery_schema()
    connection.executemany(
        "INSERT INTO processes (pid, uid, name) VALUES (?, ?, ?)",
        [
            (1, 0, "init"),
            (2, low, "first"),
            (3, high, "last"),
            (4, high + 1, "after"),
            (5, container_low - 1, "before a container"),
            (6, container_low, "a container's root"),
            (7, container_high, "a container's last"),
            (8, 1000, "a user of the host"),
        ],
    )
    rows = connection.execute(queries["qnix_compartment_processes"]["query"]).fetchall()
    assert sorted(row[0] for row in rows) == [2, 3, 6, 7]
