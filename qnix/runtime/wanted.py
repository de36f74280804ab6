"""What the live generation wants of the host, compared with what the host has: the one
place `apply` (which puts it back) and `qnix drift` (which reports it) read it from.

The nft table: the transaction apply loads (the compiled ruleset, the host-name sets filled
with what the names resolved to, the running disposables' elements), and its comparison with
the loaded table as nft lists both (the expected listing from loading the transaction into a
throwaway network namespace). The generation's files, byte for byte. Whether a running
disposable still fits its template.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qnix.compile.artifacts import RULESET
from qnix.compile.nft import TABLE, disposable_elements, hostname_sets
from qnix.runner import require_tool, run
from qnix.runtime.live import KeeperConfig, read_json, running_disposables
from qnix.runtime.net import (
    NET_COMPARTMENT_RULESET,
    NET_COMPARTMENT_TABLE,
    HostNetwork,
    element_statements,
)
from qnix.runtime.paths import RuntimePaths
from qnix.spec.model import NETWORK_NONE, Workstation

PRESENT = "present"  # what a difference shows for a thing that is there


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the host differs: `kind` (generation, nft-table, nft-chain, nft-rule, nft-set,
    nft-element, netns, link, address, route, rule, sysctl, compartment), what it is about,
    what the generation wants (None: nothing) and what the host has (None: nothing)."""

    kind: str
    subject: str
    expected: str | None
    actual: str | None

    def render(self) -> str:
        if self.expected is None:
            return f"{self.kind} {self.subject}: unexpected {self.actual}"
        if self.actual is None:
            return f"{self.kind} {self.subject}: missing {self.expected}"
        return f"{self.kind} {self.subject}: expected {self.expected}, found {self.actual}"

    def to_json(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "expected": self.expected,
            "actual": self.actual,
        }


# ---- the nft table -------------------------------------------------------------------------


def table_transaction(
    ws: Workstation, ruleset: str, net: HostNetwork
) -> tuple[str, dict[str, Any]]:
    """The compiled table plus its host-name sets filled with what the names resolve to now."""
    named_sets = hostname_sets(ws)
    answers = net.resolve(sorted({(named.hostname, named.family) for named in named_sets}))
    resolved = {n.set_name: list(answers[(n.hostname, n.family)]) for n in named_sets}
    return filled_transaction(ruleset, resolved), resolved


def filled_transaction(ruleset: str, resolved: dict[str, list[str]]) -> str:
    """The table followed by the addresses of its host-name sets (`qnix drift` rebuilds what
    apply loaded from the resolved addresses apply recorded)."""
    lines = [ruleset]
    for set_name, addresses in resolved.items():
        if addresses:
            lines.append(f"add element {TABLE} {set_name} {{ {', '.join(addresses)} }}\n")
    return "".join(lines)


def disposables_statements(disposables: dict[str, KeeperConfig]) -> str:
    return element_statements([e for config in disposables.values() for e in config.elements])


def table_shape(listing: str) -> str:
    """A table listing without the elements of its sets and maps: running disposables add and
    remove theirs at any time (`_table_drifted` compares the elements, theirs included)."""
    return re.sub(r"\n\s*elements = \{[^}]*\}", "", listing)


@dataclass(frozen=True, slots=True)
class Member:
    """A chain, set or map of a listed table: its lines (a chain's declaration and rules in
    order, a set's declaration) and, for a set or map, its elements."""

    lines: tuple[str, ...]
    elements: frozenset[str]


_MEMBER_RE = re.compile(r"\t([a-z]+(?: [a-z]+)?) (\S+) \{")


def _split_elements(text: str) -> list[str]:
    """The elements between `elements = {` and its `}`, split at top-level commas."""
    items: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "{":
            depth += 1
        elif not quoted and char == "}":
            depth -= 1
        if char == "," and depth == 0 and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [" ".join(item.split()) for item in items if item.strip()]


def parse_listing(text: str) -> dict[str, Member]:
    """`nft list table` output as its members, keyed "chain NAME", "set NAME", "map NAME"."""
    members: dict[str, Member] = {}
    lines = iter(text.splitlines())
    for line in lines:
        header = _MEMBER_RE.fullmatch(line)
        if header is None:
            continue
        body: list[str] = []
        elements: list[str] = []
        for inner in lines:
            if inner == "\t}":
                break
            stripped = inner.strip()
            if not stripped:
                continue
            if stripped.startswith("elements = {"):
                block = stripped[len("elements = {") :]
                while not block.rstrip().endswith("}"):
                    block += " " + next(lines).strip()
                elements += _split_elements(block.rstrip()[:-1])
            else:
                body.append(stripped)
        members[f"{header.group(1)} {header.group(2)}"] = Member(tuple(body), frozenset(elements))
    return members


def _kind_of(member: str, line: str | None = None) -> str:
    """nft-chain for a whole chain or its own declaration (hook, policy, comment), nft-rule
    for a rule, nft-set for a set or map."""
    if not member.startswith("chain "):
        return "nft-set"
    if line is None or line.startswith(("type ", "comment ", "policy ")):
        return "nft-chain"
    return "nft-rule"


def compare_listings(expected: str, actual: str, prefix: str = "") -> list[Difference]:
    """Differences between two listings of one table, member by member."""
    wanted, found = parse_listing(expected), parse_listing(actual)
    differences: list[Difference] = []
    for member in sorted(wanted.keys() - found.keys()):
        differences.append(Difference(_kind_of(member), prefix + member, PRESENT, None))
    for member in sorted(found.keys() - wanted.keys()):
        differences.append(Difference(_kind_of(member), prefix + member, None, PRESENT))
    for member in sorted(wanted.keys() & found.keys()):
        subject = prefix + member
        left, right = wanted[member], found[member]
        if member.startswith("chain "):
            matcher = difflib.SequenceMatcher(a=left.lines, b=right.lines, autojunk=False)
            for tag, a0, a1, b0, b1 in matcher.get_opcodes():
                if tag == "equal":
                    continue
                gone, came = left.lines[a0:a1], right.lines[b0:b1]
                for index in range(max(len(gone), len(came))):
                    old = gone[index] if index < len(gone) else None
                    new = came[index] if index < len(came) else None
                    kind = _kind_of(member, old if old is not None else new)
                    differences.append(Difference(kind, subject, old, new))
        elif left.lines != right.lines:
            differences.append(
                Difference("nft-set", subject, "; ".join(left.lines), "; ".join(right.lines))
            )
        for element in sorted(left.elements - right.elements):
            differences.append(Difference("nft-element", subject, element, None))
        for element in sorted(right.elements - left.elements):
            differences.append(Difference("nft-element", subject, None, element))
    return differences


# Loads a transaction, then lists the table: two nft runs, since a listing inside the same
# transaction shows what is not yet committed. Run in a network namespace of its own.
_LOAD_AND_LIST = """\
import subprocess, sys
nft, table = sys.argv[1], sys.argv[2:]
loaded = subprocess.run([nft, "-f", "-"], stdin=sys.stdin, capture_output=True, text=True)
if loaded.returncode != 0:
    sys.stderr.write(loaded.stderr)
    sys.exit(loaded.returncode)
listed = subprocess.run([nft, "list", "table", *table], capture_output=True, text=True)
sys.stderr.write(listed.stderr)
sys.stdout.write(listed.stdout)
sys.exit(listed.returncode)
"""


def listing_of(transaction: str, table: str = TABLE) -> str:
    """How nft lists `table` once `transaction` is loaded, in a throwaway network namespace
    (it ends with the process, so nothing is left behind however this ends)."""
    unshare = require_tool("unshare", "util-linux")
    nft = require_tool("nft", "nftables")
    command = [unshare, "--net", "--", sys.executable, "-I", "-S", "-c", _LOAD_AND_LIST, nft]
    return run([*command, *table.split()], input=transaction, timeout=120).stdout


def table_differences(net: HostNetwork, wanted: str | None) -> list[Difference]:
    """The loaded `inet qnix` table against the transaction `wanted` (None: no table)."""
    live = net.table_listing()
    if wanted is None:
        return [] if live is None else [Difference("nft-table", TABLE, None, PRESENT)]
    if live is None:
        return [Difference("nft-table", TABLE, PRESENT, None)]
    return compare_listings(listing_of(wanted), live)


def resolved_of(applied: dict[str, Any], ws: Workstation) -> dict[str, list[str]]:
    """The addresses apply resolved for each host-name set, as recorded, checked: they go
    into an nft transaction."""
    recorded = applied.get("resolved")
    recorded = recorded if isinstance(recorded, dict) else {}
    resolved: dict[str, list[str]] = {}
    for named in hostname_sets(ws):
        addresses = recorded.get(named.set_name)
        kept = []
        for text in addresses if isinstance(addresses, list) else []:
            with contextlib.suppress(ValueError, TypeError):
                address = ipaddress.ip_address(text)
                if address.version == named.family:
                    kept.append(str(address))
        resolved[named.set_name] = kept
    return resolved


def expected_transaction(paths: RuntimePaths, ws: Workstation) -> str | None:
    """What apply would load for the live generation now (None: its ruleset is unreadable,
    which the generation check reports)."""
    try:
        ruleset = (paths.generation_dir / RULESET).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    applied = read_json(paths.applied_file)
    disposables = running_disposables(paths)
    return filled_transaction(ruleset, resolved_of(applied, ws)) + disposables_statements(
        disposables
    )


def net_table_differences(net: HostNetwork, ws: Workstation) -> list[Difference]:
    """Each net compartment's masquerade table against the one apply loads into it."""
    found: list[Difference] = []
    present = set(net.list_netns())
    routers = [c.name for c in ws.net_compartments() if c.name in present]
    if not routers:
        return found
    expected = listing_of(NET_COMPARTMENT_RULESET, NET_COMPARTMENT_TABLE)
    for name in routers:
        live = net.nft_listing(net.netns(name), NET_COMPARTMENT_TABLE)
        if live is None:
            found.append(Difference("nft-table", f"{name}: {NET_COMPARTMENT_TABLE}", PRESENT, None))
        else:
            found += compare_listings(expected, live, f"{name}: ")
    return found


# ---- the generation's files and the disposables ---------------------------------------------


def holds_exactly(folder: Path, files: Mapping[str, bytes]) -> bool:
    """Whether `folder` holds these files and no others, byte for byte: a generation file
    changed by hand is put back."""
    found = (
        {str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir()}
        if folder.is_dir()
        else set()
    )
    if found != set(files):
        return False
    return all((folder / name).read_bytes() == data for name, data in files.items())


def disposable_matches(ws: Workstation, config: KeeperConfig) -> bool:
    """Whether a running disposable still fits its template in `ws` (same elements)."""
    template_name = config.template or ""
    template = ws.disposable_templates.get(template_name)
    if template is None:
        return False
    if config.host_ifname is None or config.address is None:
        return template.network == NETWORK_NONE
    if template.network == NETWORK_NONE:
        return False
    wanted = disposable_elements(ws, template_name, config.host_ifname, config.address)
    return tuple(wanted.items()) == config.elements
