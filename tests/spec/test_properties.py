"""Properties: the model does not depend on the order a spec is written in, and no hostile
string gets through as a name or a path."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qnix.compile.inputs import load
from qnix.errors import SpecError
from qnix.spec import model
from qnix.spec.document import parse_document
from qnix.spec.model import Workstation
from tests.conftest import EXAMPLES

AGE_KEY = "age14etvufpqjyhty3mmt88xdph427sglwpa699jkxhe3m9n9vrssg5st08shd"

# ---- order independence ----------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True).filter(
    lambda n: n not in model.RESERVED_NAMES
)
firewalls = st.sampled_from(
    [
        [],
        [{"dns": True}, {"proto": "tcp", "cidr": "0.0.0.0/0", "ports": [443, "80"]}],
        [{"proto": "udp", "host": "ntp.example.org", "ports": ["123"], "comment": "time"}],
    ]
)
compartment_bodies = st.fixed_dictionaries(
    {},
    optional={
        "label": st.sampled_from(["red", "blue", "green"]),
        "isolation": st.sampled_from(["namespace", "container", "vm"]),
        "memory_mb": st.integers(64, 8192),
        "packages": st.lists(st.sampled_from(["firefox", "gimp", "vim"]), unique=True),
        "tags": st.lists(st.sampled_from(["work", "trusted", "web"]), unique=True),
        "autostart": st.booleans(),
        "persistent_paths": st.lists(st.sampled_from(["/home/user/a", "/srv/b"]), unique=True),
    },
).flatmap(
    lambda body: firewalls.map(
        lambda rules: {**body, "network": "uplink", "firewall": rules} if rules else body
    )
)
documents = st.fixed_dictionaries(
    {
        "host": st.just({"hostname": "h", "timezone": "Europe/Berlin"}),
        "compartments": st.dictionaries(names, compartment_bodies, min_size=1, max_size=6),
        "secrets": st.dictionaries(
            names, names.map(lambda n: {"file": f"{n}.age", "recipients": [AGE_KEY]}), max_size=4
        ),
    }
)


def toml_value(value: Any) -> str:
    """TOML for the plain data above; a JSON string literal is a TOML basic string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    pairs = (f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items())
    return "{ " + ", ".join(pairs) + " }"


def toml_document(document: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {toml_value(value)}\n" for key, value in document.items())


def permuted(mapping: dict[str, Any], order: Iterable[str]) -> dict[str, Any]:
    return {key: mapping[key] for key in order}


@settings(max_examples=60, deadline=None)
@given(document=documents, data=st.data())
def test_order_of_compartments_keys_and_secrets_does_not_matter(
    document: dict[str, Any], data: st.DataObject
) -> None:
    compartments = document["compartments"]
    shuffled_compartments = {
        name: permuted(body, data.draw(st.permutations(list(body))))
        for name, body in permuted(
            compartments, data.draw(st.permutations(list(compartments)))
        ).items()
    }
    shuffled = permuted(
        {
            **document,
            "compartments": shuffled_compartments,
            "secrets": permuted(
                document["secrets"], data.draw(st.permutations(list(document["secrets"])))
            ),
        },
        data.draw(st.permutations(list(document))),
    )
    readings = [
        parse_document(Path("original.json"), json.dumps(document).encode()),
        parse_document(Path("shuffled.json"), json.dumps(shuffled).encode()),
        parse_document(Path("shuffled.toml"), toml_document(shuffled).encode()),
    ]
    models = [Workstation.model_validate(reading) for reading in readings]
    assert models[0] == models[1] == models[2]
    assert len({m.model_dump_json().encode() for m in models}) == 1
    assert list(models[0].compartments) == sorted(compartments)
    assert list(models[0].secrets) == sorted(document["secrets"])


def test_lists_keep_their_order() -> None:
    rules = [{"dns": True}, {"proto": "tcp", "cidr": "192.0.2.0/24", "ports": [443]}]
    policy = ["qnix.Filecopy * a a deny", "qnix.Filecopy * a a allow"]

    def workstation(firewall: list[Any], policy_rules: list[str]) -> Workstation:
        return Workstation.model_validate(
            {
                "host": {"hostname": "h"},
                "compartments": {"a": {"network": "uplink", "firewall": firewall}},
                "policy": {"rules": policy_rules},
            }
        )

    original = workstation(rules, policy)
    assert workstation(rules[::-1], policy) != original
    assert workstation(rules, policy[::-1]) != original
    assert original.compartments["a"].firewall[0].dns is True
    assert original.policy.rules == tuple(policy)


# ---- hostile strings -------------------------------------------------------------------------

# Characters that must never reach a name, and that a path may hold only as its separator.
NEVER = ("..", '"', "'", "$", ";", "`", "\\", "\x00")
NASTY = "aZ09-_./ \t\n$;'\"`\\\x00é\u202e\u2028%*:@+~"


def safe_name(value: str) -> bool:
    return "/" not in value and safe_text(value)


def safe_text(value: str) -> bool:
    return not any(bad in value for bad in NEVER) and not any(ch.isspace() for ch in value)


def safe_absolute_path(value: str) -> bool:
    if value == "/":
        return True
    parts = value.split("/")
    return (
        parts[0] == ""
        and all(part not in ("", ".", "..") for part in parts[1:])
        and safe_text(value)
    )


def safe_relative_path(value: str) -> bool:
    return all(part not in ("", ".", "..") for part in value.split("/")) and safe_text(value)


@dataclass(frozen=True)
class Place:
    """Where a hostile string goes in a spec, and how to read it back from the model."""

    pattern: str | None  # the documented pattern; None for paths
    safe: Callable[[str], bool]
    spec: Callable[[str], dict[str, Any]]
    read: Callable[[Workstation], Iterable[str]]
    max_length: int = 1024

    def documented(self, value: str) -> bool:
        """Of the shape the model's documentation promises to accept."""
        shape = self.pattern is None or re.fullmatch(self.pattern, value) is not None
        return shape and len(value) <= self.max_length


def _compartment(**body: Any) -> dict[str, Any]:
    return {"compartments": {"a": body}}


PLACES = {
    "compartment": Place(
        model.COMPARTMENT_NAME_RE,
        safe_name,
        lambda v: {"compartments": {v: {}}},
        lambda ws: ws.compartments,
    ),
    "template": Place(
        model.COMPARTMENT_NAME_RE,
        safe_name,
        lambda v: {"disposable_templates": {v: {}}},
        lambda ws: ws.disposable_templates,
    ),
    "tag": Place(
        model.TAG_RE,
        safe_name,
        lambda v: _compartment(tags=[v]),
        lambda ws: ws.compartments["a"].tags,
    ),
    "package": Place(
        model.PACKAGE_RE,
        safe_name,
        lambda v: _compartment(packages=[v]),
        lambda ws: ws.compartments["a"].packages,
    ),
    "app": Place(
        model.APP_RE,
        safe_name,
        lambda v: _compartment(apps=[v]),
        lambda ws: ws.compartments["a"].apps,
        model.APP_MAX_LENGTH,
    ),
    "user": Place(
        model.UNIX_USER_RE,
        safe_name,
        lambda v: _compartment(user=v),
        lambda ws: [ws.compartments["a"].user],
    ),
    "secret": Place(
        model.SECRET_NAME_RE,
        safe_name,
        lambda v: {"secrets": {v: {"file": "vpn.age", "recipients": [AGE_KEY]}}},
        lambda ws: ws.secrets,
    ),
    "hostname": Place(
        model.HOSTNAME_RE,
        safe_name,
        lambda v: {"host": {"hostname": v}},
        lambda ws: [ws.host.hostname],
    ),
    "timezone": Place(
        r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$",
        safe_relative_path,
        lambda v: {"host": {"hostname": "h", "timezone": v}},
        lambda ws: [ws.host.timezone],
    ),
    "persistent path": Place(
        None,
        safe_absolute_path,
        lambda v: _compartment(persistent_paths=[v]),
        lambda ws: ws.compartments["a"].persistent_paths,
    ),
    "aide path": Place(
        None,
        safe_absolute_path,
        lambda v: {"audit": {"aide_paths": [v]}},
        lambda ws: ws.audit.aide_paths,
    ),
}


def hostile(pattern: str | None) -> st.SearchStrategy[str]:
    shapes = [st.text(max_size=40), st.text(alphabet=NASTY, max_size=40)]
    if pattern is not None:
        shapes.append(st.from_regex(pattern, fullmatch=True))
    else:
        shapes.append(paths("/"))
    return st.one_of(shapes)


def paths(start: str) -> st.SearchStrategy[str]:
    """Mostly plausible paths, some components of them hostile."""
    components = st.one_of(
        st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True),
        st.text(alphabet=NASTY, max_size=6),
    )
    return st.lists(components, max_size=5).map(lambda parts: start + "/".join(parts))


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile")
    shutil.copy(EXAMPLES / "secrets" / "work-vpn.age", directory / "vpn.age")
    return directory / "spec.json"


@pytest.mark.parametrize("place", list(PLACES), ids=str)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_hostile_strings_are_refused_or_safe(
    place: str, spec_file: Path, data: st.DataObject
) -> None:
    where = PLACES[place]
    value = data.draw(hostile(where.pattern), label="value")
    spec_file.write_text(json.dumps({"host": {"hostname": "h"}, **where.spec(value)}))
    try:
        workstation = load(spec_file).workstation
    except SpecError as error:
        event("refused")
        assert error.problems, "refused without saying why"
        if where.pattern is not None and where.documented(value):
            # A name of the documented shape is refused only for being reserved.
            assert value in model.RESERVED_NAMES, error.render()
        return
    event("accepted")
    (accepted,) = list(where.read(workstation))
    assert accepted == value
    assert where.safe(accepted), accepted
    assert where.documented(accepted), accepted


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.text(max_size=30), st.text(alphabet=NASTY, max_size=30), paths("")))
def test_hostile_relative_paths_are_refused_or_safe(value: str) -> None:
    readers: list[Callable[[str], str | None]] = [
        lambda v: model.Policy.model_validate({"dir": v}).dir,
        lambda v: model.Secret.model_validate({"file": v, "recipients": [AGE_KEY]}).file,
    ]
    for read in readers:
        try:
            accepted = read(value)
        except pydantic.ValidationError:
            event("refused")
            continue
        event("accepted")
        assert accepted == value
        assert safe_relative_path(value), value
