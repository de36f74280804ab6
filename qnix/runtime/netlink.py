"""Network namespaces, links, addresses, routes and rules through routing netlink, in-process.

pyroute2 sends the requests; this module names each one for `qnix --debug` (one line: what,
where), turns the kernel's refusal into a QnixError naming the step, and enters namespaces.

A netlink socket belongs to the namespace it was made in, for its whole life, so `Rtnl` makes
pyroute2's IPRoute while this thread is inside the namespace (`entered`) and closes it after
one job: an open socket would keep a removed namespace, and the veth in it, alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import importlib.util
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qnix.errors import QnixError

log = logging.getLogger("qnix.net")

MAIN_TABLE = 254
CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
HINT = "the kernel refused it; `qnix --debug` shows each step before it"


@dataclass(frozen=True, slots=True)
class Pyroute2:
    """The parts of pyroute2 qnix uses."""

    IPRoute: Any  # pyroute2.iproute.linux.IPRoute
    netns: Any  # pyroute2.netns: create, remove, setns
    NetlinkError: type[Exception]
    # The C library for pyroute2.netns, handed to each call: left to find it, pyroute2 runs
    # `ldconfig -p` in each process (and in each child it forks to make a namespace).
    libc: ctypes.CDLL


_loaded: Pyroute2 | None = None
_loading = threading.Lock()


def pyroute2() -> Pyroute2:
    """pyroute2's IPRoute, netns and exceptions modules, imported on first use (never on
    `qnix run`'s path).

    Not through the package: its __init__ imports every part of pyroute2 (IPDB, NDB,
    conntrack, WireGuard, nl80211...), which more than doubles the import. The package is
    registered without running it while the modules load, then forgotten, so that a later
    plain `import pyroute2` still runs it."""
    global _loaded
    with _loading:
        if _loaded is None:
            _loaded = _import_pyroute2()
            # Its own debug lines (every message's attributes) drown qnix's in `--debug`.
            for chatty in ("pyroute2", "asyncio"):
                logging.getLogger(chatty).setLevel(logging.WARNING)
        return _loaded


def _import_pyroute2() -> Pyroute2:
    spec = importlib.util.find_spec("pyroute2")
    if spec is None:
        raise QnixError(
            "pyroute2 is not installed", hint="reinstall qnix (pip install -e .): it depends on it"
        )
    stand_in = "pyroute2" not in sys.modules
    if stand_in:
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    try:
        iproute = importlib.import_module("pyroute2.iproute.linux")
        netns = importlib.import_module("pyroute2.netns")
        exceptions = importlib.import_module("pyroute2.netlink.exceptions")
    finally:
        if stand_in:
            del sys.modules["pyroute2"]
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own, which has the C library
    return Pyroute2(iproute.IPRoute, netns, exceptions.NetlinkError, libc)


def _reason(exc: BaseException) -> str:
    """The kernel's words for a failed call: strerror and the errno's name."""
    code = _errno(exc)
    if code:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return str(exc) or type(exc).__name__


def _errno(exc: BaseException) -> int:
    """pyroute2's NetlinkError carries the errno as `code`, an OSError as `errno`."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else 0


def _failed(kind: str, where: str, what: str, exc: BaseException) -> QnixError:
    return QnixError(f"{kind}: {where}: {what} failed: {_reason(exc)}", hint=HINT)


# ---- namespaces ----------------------------------------------------------------------------


@contextlib.contextmanager
def entered(path: Path | None, label: str) -> Iterator[None]:
    """This thread inside the network namespace at `path` (None: where it already is) until
    the block ends. Only the calling thread moves; sockets made inside stay in that namespace,
    and /proc/sys/net shows that namespace's parameters."""
    if path is None:
        yield
        return
    loaded = pyroute2()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise QnixError(
                f"network namespace {label} does not exist ({path})",
                hint="`qnix gc` then `qnix apply` bring the host back to the spec",
            ) from exc
        except OSError as exc:
            raise _failed("netns", label, "enter", exc) from exc
        try:
            loaded.netns.setns(target, libc=loaded.libc)
        except OSError as exc:
            raise _failed("netns", label, "enter", exc) from exc
        finally:
            os.close(target)
        try:
            yield
        finally:
            loaded.netns.setns(home, libc=loaded.libc)
    finally:
        os.close(home)


def is_netns(path: Path) -> bool:
    """Whether `path` is a bound network namespace (a kill between `ip netns add`'s two steps,
    or pyroute2's, leaves a plain empty file)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def create_netns(path: Path, label: str) -> None:
    """A new network namespace, bind-mounted at `path` as `ip netns add` does.

    Made by this thread, which unshares its own network namespace, binds it and goes back:
    pyroute2's `netns.create` forks a child for it, and forking a process as large as a
    keeper costs more than the rest of a disposable's network."""
    log.debug("netns: %s: add (bound at %s)", label, path)
    loaded = pyroute2()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if loaded.libc.unshare(CLONE_NEWNET) != 0:
            raise _failed("netns", label, "add", OSError(ctypes.get_errno(), "unshare"))
        try:
            loaded.netns.attach(str(path), "thread-self", libc=loaded.libc)
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # the mount point it made, left unbound
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise _failed("netns", label, "add", exc) from exc
        finally:
            loaded.netns.setns(home, libc=loaded.libc)
    finally:
        os.close(home)


def remove_netns(path: Path, label: str) -> None:
    """Unbind and unlink, as `ip netns delete` does; the namespace ends with its last user."""
    log.debug("netns: %s: delete (unbind %s)", label, path)
    try:
        loaded = pyroute2()
        loaded.netns.remove(str(path), libc=loaded.libc)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _failed("netns", label, "delete", exc) from exc


# ---- routing netlink -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkState:
    name: str
    index: int
    up: bool


@dataclass(frozen=True, slots=True, order=True)
class Rule:
    """An IPv4 routing rule qnix makes: `priority P iif IFNAME [to DESTINATION] table T`."""

    priority: int
    iifname: str
    destination: str | None  # a network, "10.0.0.0/16"
    table: int

    def __str__(self) -> str:
        to = f" to {self.destination}" if self.destination else ""
        table = "main" if self.table == MAIN_TABLE else str(self.table)
        return f"priority {self.priority} iif {self.iifname}{to} table {table}"


class Rtnl:
    """Routing netlink in one namespace, for one job (a `with` block)."""

    def __init__(self, label: str, path: Path | None) -> None:
        self.label = label
        self._errors = pyroute2().NetlinkError
        with entered(path, label):
            self._ipr = pyroute2().IPRoute()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._ipr.close()

    def _call(self, what: str, method: str, *args: Any, gone: int = 0, **kwargs: Any) -> Any:
        """One request, logged; a QnixError if the kernel refuses it, None if it answers with
        errno `gone` (what is being removed or looked up is not there)."""
        log.debug("netlink: %s: %s", self.label, what)
        try:
            return list(getattr(self._ipr, method)(*args, **kwargs))
        except (self._errors, OSError) as exc:
            if gone and _errno(exc) == gone:
                return None
            raise _failed("netlink", self.label, what, exc) from exc

    # links

    @staticmethod
    def _state(message: Any) -> LinkState:
        return LinkState(
            str(message.get("ifname")), int(message["index"]), bool(message["flags"] & IFF_UP)
        )

    def link(self, ifname: str) -> LinkState | None:
        found = self._call(f"show link {ifname}", "link", "get", ifname=ifname, gone=errno.ENODEV)
        return self._state(found[0]) if found else None

    def links(self) -> dict[str, LinkState]:
        return {s.name: s for s in map(self._state, self._call("list links", "link", "dump"))}

    def set_up(self, link: LinkState) -> None:
        self._call(f"set {link.name} up", "link", "set", index=link.index, state="up")

    def add_veth(self, ifname: str, peer: str, peer_netns: Path, peer_label: str) -> None:
        """A veth pair: `ifname` here, `peer` in the namespace at `peer_netns`."""
        fd = os.open(peer_netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._call(
                f"add veth {ifname} <-> {peer_label}:{peer}",
                "link",
                "add",
                ifname=ifname,
                kind="veth",
                peer={"ifname": peer, "net_ns_fd": fd},
            )
        finally:
            os.close(fd)

    def delete_link(self, ifname: str) -> bool:
        """False if there is no such link (any more)."""
        return (
            self._call(f"delete link {ifname}", "link", "del", ifname=ifname, gone=errno.ENODEV)
            is not None
        )

    # addresses

    def addresses(self, link: LinkState) -> list[str]:
        """The link's IPv4 addresses, as "address/prefix"."""
        found = self._call(
            f"list addresses of {link.name}",
            "addr",
            "dump",
            family=socket.AF_INET,
            index=link.index,
        )
        return [f"{a.get('local') or a.get('address')}/{a['prefixlen']}" for a in found]

    def add_address(self, link: LinkState, cidr: str) -> None:
        address, prefix = cidr.split("/")
        self._call(
            f"add address {cidr} to {link.name}",
            "addr",
            "add",
            index=link.index,
            address=address,
            prefixlen=int(prefix),
        )

    def delete_address(self, link: LinkState, cidr: str) -> None:
        address, prefix = cidr.split("/")
        self._call(
            f"delete address {cidr} from {link.name}",
            "addr",
            "del",
            index=link.index,
            address=address,
            prefixlen=int(prefix),
            gone=errno.EADDRNOTAVAIL,
        )

    # routes

    def default_routes(self, table: int = MAIN_TABLE) -> list[tuple[str | None, int | None]]:
        """The IPv4 default routes of `table`, as (gateway, output interface index)."""
        shown = "" if table == MAIN_TABLE else f" of table {table}"
        found = self._call(
            f"list default routes{shown}", "route", "dump", family=socket.AF_INET, table=table
        )
        return [(r.get("gateway"), r.get("oif")) for r in found if r["dst_len"] == 0]

    def replace_default_route(self, gateway: str, link: LinkState, table: int = MAIN_TABLE) -> None:
        shown = "" if table == MAIN_TABLE else f" table {table}"
        self._call(
            f"replace default route via {gateway} dev {link.name}{shown}",
            "route",
            "replace",
            dst="0.0.0.0/0",
            gateway=gateway,
            oif=link.index,
            table=table,
        )

    # rules

    def rules(self) -> list[Rule]:
        """The IPv4 rules that name an input interface."""
        found = []
        for message in self._call("list rules", "rule", "dump", family=socket.AF_INET):
            iifname = message.get("iifname")
            if not iifname:
                continue
            destination = None
            if message["dst_len"]:
                destination = str(
                    ipaddress.IPv4Network(f"{message.get('dst')}/{message['dst_len']}")
                )
            # `table` is the full number (FRA_TABLE); the header's field stops at 255.
            table = int(message.get("table"))
            found.append(Rule(int(message.get("priority") or 0), str(iifname), destination, table))
        return found

    def _rule_fields(self, rule: Rule) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "family": socket.AF_INET,
            "priority": rule.priority,
            "iifname": rule.iifname,
            "table": rule.table,
        }
        if rule.destination is not None:
            network = ipaddress.IPv4Network(rule.destination)
            fields |= {"dst": str(network.network_address), "dst_len": network.prefixlen}
        return fields

    def add_rule(self, rule: Rule) -> None:
        self._call(f"add rule {rule}", "rule", "add", **self._rule_fields(rule))

    def delete_rule(self, rule: Rule) -> bool:
        """False if there is no such rule (any more)."""
        fields = self._rule_fields(rule)
        return (
            self._call(f"delete rule {rule}", "rule", "del", gone=errno.ENOENT, **fields)
            is not None
        )
