"""Names and addresses the host uses for a compartment, derived from the spec alone.

Linux limits interface names to 15 bytes and user names to 32, while a compartment name may be
31 long, so both are derived through a short hash; the same spec always gives the same names.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

USER_PREFIX = "qx-"
# A compartment's host uid and gid: this base plus its link slot (unique within a spec, stable
# under edits elsewhere), so the runtime and the NixOS users agree without /etc/passwd edits.
HOST_ID_BASE = 0x70000000
# A NixOS container runs a whole system, so its user namespace maps a range of 65536 uids of its
# own (containers.<name>.privateUsers): inside systemd's area for container ranges, below
# HOST_ID_BASE, so no range ever holds a compartment's host uid or another container's.
CONTAINER_RANGE_SIZE = 0x10000
CONTAINER_RANGE_FIRST = 0x10000000
CONTAINER_RANGES = (HOST_ID_BASE - CONTAINER_RANGE_FIRST) // CONTAINER_RANGE_SIZE
# The uid of the compartment's user inside a NixOS container (the first normal user).
CONTAINER_USER_ID = 1000
# Every host-side interface qnix creates starts with this; the nft table matches on it.
IFNAME_PREFIX = "qx"
MAX_USER = 32


def _digest(name: str, length: int) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:length]


def host_ifname(name: str) -> str:
    """The host end of a compartment's veth pair: `qx` + 10 hex digits (12 bytes)."""
    return IFNAME_PREFIX + _digest(name, 10)


def unix_user(name: str) -> str:
    """The unprivileged host user that owns a compartment's state."""
    plain = USER_PREFIX + name
    if len(plain) <= MAX_USER:
        return plain
    return f"{USER_PREFIX}{name[:20]}-{_digest(name, 8)}"


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point /31: the host (or net compartment) side and the compartment side."""

    gateway: str
    address: str

    @property
    def prefix(self) -> int:
        return 31


def allocate_links(names: Iterable[str], subnet: str) -> dict[str, Link]:
    """A /31 per compartment, at a slot chosen by the hash of its name (stable under edits
    elsewhere in the spec), probing linearly on collision, in sorted name order."""
    network = ipaddress.IPv4Network(subnet)
    slots = network.num_addresses // 2
    base = int(network.network_address)
    ordered = sorted(set(names))
    if len(ordered) >= slots:
        raise ValueError(f"{len(ordered)} compartments do not fit in {subnet}")
    taken: set[int] = {0}  # slot 0 holds the network's own address
    links: dict[str, Link] = {}
    for name in ordered:
        slot = int(_digest(name, 12), 16) % slots
        while slot in taken:
            slot = (slot + 1) % slots
        taken.add(slot)
        gateway = ipaddress.IPv4Address(base + 2 * slot)
        links[name] = Link(str(gateway), str(gateway + 1))
    return links


def link_slot(gateway: str, subnet: str) -> int:
    """Which /31 of `subnet` the link with this gateway is: the number `allocate_links` chose."""
    network = ipaddress.IPv4Network(subnet)
    return (int(ipaddress.IPv4Address(gateway)) - int(network.network_address)) // 2


def host_id(link: Link, subnet: str) -> int:
    """The unprivileged host uid (and gid) a compartment's processes and state belong to."""
    return HOST_ID_BASE + link_slot(link.gateway, subnet)


def allocate_container_ranges(names: Iterable[str]) -> dict[str, int]:
    """The first host uid of each NixOS container's 65536-uid range, by a hash of its name
    (the next free range on a clash): stable under edits elsewhere in the spec."""
    taken: set[int] = set()
    ranges: dict[str, int] = {}
    for name in sorted(names):
        index = int(_digest(f"uid-range:{name}", 12), 16) % CONTAINER_RANGES
        while index in taken:
            index = (index + 1) % CONTAINER_RANGES
        taken.add(index)
        ranges[name] = CONTAINER_RANGE_FIRST + index * CONTAINER_RANGE_SIZE
    return ranges
