"""Two qnix instances on one host network namespace (qnix.runtime.hostowner).

The second instance has state and run roots and a namespace prefix of its own but shares the
first's stand-in host namespace, and with it the `inet qnix` table, the `qx*` links, the routing
rules and tables and the host's forwarding. Every command of the second that would change them
is refused while the first owns the table; the first keeps all of it and nothing drifts.
Controls: the first instance by another name of its own run root goes on; the second is
welcome once the first is down; and without the ownership check the second's `down` removes
the first's table, links and rules.

The stand-in host is tests/runtime/livehost.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.compile import names
from qnix.errors import QnixError
from qnix.runtime import hostowner, reconcile
from qnix.runtime.net import HostNetwork
from qnix.runtime.paths import RuntimePaths
from tests.runtime.livehost import QNIX, LiveHost

# A net compartment and its client (routing rules and a routing table into it), and a
# compartment without network.
SPEC = """\
[host]
hostname = "lab"
subnet = "10.209.0.0/16"

[compartments.gate]
network = "uplink"
provides_network = true
memory_mb = 128
firewall = [{ cidr = "0.0.0.0/0" }]

[compartments.client]
network = "gate"
memory_mb = 128
firewall = [{ proto = "tcp", cidr = "192.0.2.0/24", ports = [443] }]

[compartments.offline]
memory_mb = 64
"""

# The second instance's own spec: other names, so other links, on another subnet.
SECOND_SPEC = """\
[host]
hostname = "lab2"
subnet = "10.210.0.0/16"

[compartments.other]
network = "uplink"
memory_mb = 128
"""


@pytest.fixture
def first() -> Iterator[LiveHost]:
    """The first instance, its spec applied (forwarding off before, so that its turning on
    is the first instance's)."""
    host = LiveHost()
    try:
        host.net.set_sysctl(host.host_netns, "net.ipv4.ip_forward", "0")
        host.ok("apply", str(host.spec(SPEC)))
        yield host
    finally:
        host.close()


def second_paths(first: LiveHost) -> RuntimePaths:
    """Another instance on the first's host namespace; its namespaces are still found (and
    removed) by the first's LiveHost, whose tag starts their prefix."""
    return RuntimePaths(
        state_root=first.base / "second-state",
        run_root=first.base / "second-run",
        netns_prefix=f"{first.tag}b-",
        host_netns=first.host_netns,
    ).checked()


def second_qnix(first: LiveHost, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`qnix COMMAND --state-root ... --run-root ... ARGS` as the second instance."""
    paths = second_paths(first)
    roots = ("--state-root", str(paths.state_root), "--run-root", str(paths.run_root))
    return subprocess.run(
        [QNIX, command, *roots, *args],
        capture_output=True,
        text=True,
        env={**first.env, "QNIX_NETNS_PREFIX": paths.netns_prefix},
        timeout=60,
        check=False,
    )


def host_network(host: LiveHost) -> dict[str, Any]:
    """Everything on the stand-in host that instances share names for."""

    def ip_json(*args: str) -> Any:
        return json.loads(host.net.ip(host.host_netns, "-j", *args) or "[]")

    return {
        "table": host.net.table_listing(),
        "rules": ip_json("-4", "rule", "show"),
        "routes": ip_json("-4", "route", "show", "table", "all"),
        "addresses": sorted(
            (entry["ifname"], info["local"], info["prefixlen"], "UP" in entry["flags"])
            for entry in ip_json("-4", "addr", "show")
            for info in entry.get("addr_info", [])
        ),
        "links": host.net.list_links(),
        "netns": sorted(host.netns_names()),
        "forwarding": host.net.sysctl(host.host_netns, "net.ipv4.ip_forward"),
    }


def no_drift(host: LiveHost) -> bool:
    result = host.qnix("drift", "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0 and json.loads(result.stdout) == []


def refusal(first: LiveHost) -> str:
    """What the second instance is told: who owns the host's network, and what to do."""
    root, prefix = first.paths.run_root, first.prefix
    return (
        "error: the host's network belongs to another qnix instance, the one with run root "
        f"{root}: this one (run root {second_paths(first).run_root}) would replace its "
        "firewall and remove its links and routing rules\n"
        "  hint: one host has one qnix instance: bring that one down first "
        f"(`QNIX_NETNS_PREFIX={prefix} qnix down --run-root {root}`), or use its run root\n"
    )


# ---- the mark ---------------------------------------------------------------------------------


def test_the_mark_names_the_run_root_and_a_prefix_other_than_the_default() -> None:
    assert hostowner.owner_mark(RuntimePaths()) == "qnix run root /run/qnix"
    lab = RuntimePaths(run_root=Path("/srv/qnix/run"), netns_prefix="lab-")
    assert hostowner.owner_mark(lab) == "qnix run root /srv/qnix/run netns prefix lab-"
    # What nft cannot quote, or too long for its 128 characters, goes by its digest.
    for odd in (Path("/srv/my run"), Path("/srv/" + "r" * 120), Path('/srv/"quoted"')):
        mark = hostowner.owner_mark(RuntimePaths(run_root=odd, netns_prefix="lab-"))
        assert mark.startswith("qnix run root sha256:")
        assert mark.endswith(" netns prefix lab-")
        assert len(mark) <= hostowner.MAX_COMMENT
        assert hostowner.marked_by(RuntimePaths(run_root=odd), mark)


def test_the_mark_is_this_instances_by_any_name_of_its_run_root(tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    run_root.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(run_root)
    paths = RuntimePaths(run_root=run_root)
    assert hostowner.marked_by(paths, f"qnix run root {run_root}")
    assert hostowner.marked_by(paths, f"qnix run root {alias} netns prefix lab-")
    assert not hostowner.marked_by(paths, f"qnix run root {tmp_path / 'other'}")
    assert not hostowner.marked_by(paths, None)
    assert not hostowner.marked_by(paths, "a table someone else commented")


class CommentOnly(HostNetwork):
    """A host whose table carries `comment`, for the refusal's wording alone."""

    def __init__(self, comment: str | None) -> None:
        super().__init__()
        self.comment = comment

    def table_comment(self) -> str | None:
        return self.comment


def test_the_refusal_names_the_owner_or_its_digest() -> None:
    second = RuntimePaths(run_root=Path("/srv/second"))
    for comment in (None, "no mark", "qnix run root /srv/second netns prefix lab-"):
        hostowner.require_host_network(second, CommentOnly(comment))
    with pytest.raises(QnixError) as by_name:
        hostowner.require_host_network(second, CommentOnly("qnix run root /run/qnix"))
    assert "the one with run root /run/qnix" in by_name.value.message
    assert "(`qnix down --run-root /run/qnix`)" in by_name.value.hint
    digest = "ab" * 32
    with pytest.raises(QnixError) as by_digest:
        hostowner.require_host_network(second, CommentOnly(f"qnix run root sha256:{digest}"))
    assert f"the one whose run root has the SHA-256 digest {digest}" in by_digest.value.message
    assert "`qnix down --run-root RUN_ROOT` with that instance's run root" in by_digest.value.hint


# ---- two instances on one stand-in host --------------------------------------------------------


def test_a_second_instance_is_refused_and_the_first_keeps_everything(first: LiveHost) -> None:
    before = host_network(first)
    assert before["table"] is not None
    assert before["rules"] and before["links"] and before["forwarding"] == "1"
    assert (
        first.net.table_comment()
        == f"qnix run root {first.paths.run_root} netns prefix {first.prefix}"
    )
    refused = second_qnix(first, "apply", str(first.paths.run_root.parent / "spec.toml"))
    assert (refused.returncode, refused.stdout, refused.stderr) == (1, "", refusal(first))
    for command in ("down", "gc"):
        result = second_qnix(first, command)
        assert (result.returncode, result.stderr) == (1, refusal(first)), command
    # Nothing of the second instance was made, and nothing of the first's was touched.
    second = second_paths(first)
    assert not second.state_root.exists()
    assert not second.run_root.exists()
    assert host_network(first) == before
    assert no_drift(first)
    assert first.ok("apply", str(first.paths.run_root.parent / "spec.toml")) == "no changes\n"
    assert first.ok("gc") == "nothing to remove\n"


def test_a_second_instance_whose_table_was_taken_cannot_start(first: LiveHost) -> None:
    """The second instance applied first; its table went (deleted by hand) and the first
    applied and took the host: the second may neither start nor remove anything."""
    second = second_paths(first)
    first.ok("down")
    spec = first.spec(SECOND_SPEC, "second.toml")
    applied = second_qnix(first, "apply", str(spec))
    assert applied.returncode == 0, applied.stderr
    first.nft("delete", "table", "inet", "qnix")
    first.ok("apply", str(first.paths.run_root.parent / "spec.toml"))
    before = host_network(first)
    for command, args in (("start", ("other",)), ("down", ()), ("gc", ())):
        result = second_qnix(first, command, *args)
        assert (result.returncode, result.stderr) == (1, refusal(first)), command
    assert host_network(first) == before
    # The second's link is still there, among the first's: names are shared on one host.
    result = first.qnix("drift", "--json")
    other = names.host_ifname("other")
    assert json.loads(result.stdout) == [
        {"kind": "link", "subject": other, "expected": None, "actual": "present"}
    ]
    # Once the first is down the second can go, and takes what it left.
    first.ok("down")
    result = second_qnix(first, "down")
    assert result.returncode == 0, result.stderr
    assert not second.run_root.exists()
    assert host_network(first)["links"] == []


def test_the_same_instance_by_another_name_and_a_second_after_the_first_is_down(
    first: LiveHost,
) -> None:
    spec = str(first.paths.run_root.parent / "spec.toml")
    alias = first.base / "run-alias"
    alias.symlink_to(first.paths.run_root)
    again = first.qnix("apply", "--run-root", str(alias), spec)
    assert (again.returncode, again.stdout) == (0, "no changes\n"), again.stderr
    # The first's `down` takes its mark with its table: the second is welcome.
    first.ok("down")
    assert first.net.table_comment() is None
    applied = second_qnix(first, "apply", spec)
    assert applied.returncode == 0, applied.stderr
    second = second_paths(first)
    assert first.net.table_comment() == (
        f"qnix run root {second.run_root} netns prefix {second.netns_prefix}"
    )
    drift = second_qnix(first, "drift")
    assert drift.returncode == 0, drift.stdout
    down = second_qnix(first, "down")
    assert down.returncode == 0, down.stderr
    assert first.net.table_listing() is None
    assert first.net.list_links() == []


def test_an_unmarked_table_is_marked_by_the_next_apply(first: LiveHost) -> None:
    """A table loaded without the mark (by hand, or by NixOS from the generated flake)
    belongs to no instance until an apply marks it."""
    first.net.load_table(first.paths.nft_transaction_file.read_text())
    assert first.net.table_comment() is None
    changes = first.ok("apply", str(first.paths.run_root.parent / "spec.toml"))
    assert changes.startswith("loaded nft table inet qnix")
    assert first.net.table_comment() == hostowner.owner_mark(first.paths)


def test_without_the_ownership_check_the_second_down_removes_the_firsts_network(
    first: LiveHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same `down` of the second instance, in process, with and without the
    one check."""
    second = second_paths(first)
    before = host_network(first)
    with pytest.raises(QnixError, match="belongs to another qnix instance"):
        reconcile.down(second)
    assert host_network(first) == before
    monkeypatch.setattr(hostowner, "require_host_network", lambda paths, net: None)
    changes = reconcile.down(second)
    assert "removed nft table inet qnix" in changes
    after = host_network(first)
    assert after["table"] is None
    assert after["links"] == []
    assert not any(str(rule.get("iif", "")).startswith("qx") for rule in after["rules"])
    assert not no_drift(first)
