"""The workstation as a Graphviz drawing: compartments, network links, policy arrows.

Compartments are boxes filled in their Qubes label colour and grouped in one cluster per
isolation level; disposable templates are dashed boxes and stand for the disposables made from
them (a policy target `@dispvm:NAME` points at template NAME; `@dispvm` at the default one).
Solid edges follow the network (compartment -> net compartment -> uplink); a compartment with
network "none" has no such edge and says "offline".

Dashed edges are policy lines that allow or ask between concrete compartments: names, tags
(every compartment carrying the tag) and disposable templates. An edge is drawn only for the
pairs where its line is the one that decides, because the first matching line wins. Lines with
a wildcard side (`*`, `@anyvm`, `@type:...`) would connect everything to everything, and lines
towards the host (`@adminvm`, `@default`) have no box to point at, so these are listed, in
policy order, in one legend note instead. Deny lines are not drawn: no edge means no flow.

The picture is for review; the policy evaluator, not this drawing, decides requests.
Node ids are derived (`c0`, `c1`, ...), never spec text, and every text goes through
`dot_string`, so nothing in a spec can change the structure of the graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qnix.compile.desktop import LABEL_COLOURS as QUBES_LABEL_COLOURS
from qnix.policy.parse import INLINE_POLICY_FILE, Rule, Token, parse_line, parse_text
from qnix.spec.load import LoadedSpec
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, CompartmentBase, Workstation

# Qubes' label colours (qnix.compile.desktop, the one table): (fill, text) for contrast.
_DARK_TEXT = {"orange", "yellow", "green"}
LABEL_COLOURS = {
    label: (f"#{rgb}", "black" if label in _DARK_TEXT else "white")
    for label, rgb in QUBES_LABEL_COLOURS.items()
}
ACTION_COLOURS = {"allow": "#4e9a06", "ask": "#c4a000"}
LEVEL_TITLES = {
    "namespace": "namespace (bubblewrap)",
    "container": "container (systemd-nspawn)",
    "vm": "vm (QEMU / microvm.nix)",
}
UPLINK_ID = "uplink"
LEGEND_ID = "legend"
LEGEND_TITLE = "policy lines for many compartments (allow and ask, in order):"
# Token kinds that stand for (nearly) every compartment: summarised, never drawn as a mesh.
WILDCARD_KINDS = ("any", "anyvm", "type")


def dot_string(text: str) -> str:
    """A DOT double-quoted string that graphviz shows as exactly `text`.

    Quotes and backslashes are escaped (a backslash would otherwise start a layout escape such
    as `\\N` or `\\l`), `&` becomes `&amp;` (graphviz expands HTML entities in plain labels), and
    characters that are not printable, line breaks included, are dropped. Always quoted, so a
    value can never become an HTML-like `<...>` label; record syntax needs a record shape, which
    this module never uses.
    """
    printable = "".join(ch for ch in text if ch.isprintable())
    escaped = printable.replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def dot_lines(lines: Sequence[str], *, end: str = "") -> str:
    """Several lines as one DOT label: each escaped, joined by graphviz's line-break escape.

    `end` is "" for centred lines, or "l" for left-justified ones (each line, the last one
    included, then ends in `\\l`)."""
    inner = [dot_string(line)[1:-1] for line in lines]
    if end:
        return '"' + "".join(f"{line}\\{end}" for line in inner) + '"'
    return '"' + "\\n".join(inner) + '"'


def policy_rules_of(loaded: LoadedSpec) -> list[Rule]:
    """Every policy line of a spec in evaluation order: the inline rules, then the policy.d files.

    Inline rules are named like the file the build writes them to, so a rule's `file:line`
    points at the same place in the graph, the build output and an evaluation."""
    rules: list[Rule] = []
    for number, text in enumerate(loaded.workstation.policy.rules, start=1):
        rule = parse_line(text, file=INLINE_POLICY_FILE, line=number)
        if rule is not None:
            rules.append(rule)
    for name, text in loaded.policy_files:
        rules.extend(parse_text(text, file=name))
    return rules


def _units(ws: Workstation) -> dict[str, CompartmentBase]:
    """Every box of the graph by name: compartments and disposable templates (disjoint names)."""
    return {**ws.compartments, **ws.disposable_templates}


def _members(token: Token, ws: Workstation) -> frozenset[str]:
    """The boxes a policy token covers.

    For `@type:`: a persistent compartment is an AppVM; a disposable compartment and the
    disposables of a template are DispVMs; qnix has no TemplateVM, StandaloneVM or AdminVM box.
    """
    units = _units(ws)
    templates = ws.disposable_templates
    if token.kind in ("any", "anyvm"):
        return frozenset(units)
    if token.kind == "name":
        return frozenset({token.value} & units.keys())
    if token.kind == "tag":
        return frozenset(name for name, unit in units.items() if token.value in unit.tags)
    if token.kind == "dispvm_template":
        return frozenset({token.value} & templates.keys())
    if token.kind == "dispvm_tag":
        return frozenset(name for name, unit in templates.items() if token.value in unit.tags)
    if token.kind == "dispvm":
        default = ws.default_disposable
        return frozenset({default} & templates.keys()) if default else frozenset()
    if token.kind == "type":
        persistent = {n for n, c in ws.compartments.items() if c.persistence == "persistent"}
        if token.value == "AppVM":
            return frozenset(persistent)
        if token.value == "DispVM":
            return frozenset(units.keys() - persistent)
    return frozenset()  # @adminvm, @default and the types qnix has no box for


def _service_label(rule: Rule) -> str:
    argument = "" if rule.argument == "*" else rule.argument
    return f"{rule.service}{argument} ({rule.action})"


def _could_match(earlier: Rule, rule: Rule) -> bool:
    """Whether `earlier` applies to requests that `rule` would answer (service and argument)."""
    return earlier.service in ("*", rule.service) and earlier.argument in ("*", rule.argument)


def _decides(
    rules: Sequence[Rule],
    rule: Rule,
    source: str,
    target: str,
    members: Mapping[Token, frozenset[str]],
) -> bool:
    """Whether `rule` is the first line that matches `source` -> `target` for its service."""
    for earlier in rules:
        if (
            _could_match(earlier, rule)
            and source in members[earlier.source]
            and target in members[earlier.target]
        ):
            return earlier is rule
    return False


def _policy_edges(
    ws: Workstation, rules: Sequence[Rule]
) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """Arrows (source, target) -> {label: action}, and the legend lines for the rest."""
    members = {token: _members(token, ws) for rule in rules for token in (rule.source, rule.target)}
    edges: dict[tuple[str, str], dict[str, str]] = {}
    legend: list[str] = []
    for rule in rules:
        if rule.action == "deny":
            continue
        sources, targets = members[rule.source], members[rule.target]
        wildcard = rule.source.kind in WILDCARD_KINDS or rule.target.kind in WILDCARD_KINDS
        if wildcard or not sources or not targets:
            legend.append(f"{_service_label(rule)}: {rule.source} -> {rule.target}")
            continue
        for source in sorted(sources):
            for target in sorted(targets):
                if source != target and _decides(rules, rule, source, target, members):
                    edges.setdefault((source, target), {}).setdefault(
                        _service_label(rule), rule.action
                    )
    return edges, list(dict.fromkeys(legend))


def render_dot(ws: Workstation, policy_rules: Sequence[Rule]) -> str:
    """The DOT source of the workstation's picture; the same inputs give the same bytes."""
    units = _units(ws)
    ids = {name: f"c{index}" for index, name in enumerate(sorted(units))}
    title = f"{ws.host.hostname} ({ws.host.system}, {ws.host.hardening})"
    lines = [
        f"digraph {dot_string(ws.host.hostname)} {{",
        f"  graph [rankdir=LR, fontname=sans, compound=true, label={dot_string(title)}];",
        '  node [shape=box, style="rounded,filled", fontname=sans];',
        "  edge [fontname=sans, fontsize=10];",
        f'  {UPLINK_ID} [label="uplink / internet", shape=ellipse, style=filled, '
        'fillcolor="#eeeeec"];',
    ]
    for level, level_title in LEVEL_TITLES.items():
        in_level = sorted(name for name, unit in units.items() if unit.isolation == level)
        if not in_level:
            continue
        lines.append(f"  subgraph cluster_{level} {{")
        lines.append(f'    label={dot_string(level_title)}; style=dashed; color="#888a85";')
        lines.extend(f"    {_node(ids[name], name, ws)}" for name in in_level)
        lines.append("  }")
    for name in sorted(units):
        network = units[name].network
        if network == NETWORK_NONE:
            continue
        upstream = UPLINK_ID if network == NETWORK_UPLINK else ids.get(network)
        if upstream is not None:
            lines.append(f'  {ids[name]} -> {upstream} [penwidth=2, color="#2e3436"];')
    edges, legend = _policy_edges(ws, policy_rules)
    for (source, target), labels in sorted(edges.items()):
        colour = ACTION_COLOURS["ask" if "ask" in labels.values() else "allow"]
        lines.append(
            f"  {ids[source]} -> {ids[target]} [style=dashed, constraint=false, "
            f'color="{colour}", fontcolor="{colour}", label={dot_lines(list(labels))}];'
        )
    if legend:
        text = dot_lines([LEGEND_TITLE, *legend], end="l")
        lines.append(
            f'  {LEGEND_ID} [shape=note, style=filled, fillcolor="#fcfcfc", label={text}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node(node_id: str, name: str, ws: Workstation) -> str:
    template = ws.disposable_templates.get(name)
    compartment = ws.compartments.get(name)
    unit: CompartmentBase = template if template is not None else ws.compartments[name]
    notes = []
    if template is not None:
        notes.append("disposable template")
    elif compartment is not None and compartment.persistence == "disposable":
        notes.append("disposable")
    if compartment is not None and compartment.provides_network:
        notes.append("net compartment")
    if unit.network == NETWORK_NONE:
        notes.append("offline")
    fill, font = LABEL_COLOURS[unit.label]
    style = "rounded,filled,dashed" if template is not None else "rounded,filled"
    return (
        f"{node_id} [label={dot_lines([name, *notes])}, "
        f'fillcolor="{fill}", fontcolor="{font}", style="{style}"];'
    )
