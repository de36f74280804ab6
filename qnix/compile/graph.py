"""The workstation as a Graphviz drawing: compartments, network links, policy arrows.

Compartments are boxes filled in their Qubes label colour and grouped by isolation level;
disposable templates are dashed. Solid edges follow the network (compartment -> net compartment
-> uplink); dashed edges are policy lines that allow or ask between named compartments or tags.
Lines whose source or target is a wildcard (`@anyvm`, `*`, `@dispvm`, ...) would connect
everything to everything, so they are summarised in a legend box instead of drawn.

Node ids are derived (`c0`, `c1`, ...), never spec text; every label goes through `dot_string`.
"""

from __future__ import annotations

from collections.abc import Sequence

from qnix.policy.parse import Rule, Token, parse_line, parse_text
from qnix.spec.load import LoadedSpec
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, CompartmentBase, Workstation

# Qubes' label colours: (fill, text).
LABEL_COLOURS = {
    "red": ("#cc0000", "white"),
    "orange": ("#f57900", "black"),
    "yellow": ("#edd400", "black"),
    "green": ("#73d216", "black"),
    "gray": ("#555753", "white"),
    "blue": ("#3465a4", "white"),
    "purple": ("#75507b", "white"),
    "black": ("#000000", "white"),
}
ACTION_COLOURS = {"allow": "#4e9a06", "ask": "#c4a000"}
LEVEL_TITLES = {
    "namespace": "namespace (bubblewrap)",
    "container": "container (systemd-nspawn)",
    "vm": "vm (QEMU / microvm.nix)",
}
UPLINK_ID = "uplink"


def dot_string(text: str) -> str:
    """A DOT double-quoted string holding `text`: quotes and backslashes escaped, control
    characters dropped (DOT would read `\\n` and friends as layout escapes)."""
    safe = "".join(ch for ch in text if ch.isprintable())
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_rules_of(loaded: LoadedSpec) -> list[Rule]:
    """The spec's inline rules, then its policy.d files, as parsed rules."""
    rules: list[Rule] = []
    for number, text in enumerate(loaded.workstation.policy.rules, start=1):
        rule = parse_line(text, file="spec", line=number)
        if rule is not None:
            rules.append(rule)
    for name, text in loaded.policy_files:
        rules.extend(parse_text(text, file=name))
    return rules


def _ends(token: Token, ws: Workstation) -> list[str] | None:
    """Compartments a token stands for, or None when it is a wildcard (not drawn)."""
    if token.kind == "name":
        known = token.value in ws.compartments or token.value in ws.disposable_templates
        return [token.value] if known else []
    if token.kind == "tag":
        units: dict[str, CompartmentBase] = {**ws.compartments, **ws.disposable_templates}
        return sorted(name for name, unit in units.items() if token.value in unit.tags)
    if token.kind == "dispvm_template":
        return [token.value]
    return None


def _matches(token: Token, name: str, ws: Workstation) -> bool:
    if token.kind in ("any", "anyvm"):
        return True
    if token.kind == "name":
        return token.value == name
    if token.kind == "tag":
        unit = ws.compartments.get(name) or ws.disposable_templates.get(name)
        return unit is not None and token.value in unit.tags
    return False


def _first_match(
    rules: Sequence[Rule], rule: Rule, source: str, target: str, ws: Workstation
) -> bool:
    """Whether `rule` is the first line for its service that matches source -> target."""
    for earlier in rules:
        if earlier.service not in ("*", rule.service) or earlier.argument not in (
            "*",
            rule.argument,
        ):
            continue
        if _matches(earlier.source, source, ws) and _matches(earlier.target, target, ws):
            return earlier is rule
    return False


def render_dot(ws: Workstation, policy_rules: Sequence[Rule]) -> str:
    units: dict[str, CompartmentBase] = {**ws.compartments, **ws.disposable_templates}
    ids = {name: f"c{index}" for index, name in enumerate(sorted(units))}
    lines = [
        f"digraph {dot_string(ws.host.hostname)} {{",
        "  graph [rankdir=LR, fontname=sans, compound=true, "
        f"label={dot_string(f'{ws.host.hostname} ({ws.host.system}, {ws.host.hardening})')}];",
        '  node [shape=box, style="rounded,filled", fontname=sans];',
        "  edge [fontname=sans, fontsize=10];",
        f'  {UPLINK_ID} [label="uplink / internet", shape=cloud, fillcolor="#eeeeec"];',
    ]
    for level, title in LEVEL_TITLES.items():
        members = sorted(name for name, unit in units.items() if unit.isolation == level)
        if not members:
            continue
        lines.append(f"  subgraph cluster_{level} {{")
        lines.append(f'    label={dot_string(title)}; style=dashed; color="#888a85";')
        for name in members:
            lines.append("    " + _node(ids[name], name, units[name], ws))
        lines.append("  }")
    for name in sorted(units):
        network = units[name].network
        if network == NETWORK_NONE:
            continue
        target = UPLINK_ID if network == NETWORK_UPLINK else ids.get(network)
        if target is not None:
            lines.append(f'  {ids[name]} -> {target} [penwidth=2, color="#2e3436"];')
    summary: list[str] = []
    # One edge per ordered pair, listing every service that may flow along it.
    edges: dict[tuple[str, str], dict[str, str]] = {}
    for rule in policy_rules:
        if rule.action == "deny":
            continue
        sources, targets = _ends(rule.source, ws), _ends(rule.target, ws)
        label = f"{rule.service} ({rule.action})"
        if sources is None or targets is None:
            summary.append(f"{label}: {rule.source} -> {rule.target}")
            continue
        for source in sources:
            for target in targets:
                # Drawn only where this line is the one that decides (first match wins).
                if source != target and _first_match(policy_rules, rule, source, target, ws):
                    edges.setdefault((source, target), {}).setdefault(label, rule.action)
    for (source, target), labels in sorted(edges.items()):
        colour = ACTION_COLOURS["ask" if "ask" in labels.values() else "allow"]
        text = "\\n".join(dot_string(label)[1:-1] for label in labels)
        lines.append(
            f"  {ids[source]} -> {ids[target]} [style=dashed, constraint=false, "
            f'color="{colour}", fontcolor="{colour}", label="{text}"];'
        )
    if summary:
        text = "policy for any compartment:\\l" + "".join(
            dot_string(entry)[1:-1] + "\\l" for entry in dict.fromkeys(summary)
        )
        lines.append(f'  legend [shape=note, style=filled, fillcolor="#fcfcfc", label="{text}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node(node_id: str, name: str, unit: CompartmentBase, ws: Workstation) -> str:
    fill, font = LABEL_COLOURS[unit.label]
    is_template = name in ws.disposable_templates
    notes = []
    if is_template:
        notes.append("disposable template")
    elif ws.compartments[name].persistence == "disposable":
        notes.append("disposable")
    if name in ws.compartments and ws.compartments[name].provides_network:
        notes.append("net compartment")
    if unit.network == NETWORK_NONE:
        notes.append("offline")
    label = name + "".join(f"\n{note}" for note in notes)
    # DOT reads "\n" in a label as a line break; dot_string drops real newlines, so build it.
    quoted = "\\n".join(dot_string(part)[1:-1] for part in label.split("\n"))
    style = "rounded,filled,dashed" if is_template else "rounded,filled"
    return f'{node_id} [label="{quoted}", fillcolor="{fill}", fontcolor="{font}", style="{style}"];'
