"""The graph: label colours, clusters by isolation level, network edges, first-match policy."""

from __future__ import annotations

import subprocess
from xml.etree import ElementTree

from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.compile.graph import LABEL_COLOURS, dot_string, policy_rules_of, render_dot
from qnix.policy.parse import parse_line
from qnix.spec.load import load
from qnix.spec.model import Workstation
from tests.conftest import EXAMPLES, need

SVG = "{http://www.w3.org/2000/svg}"


def tiny() -> Workstation:
    return Workstation.model_validate(
        {
            "host": {"hostname": "t"},
            "compartments": {
                "net": {"network": "uplink", "provides_network": True, "label": "red"},
                "work": {"network": "net", "label": "blue", "tags": ["office"]},
                "vault": {"label": "black", "isolation": "container", "tags": ["office"]},
            },
        }
    )


def rules(*lines: str) -> list:  # type: ignore[type-arg]
    return [parse_line(line, file="t", line=i) for i, line in enumerate(lines, start=1)]


def test_exact_dot_for_a_tiny_workstation() -> None:
    dot = render_dot(
        tiny(), rules("qnix.Gpg * work vault ask", "qnix.Filecopy * @anyvm @anyvm deny")
    )
    assert dot == (
        'digraph "t" {\n'
        '  graph [rankdir=LR, fontname=sans, compound=true, label="t (x86_64-linux, strict)"];\n'
        '  node [shape=box, style="rounded,filled", fontname=sans];\n'
        "  edge [fontname=sans, fontsize=10];\n"
        '  uplink [label="uplink / internet", shape=cloud, fillcolor="#eeeeec"];\n'
        "  subgraph cluster_namespace {\n"
        '    label="namespace (bubblewrap)"; style=dashed; color="#888a85";\n'
        '    c0 [label="net\\nnet compartment", fillcolor="#cc0000", fontcolor="white", '
        'style="rounded,filled"];\n'
        '    c2 [label="work", fillcolor="#3465a4", fontcolor="white", style="rounded,filled"];\n'
        "  }\n"
        "  subgraph cluster_container {\n"
        '    label="container (systemd-nspawn)"; style=dashed; color="#888a85";\n'
        '    c1 [label="vault\\noffline", fillcolor="#000000", fontcolor="white", '
        'style="rounded,filled"];\n'
        "  }\n"
        '  c0 -> uplink [penwidth=2, color="#2e3436"];\n'
        '  c2 -> c0 [penwidth=2, color="#2e3436"];\n'
        '  c2 -> c1 [style=dashed, constraint=false, color="#c4a000", fontcolor="#c4a000", '
        'label="qnix.Gpg (ask)"];\n'
        "}\n"
    )


def test_only_the_deciding_line_is_drawn() -> None:
    dot = render_dot(
        tiny(),
        rules("qnix.Filecopy * vault @anyvm deny", "qnix.Filecopy * @tag:office @tag:office allow"),
    )
    assert "c2 -> c1" in dot  # work -> vault: the allow line decides
    assert "c1 -> c2" not in dot  # vault -> work: the deny line came first


def test_wildcard_lines_go_to_the_legend_not_a_mesh() -> None:
    dot = render_dot(tiny(), rules("qnix.Clipboard * @anyvm @anyvm ask"))
    assert "qnix.Clipboard (ask): @anyvm -> @anyvm" in dot
    assert "style=dashed, constraint" not in dot


def test_office_example_draws_with_graphviz() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    dot = render_dot(loaded.workstation, policy_rules_of(loaded))
    svg = subprocess.run(
        [need("dot"), "-Tsvg"], input=dot, capture_output=True, text=True, check=True
    ).stdout
    root = ElementTree.fromstring(svg)
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert set(loaded.workstation.compartments) <= texts
    clusters = {
        g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class") == "cluster"
    }
    assert clusters == {"cluster_namespace", "cluster_container"}
    fills = {p.get("fill") for p in root.iter(f"{SVG}path")} | {
        p.get("fill") for p in root.iter(f"{SVG}polygon")
    }
    for compartment in loaded.workstation.compartments.values():
        assert LABEL_COLOURS[compartment.label][0] in fills


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=30))
def test_hostile_labels_cannot_change_the_graph(labels: list[str]) -> None:
    """Any text as a label: graphviz still parses it and the node count is unchanged."""
    body = "".join(f"  n{i} [label={dot_string(text)}];\n" for i, text in enumerate(labels))
    result = subprocess.run(
        [need("dot"), "-Tsvg"], input=f"digraph g {{\n{body}}}\n", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    nodes = [
        g for g in ElementTree.fromstring(result.stdout).iter(f"{SVG}g") if g.get("class") == "node"
    ]
    assert len(nodes) == len(labels)
