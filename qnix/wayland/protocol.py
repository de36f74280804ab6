"""Interfaces, requests, events and their argument signatures, read from protocol XML files.

The files are the ones libwayland (wayland.xml) and wayland-protocols ship; nothing here is
typed in by hand, so a message the filter decodes is laid out exactly as the compositor
expects it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from qnix.errors import QnixError

ARG_TYPES = frozenset({"int", "uint", "fixed", "string", "object", "new_id", "array", "fd"})


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str
    # The interface an object or new_id names; None for an untyped new_id (wl_registry.bind),
    # which carries interface name and version on the wire before the id.
    interface: str | None = None
    allow_null: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    args: tuple[Arg, ...]
    since: int = 1
    destructor: bool = False

    @property
    def new_id_interface(self) -> str | None:
        """The interface of the object this message creates with a typed new_id, if any."""
        for arg in self.args:
            if arg.type == "new_id":
                return arg.interface
        return None


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    version: int
    requests: tuple[Message, ...]
    events: tuple[Message, ...]

    def request(self, name: str) -> int:
        return _opcode(self.requests, name, self.name)

    def event(self, name: str) -> int:
        return _opcode(self.events, name, self.name)


def _opcode(messages: tuple[Message, ...], name: str, interface: str) -> int:
    for opcode, message in enumerate(messages):
        if message.name == name:
            return opcode
    raise QnixError(f"the Wayland interface {interface} has no message {name}")


Protocols = dict[str, Interface]


def _message(element: ElementTree.Element, file: Path) -> Message:
    args = []
    for arg in element.findall("arg"):
        kind = arg.get("type", "")
        if kind not in ARG_TYPES:
            raise QnixError(f"{file}: argument type {kind!r} is not a Wayland type")
        args.append(
            Arg(
                name=arg.get("name", ""),
                type=kind,
                interface=arg.get("interface"),
                allow_null=arg.get("allow-null") == "true",
            )
        )
    return Message(
        name=element.get("name", ""),
        args=tuple(args),
        since=int(element.get("since", "1")),
        destructor=element.get("type") == "destructor",
    )


def parse_file(path: Path) -> Protocols:
    """The interfaces of one protocol XML file."""
    try:
        root = ElementTree.parse(path).getroot()  # noqa: S314 - the system's own protocol files
    except (OSError, ElementTree.ParseError) as exc:
        raise QnixError(
            f"cannot read the Wayland protocol file {path}: {exc}",
            hint="install wayland-protocols and libwayland-dev (wayland.xml)",
        ) from exc
    interfaces: Protocols = {}
    for element in root.findall("interface"):
        name = element.get("name", "")
        interfaces[name] = Interface(
            name=name,
            version=int(element.get("version", "1")),
            requests=tuple(_message(m, path) for m in element.findall("request")),
            events=tuple(_message(m, path) for m in element.findall("event")),
        )
    return interfaces


def load(files: list[Path]) -> Protocols:
    """Every interface of the given files; an interface defined twice is refused."""
    interfaces: Protocols = {}
    for file in files:
        for name, interface in parse_file(file).items():
            if name in interfaces:
                raise QnixError(f"the Wayland interface {name} is defined twice (in {file})")
            interfaces[name] = interface
    return interfaces


def data_dirs(environ: dict[str, str]) -> list[Path]:
    """Where protocol files are looked for: XDG_DATA_DIRS (NixOS profiles set it), else the
    XDG default."""
    dirs = environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    return [Path(d) for d in dirs.split(":") if d]


def protocol_files(data_dirs: list[Path], wanted: tuple[str, ...]) -> list[Path]:
    """wayland.xml and the `wanted` wayland-protocols files (paths below wayland-protocols/),
    each from the first data directory that holds it (the XDG_DATA_DIRS order)."""
    files = []
    for relative in ("wayland/wayland.xml", *(f"wayland-protocols/{w}" for w in wanted)):
        found = next((d / relative for d in data_dirs if (d / relative).is_file()), None)
        if found is None:
            raise QnixError(
                f"cannot find the Wayland protocol file {relative} under"
                f" {', '.join(map(str, data_dirs))}",
                hint="install libwayland-dev (wayland.xml) and wayland-protocols",
            )
        files.append(found)
    return files
