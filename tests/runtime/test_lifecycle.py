"""The runtime's pieces: host accounts, order, resolv.conf, the table transaction, the audit
hook, the fast `qnix run` path and its import cost; and apply / gc / down in process against a
stand-in host.

The stand-in host is tests/runtime/livehost.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from qnix.audit import events
from qnix.compile import names, nft
from qnix.compile.artifacts import RULESET, compile_spec
from qnix.compile.inputs import load
from qnix.runtime import cgroups, disposables, lifecycle, live, quickrun, reconcile, status, wanted
from qnix.runtime.paths import PathError, RuntimePaths
from qnix.spec.load import LoadedSpec
from qnix.spec.model import Workstation
from tests.runtime.livehost import LiveHost


@pytest.fixture(scope="module")
def live_host() -> Iterator[LiveHost]:
    host = LiveHost()
    try:
        yield host
    finally:
        host.close()


# ---- pure pieces -----------------------------------------------------------------------------

SMALL = """\
[host]
hostname = "lab"
subnet = "10.202.0.0/16"
dns_servers = ["192.0.2.53"]

[compartments.sys-net]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[compartments.work]
network = "sys-net"
memory_mb = 128
firewall = [
  { dns = true },
  { proto = "tcp", host = "localhost", ports = [8001] },
  { proto = "tcp", cidr = "203.0.113.0/24", ports = [8001] },
]

[compartments.vault]
memory_mb = 128

[compartments.office]
isolation = "container"
network = "uplink"
autostart = true
"""


def small(tmp_path: Path, text: str = SMALL) -> LoadedSpec:
    path = tmp_path / "small.toml"
    path.write_text(text)
    return load(path)


def test_host_accounts_are_unique_stable_and_unprivileged(tmp_path: Path) -> None:
    ws = small(tmp_path).workstation
    links = names.allocate_links(ws.compartments, ws.host.subnet)
    base = int(ipaddress.IPv4Network(ws.host.subnet).network_address)
    ids = {name: live.host_identity(ws, name) for name in ws.compartments}
    for name, identity in ids.items():
        slot = (int(ipaddress.IPv4Address(links[name].gateway)) - base) // 2
        assert identity.uid == identity.gid == 0x70000000 + slot
        assert live.host_identity(ws, name) == identity
    assert len({identity.uid for identity in ids.values()}) == len(ids)


def test_net_compartments_come_before_their_clients(tmp_path: Path) -> None:
    ws = small(tmp_path).workstation
    order = [c.name for c in live.network_order(ws)]
    assert order == ["office", "sys-net", "vault", "work"]
    assert order.index("sys-net") < order.index("work")


def test_resolv_conf_only_for_compartments_allowed_dns(tmp_path: Path) -> None:
    ws = small(tmp_path).workstation
    assert live.resolv_conf(ws, ws.compartments["work"]) == (
        "# qnix: generated from the spec\nnameserver 192.0.2.53\n"
    )
    assert live.resolv_conf(ws, ws.compartments["vault"]) == (
        "# qnix: this compartment's firewall allows no DNS\n"
    )


def test_host_names_fill_their_sets_in_the_same_transaction(
    tmp_path: Path, live_host: LiveHost
) -> None:
    loaded = small(tmp_path)
    ruleset = compile_spec(loaded).files[RULESET].decode()
    transaction, resolved = wanted.table_transaction(loaded.workstation, ruleset, live_host.net)
    chain = "c_" + names.host_ifname("work")
    assert resolved == {f"{chain}_h1_4": ["127.0.0.1"], f"{chain}_h1_6": []}
    assert transaction == ruleset + f"add element inet qnix {chain}_h1_4 {{ 127.0.0.1 }}\n"
    live_host.net.load_table(transaction)
    try:
        listing = live_host.nft("list", "set", "inet", "qnix", f"{chain}_h1_4")
        assert "elements = { 127.0.0.1 }" in listing
    finally:
        live_host.net.delete_table()


def test_audit_record_appends_one_json_line_each(tmp_path: Path) -> None:
    paths = RuntimePaths(state_root=tmp_path / "state", run_root=tmp_path / "run")
    events.record(paths, "start", compartment="work", result="ok")
    events.record(paths, "run", compartment="work", argv=["sh", "-c", 'echo "hi"\n'], result=7)
    lines = paths.audit_log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [{k: v for k, v in e.items() if k not in ("time", "prev")} for e in entries] == [
        {"seq": 1, "event": "start", "compartment": "work", "result": "ok"},
        {
            "seq": 2,
            "event": "run",
            "compartment": "work",
            "argv": ["sh", "-c", 'echo "hi"\n'],
            "result": 7,
        },
    ]
    assert all(e["time"].endswith("Z") and "T" in e["time"] for e in entries)
    assert stat.S_IMODE(paths.audit_log.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.audit_log.parent.stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="is not an audit event name"):
        events.record(paths, "Reboot!")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "work", "--", "sh", "-c", "x"], quickrun.RunRequest("work", ("sh", "-c", "x"))),
        (
            ["run", "--user", "alice", "work", "--run-root=/r", "--", "id", "--", "-u"],
            quickrun.RunRequest("work", ("id", "--", "-u"), user="alice", run_root="/r"),
        ),
        (
            ["run", "work", "--state-root", "/s", "--user=u", "--", "true"],
            quickrun.RunRequest("work", ("true",), user="u", state_root="/s"),
        ),
        (["run", "-u", "u", "work", "--", "id"], quickrun.RunRequest("work", ("id",), user="u")),
        (["run", "work", "true"], None),  # no `--`: click decides
        (["run", "work", "--"], None),
        (["run", "--", "true"], None),
        (["run", "a", "b", "--", "true"], None),
        (["run", "--help", "work", "--", "true"], None),
        (["run", "work", "--debug", "--", "true"], None),
        (["run", "work", "--user", "--", "true"], None),
        (["ls", "work", "--", "true"], None),
        (["--debug", "run", "work", "--", "true"], None),
    ],
)
def test_fast_run_parses_only_what_it_fully_understands(
    argv: list[str], expected: quickrun.RunRequest | None
) -> None:
    assert quickrun.parse_run(argv) == expected


def test_fast_run_path_imports_no_heavy_library() -> None:
    """`qnix run` loads parts of the standard library and five small qnix modules, nothing
    else: not typing, hashlib (OpenSSL), signal or struct either, which cost milliseconds."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import qnix.runtime.quickrun"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    qnix_modules = sorted(m for m in imported if m.startswith("qnix"))
    assert qnix_modules == [
        "qnix",
        "qnix.audit",
        "qnix.audit.events",
        "qnix.fastpath",
        "qnix.runtime",
        "qnix.runtime.agent",
        "qnix.runtime.paths",
        "qnix.runtime.quickrun",
    ]
    heavy = {"click", "rich", "pydantic", "pyroute2", "dataclasses", "subprocess"}
    heavy |= {"typing", "hashlib", "signal", "struct", "nftables", "ctypes", "asyncio"}
    assert {m.split(".")[0] for m in imported} & heavy == set()


def test_agent_interpreter_is_reachable_by_any_user() -> None:
    interpreter, prefix = live.agent_interpreter()
    assert os.access(interpreter, os.X_OK)
    reachable = prefix if prefix is not None else interpreter
    assert live.searchable(Path(reachable).parent)
    if prefix is None:
        assert interpreter.startswith(("/usr/", "/nix/store/"))


def test_paths_come_from_options_then_environment() -> None:
    env: Mapping[str, str] = {
        "QNIX_STATE_ROOT": "/srv/state",
        "QNIX_RUN_ROOT": "/srv/run",
        "QNIX_NETNS_PREFIX": "lab-",
        "QNIX_HOST_NETNS": "labhost",
        "QNIX_DESKTOP_ROOT": "/srv/desktop",
    }
    assert RuntimePaths.from_options(environ=env) == RuntimePaths(
        Path("/srv/state"), Path("/srv/run"), "lab-", "labhost", Path("/srv/desktop")
    )
    assert RuntimePaths.from_options("/a", None, environ=env).state_root == Path("/a")
    assert RuntimePaths.from_options(environ={}) == RuntimePaths()
    paths = RuntimePaths()
    assert paths.agent_socket("work") == Path("/run/qnix/compartments/work/agent.sock")
    assert paths.home("work") == Path("/var/lib/qnix/compartments/work/home")
    assert paths.netns("work") == "qnix-work"
    assert paths.applications_dir == Path("/usr/local/share/applications")
    assert paths.sway_config_dir == Path("/etc/sway/config.d")
    with pytest.raises(ValueError, match="not a compartment name"):
        paths.run_dir("../etc")
    with pytest.raises(ValueError, match="prefix"):
        RuntimePaths.from_options(environ={"QNIX_NETNS_PREFIX": "Bad/"})


# ---- in process, on the stand-in host --------------------------------------------------------


def test_apply_gc_and_down_in_process(tmp_path: Path, live_host: LiveHost) -> None:
    paths, net = live_host.paths, live_host.net
    loaded = small(tmp_path)
    # A new namespace inherits the real host's forwarding: start from a known value.
    net.set_sysctl(live_host.host_netns, "net.ipv4.ip_forward", "0")
    first = reconcile.apply(paths, loaded)
    try:
        assert first.changes[0].startswith("loaded nft table inet qnix")
        assert "enabled IPv4 forwarding on the host" in first.changes
        assert first.notes == ()
        assert "office: started" in first.changes  # a container compartment (autostart)
        assert reconcile.apply(paths, loaded).changes == ()
        assert live_host.compartment_netns() == {"office", "sys-net", "vault", "work"}
        home = paths.home("work")
        identity = live.host_identity(loaded.workstation, "work")
        info = home.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            identity.uid,
            identity.gid,
            0o700,
        )
        assert lifecycle.start(paths, "office") is False  # already running

        # What a crash could leave: a namespace, a link and a rule of no compartment, and a
        # cgroup of a compartment that does not run.
        net.ensure_netns("ghost")
        subprocess.run(
            [
                live_host.ip,
                "-n",
                live_host.host_netns,
                "link",
                "add",
                names.host_ifname("ghost2"),
                *("type", "veth", "peer", "name", "ghost2peer"),
            ],
            check=True,
        )
        subprocess.run(
            [
                live_host.ip,
                "-n",
                live_host.host_netns,
                "rule",
                "add",
                "iif",
                names.host_ifname("ghost3"),
                "table",
                "20100",
                "priority",
                "20000",
            ],
            check=True,
        )
        cgroups.create(paths.cgroup_name("vault"), cgroups.CgroupLimits(64 << 20, 16))
        assert sorted(reconcile.gc(paths)) == sorted(
            [
                "vault: removed its cgroup",
                "ghost: removed its network namespace " + net.netns("ghost"),
                f"removed link {names.host_ifname('ghost2')}",
                f"removed the routing rule of {names.host_ifname('ghost3')}",
            ]
        )
        assert reconcile.gc(paths) == []
        assert live_host.compartment_netns() == {"office", "sys-net", "vault", "work"}
        assert reconcile.apply(paths, loaded).changes == ()
    finally:
        changes = reconcile.down(paths)
    assert f"removed {paths.run_root}" in changes
    assert "turned IPv4 forwarding on the host off again" in changes
    assert net.sysctl(live_host.host_netns, "net.ipv4.ip_forward") == "0"
    assert live_host.leftovers()["netns"] == []
    assert paths.home("work").is_dir()  # state is kept
    assert status.statuses(paths) == []


DISPOSABLES = (
    SMALL.replace(
        "[host]",
        'default_disposable = "dvm"\n\n[host]',
    )
    + """
[disposable_templates.dvm]
network = "sys-net"
firewall = [{ proto = "tcp", cidr = "203.0.113.0/24", ports = [443] }]

[disposable_templates.offline]
"""
)


def test_a_disposable_gets_elements_only_and_a_free_link(tmp_path: Path) -> None:
    ws = small(tmp_path, DISPOSABLES).workstation
    ruleset = compile_spec(load(tmp_path / "small.toml")).files[RULESET].decode()
    chain = nft.template_chain_name("dvm")
    assert f'\tchain {chain} {{\n\t\tcomment "dvm"\n\t\tjump admitted\n' in ruleset
    assert nft.template_chain_name("offline") not in ruleset
    link = disposables.disposable_link(ws, "disp1", set())
    spec_links = names.allocate_links(ws.compartments, ws.host.subnet)
    assert link not in spec_links.values()
    ifname = names.host_ifname("disp1")
    assert nft.disposable_elements(ws, "dvm", ifname, link.address) == {
        "compartment_addrs": link.address,
        "egress": f'"{ifname}" . {link.address} : jump {chain}',
        "net_clients": f'"{names.host_ifname("sys-net")}" . {link.address}',
    }
    assert nft.disposable_elements(ws, "offline", ifname, link.address) == {}
    with pytest.raises(ValueError, match="not a qnix interface name"):
        nft.disposable_elements(ws, "dvm", 'qx" } drop', link.address)
    # Another running disposable's slot is skipped.
    taken = {names.link_slot(link.gateway, ws.host.subnet)}
    assert disposables.disposable_link(ws, "disp1", taken) != link


def test_a_live_workstation_round_trips_through_its_spec_copy(tmp_path: Path) -> None:
    loaded = small(tmp_path)
    copy = compile_spec(loaded).files["spec.json"]
    assert Workstation.model_validate_json(copy) == loaded.workstation


@pytest.mark.parametrize("root", ["/", "//"])
def test_the_file_system_root_is_no_state_or_run_root(root: str) -> None:
    for options in ((root, None), (None, root)):
        with pytest.raises(PathError, match="cannot be a state or run root"):
            RuntimePaths.from_options(*options, environ={})


def test_down_removes_only_what_qnix_put_in_the_run_root() -> None:
    """A run root named by mistake (say /tmp) keeps everything qnix did not put there."""
    host = LiveHost()
    foreign = host.paths.run_root / "someone-elses.txt"
    try:
        spec = host.spec('[host]\nhostname = "lab"\n[compartments.solo]\nnetwork = "none"\n')
        host.ok("apply", str(spec))
        host.ok("start", "solo")
        foreign.write_text("not qnix's\n")
        changes = host.ok("down")
        assert f"kept {host.paths.run_root}: it holds files qnix did not put there" in changes
        assert sorted(p.name for p in host.paths.run_root.iterdir()) == ["someone-elses.txt"]
        assert foreign.read_text() == "not qnix's\n"
    finally:
        foreign.unlink(missing_ok=True)
        host.close()
