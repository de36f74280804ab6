"""Openings from the policy (`qnix.Net`): expansion, first-match order, strict arguments, the
elements they become in the one table both outputs share, and `nft -c` accepting them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.cli.main import cli
from qnix.compile import names, nft
from qnix.compile.artifacts import RULESET, compile_spec
from qnix.compile.inputs import load
from qnix.compile.openings import (
    CompiledOpenings,
    Opening,
    compile_openings,
    for_spec,
    parse_argument,
)
from qnix.errors import SpecError
from qnix.policy.evaluate import evaluate, system_from_workstation
from qnix.policy.load import load_policy_files
from qnix.policy.parse import Policy, PolicyError
from qnix.spec.load import LoadedSpec
from qnix.spec.model import Workstation
from tests.compile.test_nft import nft_check, parse

POLICY_FILE = "30-net.policy"

# sys-net routes work; vault has no network; scratch is a disposable compartment (a DispVM
# with a fixed link); dvm is a disposable template (no address until one starts).
WORKSTATION = {
    "default_disposable": "dvm",
    "host": {"hostname": "lab", "subnet": "10.203.0.0/16"},
    "compartments": {
        "sys-net": {"network": "uplink", "provides_network": True},
        "work": {"network": "sys-net", "tags": ["office"]},
        "mail": {"network": "uplink", "tags": ["office"]},
        "printer": {"network": "uplink", "tags": ["devices"]},
        "vault": {"tags": ["office"]},
        "scratch": {"network": "uplink", "persistence": "disposable"},
    },
    "disposable_templates": {"dvm": {"network": "uplink"}},
}
# names.allocate_links of the names above in 10.203.0.0/16: the compartment side of each /31.
ADDRESS = {
    "mail": "10.203.46.115",
    "printer": "10.203.152.47",
    "scratch": "10.203.157.75",
    "sys-net": "10.203.242.25",
    "work": "10.203.94.171",
}


def workstation() -> Workstation:
    return Workstation.model_validate(WORKSTATION)


def opened(text: str) -> CompiledOpenings:
    ws = workstation()
    policy = load_policy_files({POLICY_FILE: text})
    return compile_openings(ws, policy, system_from_workstation(ws))


def at(line: int) -> str:
    return f"{POLICY_FILE}:{line}"


def warning(line: int, message: str) -> PolicyError:
    return PolicyError(POLICY_FILE, line, message)


# ---- expansion and order ----------------------------------------------------------------------


def test_tags_wildcards_and_names_expand_to_exact_pairs() -> None:
    compiled = opened(
        "qnix.Net +tcp+631 @tag:office printer allow\n"
        "qnix.Net +tcp+8080 mail work deny\n"
        "qnix.Net +tcp+8080 @anyvm work allow\n"
        "qnix.Net +udp+53 work sys-net allow\n"
        "qnix.Net +tcp+22 @type:DispVM mail allow\n"
    )
    assert compiled.errors == ()
    assert compiled.warnings == ()
    assert [(o.source, o.target, o.proto, o.port, o.rule) for o in compiled.openings] == [
        ("mail", "printer", "tcp", 631, at(1)),
        ("printer", "work", "tcp", 8080, at(3)),
        ("scratch", "mail", "tcp", 22, at(5)),
        ("scratch", "work", "tcp", 8080, at(3)),
        ("sys-net", "work", "tcp", 8080, at(3)),
        ("work", "printer", "tcp", 631, at(1)),
        ("work", "sys-net", "udp", 53, at(4)),
    ]
    assert nft.opening_elements(workstation(), compiled.openings) == [
        "10.203.46.115 . 10.203.152.47 . tcp . 631",
        "10.203.152.47 . 10.203.94.171 . tcp . 8080",
        "10.203.157.75 . 10.203.46.115 . tcp . 22",
        "10.203.157.75 . 10.203.94.171 . tcp . 8080",
        "10.203.242.25 . 10.203.94.171 . tcp . 8080",
        "10.203.94.171 . 10.203.152.47 . tcp . 631",
        "10.203.94.171 . 10.203.242.25 . udp . 53",
    ]


def test_a_deny_line_before_an_allow_line_wins() -> None:
    allow = "qnix.Net +tcp+22 work printer allow\n"
    deny = "qnix.Net +tcp+22 @anyvm @anyvm deny\n"
    assert opened(deny + allow) == CompiledOpenings(
        (), (), (warning(2, "opens nothing: earlier lines decide every pair it covers"),)
    )
    assert opened(allow + deny).openings == (Opening("work", "printer", "tcp", 22),)


def test_a_wildcard_service_line_decides_too() -> None:
    """`* * ... deny` covers qnix.Net as it covers every service; an earlier `qnix.Net *`
    allow decides for every port a later line names."""
    compiled = opened("* * @anyvm @anyvm deny\nqnix.Net +tcp+22 work printer allow\n")
    assert compiled.openings == ()
    compiled = opened("qnix.Net * work @anyvm allow\nqnix.Net +udp+9 work printer allow\n")
    assert compiled.openings == (Opening("work", "printer", "udp", 9),)
    assert [o.rule for o in compiled.openings] == [at(1)]
    assert compiled.warnings == (
        warning(
            1, "qnix.Net with the argument * opens nothing; name one port: +tcp+PORT or +udp+PORT"
        ),
        warning(2, "opens nothing: earlier lines decide every pair it covers"),
    )


def test_other_ports_and_protocols_are_separate_requests() -> None:
    compiled = opened(
        "qnix.Net +tcp+80 work printer deny\n"
        "qnix.Net +udp+80 work printer allow\n"
        "qnix.Net +tcp+81 work printer allow\n"
        "qnix.Net +tcp+80 work printer allow\n"
    )
    assert [(o.proto, o.port) for o in compiled.openings] == [("tcp", 81), ("udp", 80)]


def test_what_cannot_open_is_skipped_with_a_warning() -> None:
    compiled = opened(
        "qnix.Net +tcp+22 work vault allow\n"
        "qnix.Net +tcp+22 work @dispvm allow\n"
        "qnix.Net +tcp+22 dvm work allow\n"
        "qnix.Net +tcp+22 work @adminvm allow\n"
        "qnix.Net +tcp+22 work mail ask\n"
        "qnix.Net +tcp+22 work mail allow target=printer\n"
        "qnix.Net +tcp+23 work mail allow autostart=no\n"
        "qnix.Net +tcp+24 @tag:devices @tag:devices allow\n"
        "qnix.Net +tcp+25 @anyvm @anyvm allow\n"
    )
    assert compiled.errors == ()
    assert compiled.warnings == (
        warning(1, 'vault has no network (network = "none"); nothing opens for it'),
        warning(
            2,
            "disposables get their address when they start; openings to or from them "
            "are not supported, the target @dispvm is skipped",
        ),
        warning(
            3,
            "disposables get their address when they start; openings to or from them "
            "are not supported, the source dvm is skipped",
        ),
        warning(
            4,
            "the host (@adminvm) is never reachable over the compartments' links; "
            "nothing opens for the target @adminvm",
        ),
        warning(
            5,
            "ask opens nothing for qnix.Net: no one can be asked when a packet arrives; use allow",
        ),
        warning(6, "target= cannot redirect packets; this line opens nothing"),
        warning(7, "autostart=no: nothing runs at build time, so this line opens nothing"),
        warning(8, "covers no pair of compartments with a network; it opens nothing"),
    )
    # Line 9 opens every pair of compartments with a network, and nothing to or from vault.
    pairs = {(o.source, o.target) for o in compiled.openings}
    assert {o.port for o in compiled.openings} == {25}
    assert pairs == {(s, t) for s in ADDRESS for t in ADDRESS if s != t}


# ---- strict arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        "+tcp+0",
        "+tcp+65536",
        "+tcp+08080",
        "+TCP+80",
        "+icmp+1",
        "+tcp",
        "+tcp+",
        "+tcp+80+81",
        "+tcp-80",
        "+80",
        "+",
        "+udp+99999",
        "+tcp+1.5",
    ],
)
def test_a_malformed_argument_is_an_error_and_opens_nothing(argument: str) -> None:
    compiled = opened(f"qnix.Net +tcp+22 work printer allow\nqnix.Net {argument} work mail allow\n")
    message = (
        f"bad qnix.Net argument {argument!r}: use +tcp+PORT or +udp+PORT, PORT 1 to 65535 "
        "without leading zeros"
    )
    assert compiled == CompiledOpenings((), (PolicyError(POLICY_FILE, 2, message),), ())


@pytest.mark.parametrize(
    ("argument", "parsed"),
    [("+tcp+1", ("tcp", 1)), ("+udp+65535", ("udp", 65535)), ("+tcp+8080", ("tcp", 8080))],
)
def test_well_formed_arguments(argument: str, parsed: tuple[str, int]) -> None:
    assert parse_argument(argument) == parsed


SPEC = """\
[host]
hostname = "lab"
subnet = "10.203.0.0/16"

[compartments.work]
network = "uplink"

[compartments.printer]
network = "uplink"

[policy]
rules = [
  "qnix.Net +tcp+631 work printer allow",
  "qnix.Net +tcp+70000 work printer allow",
]
"""


BAD_PORT = "use +tcp+PORT or +udp+PORT, PORT 1 to 65535 without leading zeros"


def _unchecked(spec_file: Path, policy_files: tuple[tuple[str, str], ...] = ()) -> LoadedSpec:
    """The spec as the build would get it had the loader's reference check not run."""
    raw = spec_file.read_bytes()
    workstation = Workstation.model_validate(tomllib.loads(raw.decode()))
    return LoadedSpec(spec_file, raw, workstation, policy_files)


def test_check_and_build_refuse_a_malformed_argument_naming_where(tmp_path: Path) -> None:
    """The loader (`qnix check`, and the build's own load) refuses it with the rule shown; the
    build refuses it again if handed a spec that skipped the loader's checks."""
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SPEC)
    with pytest.raises(SpecError) as raised:
        load(spec_file)
    assert [p.render() for p in raised.value.problems] == [
        f"{spec_file}: policy.rules[1]: bad qnix.Net argument '+tcp+70000': {BAD_PORT} "
        '(got "qnix.Net +tcp+70000 work printer allow")'
    ]
    with pytest.raises(SpecError) as raised:
        compile_spec(_unchecked(spec_file))
    assert [p.render() for p in raised.value.problems] == [
        f"{spec_file}: policy.rules[1]: bad qnix.Net argument '+tcp+70000': {BAD_PORT}"
    ]

    folder = tmp_path / "policy.d"
    folder.mkdir()
    policy_text = "# printers\nqnix.Net +udp+0 work printer allow\n"
    (folder / "30-net.policy").write_text(policy_text)
    spec = SPEC.replace('  "qnix.Net +tcp+70000 work printer allow",\n', "")
    spec_file.write_text(spec.replace("[policy]\n", '[policy]\ndir = "policy.d"\n'))
    with pytest.raises(SpecError) as raised:
        load(spec_file)
    assert [p.render() for p in raised.value.problems] == [
        f"{spec_file}: policy.dir: 30-net.policy:2: bad qnix.Net argument '+udp+0': {BAD_PORT} "
        '(got "qnix.Net +udp+0 work printer allow")'
    ]
    with pytest.raises(SpecError) as raised:
        compile_spec(_unchecked(spec_file, (("30-net.policy", policy_text),)))
    assert [p.render() for p in raised.value.problems] == [
        f"{spec_file}: policy.dir: 30-net.policy:2: bad qnix.Net argument '+udp+0': {BAD_PORT}"
    ]


def test_a_colon_is_no_policy_argument(tmp_path: Path) -> None:
    """Qubes' argument characters are letters, digits and `_.+-`: `+tcp:8080` is refused by
    the policy parser itself, which is why openings are written `+tcp+8080`."""
    (tmp_path / "spec.toml").write_text(SPEC.replace("+tcp+70000", "+tcp:8080"))
    with pytest.raises(SpecError) as raised:
        load(tmp_path / "spec.toml")
    assert [p.message for p in raised.value.problems] == [
        "bad argument '+tcp:8080': use * or +ARGUMENT"
    ]


# ---- the same answer as `qnix policy check` ---------------------------------------------------

SOURCES = (
    "@anyvm",
    "*",
    "work",
    "mail",
    "printer",
    "scratch",
    "vault",
    "dvm",
    "@tag:office",
    "@tag:devices",
    "@type:AppVM",
    "@type:DispVM",
    "@adminvm",
)
TARGETS = (*SOURCES, "@dispvm", "@dispvm:dvm")
ARGUMENTS = ("+tcp+80", "+tcp+81", "+udp+80", "*")
LINES = st.builds(
    lambda service, argument, source, target, action: (
        f"{service} {'*' if service == '*' else argument} {source} {target} {action}"
    ),
    st.sampled_from(("qnix.Net", "qnix.Net", "qnix.Net", "*")),
    st.sampled_from(ARGUMENTS),
    st.sampled_from(SOURCES),
    st.sampled_from(TARGETS),
    st.sampled_from(("allow", "allow", "deny", "ask")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(LINES, min_size=1, max_size=8))
def test_openings_are_exactly_what_the_policy_engine_allows(lines: list[str]) -> None:
    """Against brute force: for each qnix.Net allow line naming a port, every ordered pair
    of compartments with a network that the line matches on its own opens if and only if
    `evaluate` allows it under the whole policy (wildcard lines can decide, never add)."""
    ws = workstation()
    policy = load_policy_files({POLICY_FILE: "\n".join(lines) + "\n"})
    system = system_from_workstation(ws)
    compiled = compile_openings(ws, policy, system)
    expected = set()
    for rule in policy.rules:
        parsed = parse_argument(rule.argument)
        if rule.service != "qnix.Net" or rule.action != "allow" or parsed is None:
            continue
        for source in ADDRESS:
            for target in ADDRESS:
                request = {
                    "untrusted_service": "qnix.Net",
                    "untrusted_argument": rule.argument,
                    "source": source,
                    "untrusted_target": target,
                }
                alone = evaluate(Policy((rule,)), system, **request)
                if alone.reason == "no policy line matches" or source == target:
                    continue
                decision = evaluate(policy, system, **request)
                if decision.action == "allow" and decision.target == target:
                    expected.add((source, target, *parsed, decision.rule))
    assert {(o.source, o.target, o.proto, o.port, o.rule) for o in compiled.openings} == expected


def test_the_cli_policy_check_agrees(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("+tcp+70000 work printer allow", "+tcp+631 @anyvm printer deny"))
    assert for_spec(load(spec)).openings == (Opening("work", "printer", "tcp", 631),)
    runner = CliRunner()
    for call, source, target, code in (
        ("qnix.Net+tcp+631", "work", "printer", 0),
        ("qnix.Net+tcp+631", "printer", "work", 1),
        ("qnix.Net+tcp+632", "work", "printer", 1),
    ):
        result = runner.invoke(cli, ["policy", "check", "--spec", str(spec), call, source, target])
        assert result.exit_code == code, result.output


# ---- in the table, for nft and for NixOS -------------------------------------------------------


def test_openings_fill_the_set_in_both_outputs_and_pass_nft_check(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("+tcp+70000 work printer allow", "+udp+5353 printer work allow"))
    loaded = load(spec)
    ws = loaded.workstation
    files = compile_spec(loaded).files
    ruleset = files[RULESET].decode()
    openings = for_spec(loaded).openings
    body = nft.render_table_body(ws, openings)
    assert ruleset == nft.render_ruleset(ws, openings) == f"table inet qnix {{\n{body}}}\n"
    links = {
        name: link.address
        for name, link in names.allocate_links(ws.compartments, ws.host.subnet).items()
    }
    assert parse(ruleset).sets["openings"] == [
        f"{links['printer']} . {links['work']} . udp . 5353",
        f"{links['work']} . {links['printer']} . tcp . 631",
    ]
    # The NixOS network module carries the very same table body.
    holders = [
        path for path, data in files.items() if path.endswith(".nix") and b"openings" in data
    ]
    assert len(holders) == 1
    nix_text = files[holders[0]].decode()
    for element in parse(ruleset).sets["openings"]:
        assert element in nix_text
    nft_check(ruleset, tmp_path)


def test_an_opening_must_name_compartments_with_a_network() -> None:
    ws = workstation()
    with pytest.raises(ValueError, match="no compartment with a network"):
        nft.opening_elements(ws, [Opening("work", "vault", "tcp", 22)])
    with pytest.raises(ValueError, match="not an opening"):
        nft.opening_elements(ws, [Opening("work", "mail", "tcp", 0)])
