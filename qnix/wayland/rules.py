"""What passes between one compartment's Wayland client and the compositor.

* Globals: the client is shown only those of ALLOWED_GLOBALS (at most the version the
  protocol files describe, so every later message can be decoded); a bind to a name it was
  not shown, with another interface or a higher version, ends the client. An allow-list,
  because a client can bind a global by guessing its number before the registry lists it.
* Windows: xdg_toplevel app ids become `qnix-<compartment>.<app>` and titles
  `[<compartment>] <title>`, from the moment the toplevel exists; fullscreen requests are
  dropped unless the compartment may go fullscreen.
* Clipboard (regular and primary selection): every source a client of this compartment makes
  also offers a marker type carrying this filter's secret; an offer the compositor sends
  without that marker came from another compartment or the host, and the client never sees
  what it holds: it gets the offer object without its types and an empty selection, and
  every request on it but destroy goes nowhere (the object itself must reach the client,
  whose ids for the compositor's objects may have no gap).
* `qnix clip` (regular clipboard): the filter knows which source of its clients is the
  compartment's current selection and can ask that client for its data (`copy`); a grant
  (`paste`) is shown to the compartment's clients on the next selection offer the compositor
  sends them, with the grant's types instead of the offer's, and the first `receive` on it is
  answered by the filter with the granted data; then the grant is gone. To make the
  compositor send that offer at once, the filter re-creates the client's data device (a
  release and a get_data_device with the same id, which sends the focused client the current
  selection); the compositor's delete_id for the released id is not passed on.
* Every message on the connection is decoded against its signature; anything else ends it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass, field

from qnix.wayland.protocol import Interface, Protocols
from qnix.wayland.wire import (
    DISPLAY_ID,
    Decoded,
    Fd,
    Objects,
    UntypedNewId,
    Value,
    WireError,
    encode,
    take_message,
)

# The wayland-protocols files the allowed globals come from (wayland.xml is always read).
PROTOCOL_FILES = (
    "stable/xdg-shell/xdg-shell.xml",
    "stable/viewporter/viewporter.xml",
    "stable/presentation-time/presentation-time.xml",
    "staging/fractional-scale/fractional-scale-v1.xml",
    "staging/xdg-activation/xdg-activation-v1.xml",
    "unstable/xdg-output/xdg-output-unstable-v1.xml",
    "unstable/xdg-decoration/xdg-decoration-unstable-v1.xml",
    "unstable/linux-dmabuf/linux-dmabuf-unstable-v1.xml",
    "unstable/primary-selection/primary-selection-unstable-v1.xml",
    "unstable/relative-pointer/relative-pointer-unstable-v1.xml",
    "unstable/pointer-constraints/pointer-constraints-unstable-v1.xml",
    "unstable/idle-inhibit/idle-inhibit-unstable-v1.xml",
)

# What a windowed app needs. Not here, on purpose: wlr screencopy / export-dmabuf (capture),
# virtual keyboard and pointer (injection), foreign-toplevel (listing windows), data-control
# (reading the clipboard without focus), layer-shell (drawing over other windows), input
# method and keyboard-shortcuts-inhibit (taking the keyboard), wl_shell (a toplevel without
# an app id to rewrite), wl_drm (dmabuf covers it).
ALLOWED_GLOBALS = frozenset(
    {
        "wl_compositor",
        "wl_subcompositor",
        "wl_shm",
        "wl_seat",
        "wl_output",
        "wl_data_device_manager",
        "xdg_wm_base",
        "zxdg_decoration_manager_v1",
        "zxdg_output_manager_v1",
        "wp_viewporter",
        "wp_presentation",
        "zwp_linux_dmabuf_v1",
        "zwp_primary_selection_device_manager_v1",
        "xdg_activation_v1",
        "zwp_relative_pointer_manager_v1",
        "zwp_pointer_constraints_v1",
        "zwp_idle_inhibit_manager_v1",
        "wp_fractional_scale_manager_v1",
    }
)

MARKER_PREFIX = "application/x-qnix-origin-"
APP_ID_UNNAMED = "app"
# A source's types the filter remembers (more are passed on, not remembered).
MAX_SOURCE_TYPES = 64
# What `qnix clip copy` takes from a source, best first: text, else its first type.
TEXT_TYPES = ("text/plain;charset=utf-8", "text/plain", "UTF8_STRING", "STRING", "TEXT")


@dataclass(frozen=True, slots=True)
class Clipboard:
    """The interfaces of one selection protocol."""

    manager: str
    create_source: str
    source: str
    device: str
    offer: str


CLIPBOARDS = (
    Clipboard(
        "wl_data_device_manager",
        "create_data_source",
        "wl_data_source",
        "wl_data_device",
        "wl_data_offer",
    ),
    Clipboard(
        "zwp_primary_selection_device_manager_v1",
        "create_source",
        "zwp_primary_selection_source_v1",
        "zwp_primary_selection_device_v1",
        "zwp_primary_selection_offer_v1",
    ),
)
SOURCES = {c.source for c in CLIPBOARDS}
DEVICES = {c.device for c in CLIPBOARDS}
OFFERS = {c.offer for c in CLIPBOARDS}
# The device events that hand the client an offer it may read from.
OFFER_EVENTS = frozenset({"selection", "enter"})


@dataclass(frozen=True, slots=True)
class Rules:
    compartment: str
    fullscreen: bool
    # The marker type this filter's clients' sources offer: MARKER_PREFIX + a secret.
    marker: str


def app_id(compartment: str, untrusted_app_id: str | None) -> str:
    """`qnix-<compartment>.<app>`: the app's own id with anything but [A-Za-z0-9_.-] dropped,
    so no id can end the prefix early or look like another compartment's."""
    app = re.sub(r"[^A-Za-z0-9_.-]", "", untrusted_app_id or "")[:64] or APP_ID_UNNAMED
    return f"qnix-{compartment}.{app}"


def title(compartment: str, untrusted_title: str | None) -> str:
    """`[<compartment>] <title>`, without control and format characters (a newline or a bidi
    override could make the rest read as another compartment's label)."""
    shown = "".join(
        c for c in (untrusted_title or "")[:500] if unicodedata.category(c) not in ("Cc", "Cf")
    )
    return f"[{compartment}] {shown}".rstrip()


Chunk = tuple[bytes, list[int]]


def clip_type(offered: list[str]) -> str | None:
    """The type `qnix clip copy` asks a source for: its best text type, else its first."""
    for wanted in TEXT_TYPES:
        if wanted in offered:
            return wanted
    return offered[0] if offered else None


@dataclass(frozen=True, slots=True)
class Grant:
    """`qnix clip paste`: data the compartment may receive once, offered as these types."""

    mime_types: tuple[str, ...]
    data: bytes


@dataclass(slots=True)
class Shared:
    """What the sessions of one filter share: the source that is the compartment's current
    selection (its session and id), and a grant not yet received."""

    owner: tuple[Session, int] | None = None
    grant: Grant | None = None

    def take(self) -> Grant | None:
        grant, self.grant = self.grant, None
        return grant


@dataclass(slots=True)
class Output:
    """What one batch of input makes the filter send on each side."""

    to_server: list[Chunk] = field(default_factory=list)
    to_client: list[Chunk] = field(default_factory=list)
    # Descriptors that came with a message not passed on: the proxy closes them.
    discard: list[int] = field(default_factory=list)
    # A grant received: the proxy writes the data into the descriptor and closes it.
    deliver: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class _Offer:
    """An offer the compositor announced, held back until it is known where it came from."""

    messages: list[Chunk] = field(default_factory=list)
    ours: bool = False


class Session:
    """The filter of one client connection: feed it what each side sends, send what it returns.
    WireError from either feed means: close this client and its compositor connection."""

    def __init__(self, protocols: Protocols, rules: Rules, shared: Shared | None = None) -> None:
        self.protocols = protocols
        self.rules = rules
        self.shared = Shared() if shared is None else shared
        # The client's regular clipboard: its sources (id -> types), its data devices (id ->
        # the manager and seat they came from), offers shown carrying the grant, and ids
        # whose delete_id the client must not see (a data device the filter re-created).
        self.sources: dict[int, list[str]] = {}
        self.devices: dict[int, tuple[int, int]] = {}
        self.granted: set[int] = set()
        self.swallowed: set[int] = set()
        self.objects = Objects(protocols)
        self.shown: dict[int, tuple[str, int]] = {}
        self.pending: dict[int, _Offer] = {}
        self.hidden: set[int] = set()  # offers from elsewhere, shown empty
        self.buffers = {True: bytearray(), False: bytearray()}
        self.fds: dict[bool, deque[int]] = {True: deque(), False: deque()}

    # The two feeds -------------------------------------------------------------------------

    def from_client(self, untrusted_data: bytes, untrusted_fds: list[int]) -> Output:
        """What the compartment's client sent: every message is checked before it passes."""
        return self._feed(True, untrusted_data, untrusted_fds)

    def from_server(self, data: bytes, fds: list[int]) -> Output:
        return self._feed(False, data, fds)

    def close(self) -> None:
        """The connection ended: its source is no longer the compartment's selection."""
        if self.shared.owner is not None and self.shared.owner[0] is self:
            self.shared.owner = None

    def ask_source(self, source: int, mime_type: str, fd: int) -> Chunk:
        """wl_data_source.send to this client, as the compositor sends it when someone pastes:
        the client writes its selection as `mime_type` into `fd`."""
        interface = self.protocols["wl_data_source"]
        opcode = interface.event("send")
        return encode(source, opcode, interface.events[opcode], (mime_type, Fd(fd)))

    def refresh_selection(self) -> Output:
        """Have the compositor send the current selection again (to a focused client): each
        regular data device released and made again under its id."""
        out = Output()
        for device, (manager, seat) in sorted(self.devices.items()):
            entry = self.objects.entries.get(device)
            if entry is None or not entry.live or entry.version < 2:
                continue  # release came with version 2
            if not all(
                (known := self.objects.entries.get(i)) is not None and known.live
                for i in (manager, seat)
            ):
                continue
            self._request_to_server(out, device, entry.interface, "release")
            manager_of = self.protocols["wl_data_device_manager"]
            self._request_to_server(out, manager, manager_of, "get_data_device", device, seat)
            self.swallowed.add(device)
        return out

    def queued_fds(self) -> list[int]:
        """Descriptors received but not yet passed on (the proxy closes them at the end)."""
        return [*self.fds[True], *self.fds[False]]

    def _feed(self, request: bool, data: bytes, fds: list[int]) -> Output:
        self.buffers[request] += data
        self.fds[request].extend(fds)
        out = Output()
        while (
            decoded := take_message(
                self.objects, self.buffers[request], self.fds[request], request=request
            )
        ) is not None:
            if request:
                self._request(decoded, out)
            else:
                self._event(decoded, out)
        return out

    # Helpers --------------------------------------------------------------------------------

    def _request_to_server(
        self, out: Output, object_id: int, interface: Interface, name: str, *args: Value
    ) -> None:
        opcode = interface.request(name)
        out.to_server.append(encode(object_id, opcode, interface.requests[opcode], args))

    def _event_to_client(
        self, out: Output, object_id: int, interface: Interface, name: str, *args: Value
    ) -> None:
        opcode = interface.event(name)
        out.to_client.append(encode(object_id, opcode, interface.events[opcode], args))

    def _forward_request(self, out: Output, decoded: Decoded) -> None:
        out.to_server.append((decoded.raw, decoded.fds()))

    def _forward_event(self, out: Output, decoded: Decoded) -> None:
        out.to_client.append((decoded.raw, decoded.fds()))

    # Requests -------------------------------------------------------------------------------

    def _request(self, decoded: Decoded, out: Output) -> None:
        interface, name = decoded.interface.name, decoded.message.name
        for arg, value in zip(decoded.message.args, decoded.args, strict=True):
            if arg.type == "object" and isinstance(value, int) and value:
                self.objects.live(value, arg.interface)
            elif isinstance(value, UntypedNewId):
                self._bind(decoded, value)
            elif arg.type == "new_id" and isinstance(value, int) and arg.interface:
                self.objects.create(value, arg.interface, decoded.version, by_server=False)
        if decoded.message.destructor:
            self.objects.destroy(decoded.object_id)
        if decoded.object_id in self.hidden:
            if decoded.message.destructor:  # the compositor's object: it frees the id
                self.hidden.discard(decoded.object_id)
                self._forward_request(out, decoded)
            else:  # a receive, accept or finish on an offer from elsewhere
                out.discard += decoded.fds()
            return
        if self._clipboard_request(decoded, out):
            return
        toplevel = self.protocols["xdg_toplevel"]
        if interface == "xdg_toplevel" and name == "set_app_id":
            untrusted = decoded.arg("app_id")
            assert untrusted is None or isinstance(untrusted, str)
            self._request_to_server(
                out,
                decoded.object_id,
                toplevel,
                "set_app_id",
                app_id(self.rules.compartment, untrusted),
            )
        elif interface == "xdg_toplevel" and name == "set_title":
            untrusted = decoded.arg("title")
            assert untrusted is None or isinstance(untrusted, str)
            self._request_to_server(
                out,
                decoded.object_id,
                toplevel,
                "set_title",
                title(self.rules.compartment, untrusted),
            )
        elif interface == "xdg_toplevel" and name == "set_fullscreen" and not self.rules.fullscreen:
            return
        elif (
            interface in SOURCES
            and name == "offer"
            and str(decoded.arg("mime_type")).startswith(MARKER_PREFIX)
        ):
            return
        else:
            self._forward_request(out, decoded)
        if interface == "xdg_surface" and name == "get_toplevel":
            created = decoded.arg("id")
            assert isinstance(created, int)
            self._request_to_server(
                out, created, toplevel, "set_app_id", app_id(self.rules.compartment, None)
            )
            self._request_to_server(
                out, created, toplevel, "set_title", title(self.rules.compartment, None)
            )
        for clipboard in CLIPBOARDS:
            if interface == clipboard.manager and name == clipboard.create_source:
                created = decoded.arg("id")
                assert isinstance(created, int)
                source = self.protocols[clipboard.source]
                self._request_to_server(out, created, source, "offer", self.rules.marker)

    def _clipboard_request(self, decoded: Decoded, out: Output) -> bool:
        """Keep track of the regular clipboard for `qnix clip`; True when the request is
        answered by the filter (a receive on an offer carrying the grant)."""
        interface, name, target = decoded.interface.name, decoded.message.name, decoded.object_id
        if interface == "wl_data_device_manager" and name == "create_data_source":
            created = decoded.arg("id")
            assert isinstance(created, int)
            self.sources[created] = []
        elif interface == "wl_data_device_manager" and name == "get_data_device":
            device, seat = decoded.arg("id"), decoded.arg("seat")
            assert isinstance(device, int) and isinstance(seat, int)
            self.devices[device] = (target, seat)
        elif interface == "wl_data_device" and name == "release":
            self.devices.pop(target, None)
        elif interface == "wl_data_source" and name == "offer":
            types = self.sources.get(target)
            mime = decoded.arg("mime_type")
            if (
                types is not None
                and isinstance(mime, str)
                and len(types) < MAX_SOURCE_TYPES
                and not mime.startswith(MARKER_PREFIX)
            ):
                types.append(mime)
        elif interface == "wl_data_source" and name == "destroy":
            self.sources.pop(target, None)
            if self.shared.owner == (self, target):
                self.shared.owner = None
        elif interface == "wl_data_device" and name == "set_selection":
            source = decoded.arg("source")
            if isinstance(source, int) and source in self.sources:
                # The compartment's own copy: its selection now, and a grant not yet
                # received gives way to it.
                self.shared.owner = (self, source)
                self.shared.grant = None
            elif not source:
                self.shared.owner = None
        elif interface == "wl_data_offer" and target in self.granted:
            if name == "destroy":
                self.granted.discard(target)
            elif name == "receive":
                fd = decoded.arg("fd")
                assert isinstance(fd, Fd)
                grant = self.shared.take()
                if grant is None:
                    out.discard.append(fd.fd)  # received already: the reader gets nothing
                else:
                    out.deliver.append((fd.fd, grant.data))
                return True
        return False

    def _bind(self, decoded: Decoded, untrusted: UntypedNewId) -> None:
        name = decoded.arg("name")
        assert isinstance(name, int)
        shown = self.shown.get(name)
        if shown is None:
            raise WireError(f"a bind to global {name}, which this client was not shown")
        interface, version = shown
        if untrusted.interface != interface or not 1 <= untrusted.version <= version:
            raise WireError(
                f"a bind to global {name} ({interface} {version})"
                f" as {untrusted.interface} {untrusted.version}"
            )
        self.objects.create(untrusted.id, interface, untrusted.version, by_server=False)

    # Events ---------------------------------------------------------------------------------

    def _event(self, decoded: Decoded, out: Output) -> None:
        interface, name = decoded.interface.name, decoded.message.name
        for arg, value in zip(decoded.message.args, decoded.args, strict=True):
            if arg.type == "new_id" and isinstance(value, int) and arg.interface:
                self.objects.create(value, arg.interface, decoded.version, by_server=True)
                self.hidden.discard(value)
        if decoded.message.destructor:
            self.objects.destroy(decoded.object_id)
        if decoded.object_id in self.hidden:
            out.discard += decoded.fds()
        elif decoded.object_id == DISPLAY_ID and name == "delete_id":
            deleted = decoded.arg("id")
            assert isinstance(deleted, int)
            if deleted in self.swallowed:
                self.swallowed.discard(deleted)  # a device the filter re-created: still live
                return
            self.objects.forget(deleted)
            self._forward_event(out, decoded)
        elif interface == "wl_data_source" and name == "cancelled":
            if self.shared.owner == (self, decoded.object_id):
                self.shared.owner = None
            self._forward_event(out, decoded)
        elif interface == "wl_registry":
            self._registry_event(decoded, out)
        elif interface in DEVICES and name == "data_offer":
            (offer,) = decoded.args
            assert isinstance(offer, int)
            self.pending[offer] = _Offer([(decoded.raw, [])])
        elif interface in OFFERS and decoded.object_id in self.pending:
            held = self.pending[decoded.object_id]
            mime = decoded.arg("mime_type") if name == "offer" else None
            if mime == self.rules.marker:
                held.ours = True
            elif not (isinstance(mime, str) and mime.startswith(MARKER_PREFIX)):
                held.messages.append((decoded.raw, decoded.fds()))
        elif interface in DEVICES and name in OFFER_EVENTS:
            self._offer_event(decoded, out)
        else:
            self._forward_event(out, decoded)

    def _registry_event(self, decoded: Decoded, out: Output) -> None:
        if decoded.message.name == "global":
            name, interface, version = decoded.args
            assert isinstance(name, int) and isinstance(interface, str) and isinstance(version, int)
            if interface not in ALLOWED_GLOBALS or interface not in self.protocols:
                return
            version = min(version, self.protocols[interface].version)
            self.shown[name] = (interface, version)
            self._event_to_client(
                out, decoded.object_id, decoded.interface, "global", name, interface, version
            )
        elif self.shown.pop(int(str(decoded.arg("name"))), None) is not None:
            self._forward_event(out, decoded)

    def _offer_event(self, decoded: Decoded, out: Output) -> None:
        """selection or enter: the client sees the offer only if a source of this compartment
        made it."""
        (argument,) = (a.name for a in decoded.message.args if a.interface in OFFERS)
        offer = decoded.arg(argument)
        held = self.pending.pop(offer, None) if isinstance(offer, int) else None
        if held is None:
            self._forward_event(out, decoded)
            return
        assert isinstance(offer, int)
        grant = self.shared.grant
        regular = decoded.interface.name == "wl_data_device"
        if grant is not None and regular and decoded.message.name == "selection":
            # A grant not yet received: this offer carries it, with its types only.
            out.discard += [fd for _, fds in held.messages for fd in fds]
            out.to_client.append(held.messages[0])  # data_offer: the offer itself
            for mime in grant.mime_types:
                self._event_to_client(out, offer, self.protocols["wl_data_offer"], "offer", mime)
            self.granted.add(offer)
            self._forward_event(out, decoded)
            return
        if held.ours:
            out.to_client += held.messages
            self._forward_event(out, decoded)
            return
        # From elsewhere: the client gets the offer object, empty, and the selection as none.
        # The object itself must reach it: libwayland takes a gap in the compositor's ids as a
        # protocol error, so a hidden id would end the client at the compositor's next new
        # object. What it asks of the object, but to destroy it, goes nowhere.
        out.discard += [fd for _, fds in held.messages for fd in fds]
        out.to_client.append(held.messages[0])
        self.hidden.add(offer)
        args = tuple(
            0 if arg.name == argument else value
            for arg, value in zip(decoded.message.args, decoded.args, strict=True)
        )
        out.to_client.append(encode(decoded.object_id, decoded.opcode, decoded.message, args))
