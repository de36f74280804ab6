"""The graph: label colours, clusters by isolation level, network edges, first-match policy
arrows, a legend for wildcard lines, and escaping that no text can break."""

from __future__ import annotations

import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qnix.compile.graph import (
    LABEL_COLOURS,
    LEGEND_TITLE,
    dot_lines,
    dot_string,
    policy_rules_of,
    render_dot,
)
from qnix.compile.inputs import load
from qnix.policy.parse import INLINE_POLICY_FILE, Rule, Token, parse_line, parse_text
from qnix.spec.model import Workstation
from tests.conftest import EXAMPLES, need

SVG = "{http://www.w3.org/2000/svg}"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.toml"))


def tiny(**extra: object) -> Workstation:
    return Workstation.model_validate(
        {
            "host": {"hostname": "t"},
            "default_disposable": "dvm",
            "compartments": {
                "work": {"network": "net", "label": "blue", "tags": ["office"]},
                "net": {"network": "uplink", "provides_network": True, "label": "red"},
                "vault": {"label": "black", "isolation": "container", "tags": ["office"]},
            },
            "disposable_templates": {"dvm": {"label": "gray", "network": "net"}},
            **extra,
        }
    )


def rules(*lines: str) -> list[Rule]:
    parsed = [parse_line(line, file="t", line=i) for i, line in enumerate(lines, start=1)]
    return [rule for rule in parsed if rule is not None]


def policy_edges(dot: str) -> list[str]:
    """The `a -> b` pairs of the dashed policy arrows, in output order."""
    return [
        line.strip().split(" [")[0]
        for line in dot.splitlines()
        if "->" in line and "style=dashed" in line
    ]


def draw_svg(dot: str) -> ElementTree.Element:
    result = subprocess.run(
        [need("dot"), "-Tsvg"], input=dot, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "Error" not in result.stderr, result.stderr
    return ElementTree.fromstring(result.stdout)


def groups(svg: ElementTree.Element, kind: str) -> dict[str, ElementTree.Element]:
    """SVG groups of one class ("node", "edge", "cluster") by their <title>."""
    return {
        str(g.findtext(f"{SVG}title")): g for g in svg.iter(f"{SVG}g") if g.get("class") == kind
    }


def shown_text(group: ElementTree.Element) -> str:
    """The text graphviz drew in a group, lines joined; it writes runs of spaces as NBSP."""
    return "\n".join(t.text or "" for t in group.iter(f"{SVG}text")).replace("\xa0", " ")


# ---- exact output --------------------------------------------------------------------------


def test_exact_dot_for_a_tiny_workstation() -> None:
    dot = render_dot(
        tiny(),
        rules(
            "qnix.Gpg * work vault ask",
            "qnix.OpenInDisposable * work @dispvm allow",
            "qnix.Clipboard * @anyvm @anyvm ask",
            "qnix.Filecopy * @anyvm @anyvm deny",
        ),
    )
    assert dot == (
        'digraph "t" {\n'
        '  graph [rankdir=LR, fontname=sans, compound=true, label="t (x86_64-linux, strict)"];\n'
        '  node [shape=box, style="rounded,filled", fontname=sans];\n'
        "  edge [fontname=sans, fontsize=10];\n"
        '  uplink [label="uplink / internet", shape=ellipse, style=filled, fillcolor="#eeeeec"];\n'
        "  subgraph cluster_namespace {\n"
        '    label="namespace (bubblewrap)"; style=dashed; color="#888a85";\n'
        '    c0 [label="dvm\\ndisposable template", fillcolor="#555753", fontcolor="white", '
        'style="rounded,filled,dashed"];\n'
        '    c1 [label="net\\nnet compartment", fillcolor="#cc0000", fontcolor="white", '
        'style="rounded,filled"];\n'
        '    c3 [label="work", fillcolor="#3465a4", fontcolor="white", style="rounded,filled"];\n'
        "  }\n"
        "  subgraph cluster_container {\n"
        '    label="container (systemd-nspawn)"; style=dashed; color="#888a85";\n'
        '    c2 [label="vault\\noffline", fillcolor="#000000", fontcolor="white", '
        'style="rounded,filled"];\n'
        "  }\n"
        '  c0 -> c1 [penwidth=2, color="#2e3436"];\n'
        '  c1 -> uplink [penwidth=2, color="#2e3436"];\n'
        '  c3 -> c1 [penwidth=2, color="#2e3436"];\n'
        '  c3 -> c0 [style=dashed, constraint=false, color="#4e9a06", fontcolor="#4e9a06", '
        'label="qnix.OpenInDisposable (allow)"];\n'
        '  c3 -> c2 [style=dashed, constraint=false, color="#c4a000", fontcolor="#c4a000", '
        'label="qnix.Gpg (ask)"];\n'
        '  legend [shape=note, style=filled, fillcolor="#fcfcfc", '
        'label="policy lines for many compartments (allow and ask, in order):\\l'
        'qnix.Clipboard (ask): @anyvm -> @anyvm\\l"];\n'
        "}\n"
    )


def test_the_same_spec_gives_the_same_bytes() -> None:
    """Insertion order of the spec's tables and repeated runs change nothing."""
    reordered = Workstation.model_validate(
        {
            "host": {"hostname": "t"},
            "default_disposable": "dvm",
            "disposable_templates": {"dvm": {"label": "gray", "network": "net"}},
            "compartments": {
                "vault": {"label": "black", "isolation": "container", "tags": ["office"]},
                "net": {"network": "uplink", "provides_network": True, "label": "red"},
                "work": {"network": "net", "label": "blue", "tags": ["office"]},
            },
        }
    )
    policy = rules("qnix.Filecopy * @tag:office @tag:office ask")
    assert render_dot(reordered, policy) == render_dot(tiny(), policy)
    assert render_dot(tiny(), policy) == render_dot(tiny(), policy)


# ---- what is drawn -------------------------------------------------------------------------


def test_tags_resolve_to_every_tagged_pair_but_never_to_itself() -> None:
    dot = render_dot(tiny(), rules("qnix.Filecopy * @tag:office @tag:office ask"))
    assert policy_edges(dot) == ["c2 -> c3", "c3 -> c2"]  # vault <-> work, no self-loops


def test_only_the_deciding_line_is_drawn() -> None:
    dot = render_dot(
        tiny(),
        rules("qnix.Filecopy * vault @anyvm deny", "qnix.Filecopy * @tag:office @tag:office allow"),
    )
    assert policy_edges(dot) == ["c3 -> c2"]  # work -> vault; vault -> work was denied first


def test_an_earlier_line_for_another_service_or_argument_does_not_shadow() -> None:
    dot = render_dot(
        tiny(),
        rules(
            "qnix.Clipboard * work vault deny",
            "qnix.Gpg +sign work vault deny",
            "qnix.Gpg * work vault ask",
            "qnix.Gpg +sign work vault allow",
        ),
    )
    # The `*` ask line decides plain Gpg calls; `+sign` was already denied, so it is not drawn.
    assert policy_edges(dot) == ["c3 -> c2"]
    assert 'label="qnix.Gpg (ask)"' in dot
    assert "qnix.Gpg+sign" not in dot


def test_arguments_show_in_the_label_and_services_share_one_arrow() -> None:
    dot = render_dot(
        tiny(), rules("qnix.Gpg +sign work vault allow", "qnix.SshAgent * work vault ask")
    )
    assert policy_edges(dot) == ["c3 -> c2"]
    # An arrow with any `ask` on it is drawn in the ask colour.
    assert (
        'color="#c4a000", fontcolor="#c4a000", label="qnix.Gpg+sign (allow)\\n'
        'qnix.SshAgent (ask)"' in dot
    )


def test_type_tokens_shadow_what_they_cover() -> None:
    dot = render_dot(
        tiny(),
        rules("qnix.Filecopy * @type:AppVM vault deny", "qnix.Filecopy * work vault allow"),
    )
    assert policy_edges(dot) == []  # work is persistent: an AppVM, denied first


def test_disposable_targets_point_at_their_template() -> None:
    dot = render_dot(
        tiny(),
        rules(
            "qnix.OpenInDisposable * vault @dispvm:dvm ask",
            "qnix.OpenInDisposable * work @dispvm allow",
        ),
    )
    assert policy_edges(dot) == ["c2 -> c0", "c3 -> c0"]  # both to the dvm template
    without_default = tiny(default_disposable=None)
    dot = render_dot(without_default, rules("qnix.OpenInDisposable * work @dispvm allow"))
    assert policy_edges(dot) == []
    assert "qnix.OpenInDisposable (allow): work -> @dispvm\\l" in dot


def test_wildcard_lines_go_to_the_legend_not_a_mesh() -> None:
    dot = render_dot(
        tiny(),
        rules(
            "qnix.Clipboard * @anyvm @anyvm ask",
            "qnix.Filecopy * @anyvm vault ask",
            "qnix.Filecopy * * work allow",
            "qnix.Clipboard * @anyvm @anyvm ask",  # listed once
            "qnix.Gpg * work @adminvm allow",  # no box for the host
            "qnix.Gpg * @anyvm @anyvm deny",  # deny lines are never shown
        ),
    )
    assert policy_edges(dot) == []
    legend = next(line for line in dot.splitlines() if line.startswith("  legend "))
    assert legend.endswith(
        f'label="{LEGEND_TITLE}\\l'
        "qnix.Clipboard (ask): @anyvm -> @anyvm\\l"
        "qnix.Filecopy (ask): @anyvm -> vault\\l"
        "qnix.Filecopy (allow): * -> work\\l"
        'qnix.Gpg (allow): work -> @adminvm\\l"];'
    )


def test_deny_only_policy_draws_no_arrows_and_no_legend() -> None:
    dot = render_dot(tiny(), rules("qnix.Filecopy * @anyvm @anyvm deny"))
    assert "style=dashed, constraint" not in dot
    assert "legend" not in dot


def test_unvalidated_rules_naming_nothing_cannot_break_the_drawing() -> None:
    """render_dot also takes rules the loader has not checked: unknown names end in the legend."""
    dot = render_dot(
        tiny(),
        rules("qnix.Filecopy * ghost work allow", "qnix.OpenInDisposable * work @dispvm:nope ask"),
    )
    assert policy_edges(dot) == []
    assert "qnix.Filecopy (allow): ghost -> work\\l" in dot
    assert "qnix.OpenInDisposable (ask): work -> @dispvm:nope\\l" in dot


def test_network_edges_follow_the_chain_and_offline_has_none() -> None:
    dot = render_dot(tiny(), [])
    network = [line.strip() for line in dot.splitlines() if "penwidth=2" in line]
    assert network == [
        'c0 -> c1 [penwidth=2, color="#2e3436"];',  # dvm -> net
        'c1 -> uplink [penwidth=2, color="#2e3436"];',  # net -> the internet
        'c3 -> c1 [penwidth=2, color="#2e3436"];',  # work -> net; vault has no edge
    ]
    assert 'c2 [label="vault\\noffline"' in dot


# ---- policy_rules_of -----------------------------------------------------------------------


def test_policy_rules_of_gives_inline_rules_first_then_the_policy_files() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    found = policy_rules_of(loaded)
    inline = loaded.workstation.policy.rules
    expected = [
        parse_line(text, file=INLINE_POLICY_FILE, line=number)
        for number, text in enumerate(inline, start=1)
    ]
    for name, text in loaded.policy_files:
        expected += parse_text(text, file=name)
    assert found == expected
    assert [rule.file for rule in found[: len(inline)]] == [INLINE_POLICY_FILE] * len(inline)
    assert {rule.file for rule in found[len(inline) :]} == {"30-office.policy"}


# ---- real graphviz -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_every_example_draws_with_graphviz(spec: Path) -> None:
    loaded = load(spec)
    ws = loaded.workstation
    svg = draw_svg(render_dot(ws, policy_rules_of(loaded)))
    nodes = groups(svg, "node")
    units = {**ws.compartments, **ws.disposable_templates}
    # Every box under a derived id, its name as the first line of its text, in its colours.
    boxes = {shown_text(g).split("\n")[0]: g for title, g in nodes.items() if title[0] == "c"}
    assert set(boxes) == set(units)
    for name, unit in units.items():
        fill, font = LABEL_COLOURS[unit.label]
        assert boxes[name].find(f"{SVG}path").get("fill") == fill  # type: ignore[union-attr]
        # graphviz leaves out the fill of black text: SVG draws text black by default.
        drawn_font = {t.get("fill", "black") for t in boxes[name].iter(f"{SVG}text")}
        assert drawn_font == {font}
        assert ("offline" in shown_text(boxes[name])) == (unit.network == "none")
    assert shown_text(nodes["uplink"]) == "uplink / internet"
    levels = {unit.isolation for unit in units.values()}
    assert set(groups(svg, "cluster")) == {f"cluster_{level}" for level in levels}


def test_office_example_has_its_policy_arrows_and_legend() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    svg = draw_svg(render_dot(loaded.workstation, policy_rules_of(loaded)))
    names = {
        title: shown_text(g).split("\n")[0]
        for title, g in groups(svg, "node").items()
        if title[0] == "c"
    }
    arrows = {
        (names[source], names[target]): shown_text(g)
        for title, g in groups(svg, "edge").items()
        for source, _, target in [title.partition("->")]
        if source in names and target in names and g.find(f"{SVG}text") is not None
    }
    assert arrows["work", "vault"] == "qnix.Filecopy (ask)\nqnix.Gpg (ask)\nqnix.SshAgent (ask)"
    assert arrows["work", "personal"] == "qnix.Filecopy (ask)"
    assert ("vault", "work") not in arrows  # the spec's inline deny comes first
    assert shown_text(groups(svg, "node")["legend"]).split("\n") == [
        LEGEND_TITLE,
        "qnix.OpenInDisposable (allow): @anyvm -> @dispvm:offline-dvm",
        "qnix.Clipboard (ask): @anyvm -> @anyvm",
        "qnix.OpenInDisposable (allow): @anyvm -> @dispvm",
    ]


# ---- escaping ------------------------------------------------------------------------------


def test_dot_string_escapes_exactly() -> None:
    assert dot_string('say "hi"') == '"say \\"hi\\""'
    assert dot_string("a\\nb") == '"a\\\\nb"'  # a backslash never starts a layout escape
    assert dot_string("x&lt;y &amp;") == '"x&amp;lt;y &amp;amp;"'  # no HTML entities
    assert dot_string("one\ntwo\r\x00\x1b[31m\u2028") == '"onetwo[31m"'
    assert dot_string("<b>bold</b>") == '"<b>bold</b>"'  # quoted: never an HTML label
    assert dot_lines(["a", 'b"'], end="l") == '"a\\lb\\"\\l"'
    assert dot_lines(["a", "b\\"]) == '"a\\nb\\\\"'


# Pieces DOT, graphviz labels, HTML-like labels, records and XML give a meaning to, mixed with
# any other character.
SPECIAL = ['"', "\\", "&", "&amp;", "&#60;", "\\N", "\\G", "\\l", "<", ">", "{", "|", "}"]
SPECIAL += ["[", "]", ";", "=", "->", "--", " ", "  ", "\n", "\r", "\t", "\x00", "]]>", "/*"]
HOSTILE = st.lists(st.one_of(st.sampled_from(SPECIAL), st.characters()), max_size=20).map("".join)


@settings(max_examples=40, deadline=None)
@given(st.lists(HOSTILE, min_size=1, max_size=30))
def test_hostile_labels_keep_the_graph_and_show_as_written(labels: list[str]) -> None:
    """Any text as a label: graphviz parses it, the node count is unchanged, and each node
    shows exactly its text minus the characters that cannot be printed."""
    body = "".join(f"  n{i} [label={dot_string(text)}];\n" for i, text in enumerate(labels))
    svg = draw_svg(f"digraph g {{\n{body}}}\n")
    nodes = groups(svg, "node")
    assert sorted(nodes) == sorted(f"n{i}" for i in range(len(labels)))
    for i, text in enumerate(labels):
        assert shown_text(nodes[f"n{i}"]) == "".join(ch for ch in text if ch.isprintable())


@settings(max_examples=25, deadline=None)
@given(st.lists(HOSTILE, min_size=1, max_size=8))
@example(["*", ""])  # a rule for every service hides the rules behind it
def test_hostile_rule_text_reaches_the_drawing_only_as_text(services: list[str]) -> None:
    """Rules built without the parser (any service text): still one arrow, still the same boxes."""
    policy = [
        Rule(service, "*", Token("name", "work"), Token("name", "vault"), "ask", (), "t", number)
        for number, service in enumerate(dict.fromkeys(services), start=1)
    ]
    svg = draw_svg(render_dot(tiny(), policy))
    assert len(groups(svg, "node")) == 5  # four boxes and the uplink
    arrows = [g for g in groups(svg, "edge").values() if g.find(f"{SVG}text") is not None]
    assert len(arrows) == 1
    # First match wins: a rule for service "*" decides every request after it, so the rules
    # behind it are never drawn.
    drawn = []
    for rule in policy:
        drawn.append(rule)
        if rule.service == "*":
            break
    printable = ["".join(ch for ch in rule.service if ch.isprintable()) for rule in drawn]
    assert shown_text(arrows[0]) == "\n".join(f"{text} (ask)" for text in printable)
