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
  it (the compositor is told it is destroyed and the client sees an empty selection).
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


@dataclass(slots=True)
class Output:
    """What one batch of input makes the filter send on each side."""

    to_server: list[Chunk] = field(default_factory=list)
    to_client: list[Chunk] = field(default_factory=list)
    # Descriptors that came with a message not passed on: the proxy closes them.
    discard: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Offer:
    """An offer the compositor announced, held back until it is known where it came from."""

    messages: list[Chunk] = field(default_factory=list)
    ours: bool = False


class Session:
    """The filter of one client connection: feed it what each side sends, send what it returns.
    WireError from either feed means: close this client and its compositor connection."""

    def __init__(self, protocols: Protocols, rules: Rules) -> None:
        self.protocols = protocols
        self.rules = rules
        self.objects = Objects(protocols)
        self.shown: dict[int, tuple[str, int]] = {}
        self.pending: dict[int, _Offer] = {}
        self.hidden: set[int] = set()
        self.buffers = {True: bytearray(), False: bytearray()}
        self.fds: dict[bool, deque[int]] = {True: deque(), False: deque()}

    # The two feeds -------------------------------------------------------------------------

    def from_client(self, untrusted_data: bytes, untrusted_fds: list[int]) -> Output:
        """What the compartment's client sent: every message is checked before it passes."""
        return self._feed(True, untrusted_data, untrusted_fds)

    def from_server(self, data: bytes, fds: list[int]) -> Output:
        return self._feed(False, data, fds)

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
            self.objects.forget(deleted)
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
        if held.ours:
            out.to_client += held.messages
            self._forward_event(out, decoded)
            return
        assert isinstance(offer, int)
        out.discard += [fd for _, fds in held.messages for fd in fds]
        entry = self.objects.live(offer, None)
        self._request_to_server(out, offer, entry.interface, "destroy")
        self.objects.destroy(offer)
        self.hidden.add(offer)
        args = tuple(
            0 if arg.name == argument else value
            for arg, value in zip(decoded.message.args, decoded.args, strict=True)
        )
        out.to_client.append(encode(decoded.object_id, decoded.opcode, decoded.message, args))
