"""The spec as frozen, typed models.

Everything a spec says is validated here, at the edge; code past this point trusts these models.
Defaults are the safe choice: no network, strict hardening, full-disk encryption.
Mappings are re-ordered by key after validation, so the model of a spec does not depend on the
order its author wrote things in (lists keep their order: in a firewall or a policy, order means).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

# ---- names ---------------------------------------------------------------------------------

COMPARTMENT_NAME_RE = r"^[a-z][a-z0-9-]{0,30}$"
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
UNIX_USER_RE = r"^[a-z_][a-z0-9_-]{0,31}$"
# A nixpkgs attribute path such as `firefox` or `python3Packages.requests`. Nix allows `'` in
# identifiers, but no package a spec needs has one, and a name must never carry a quote.
# A flake reference (`github:owner/repo`, `git+file:///path`, ...): a scheme, then no spaces,
# quotes or `$`.
FLAKE_REF_RE = r"^[a-z][a-z0-9+]*:[A-Za-z0-9_./~:@%?=&+-]+$"
# Where the flake `qnix build` writes takes qnix (its package and nixosModules.qnix) from: the
# name the project is to be published under; until then set `host.qnix_flake` to your copy.
DEFAULT_QNIX_FLAKE = "github:qnix/qnix"
PACKAGE_RE = r"^[A-Za-z_][A-Za-z0-9_-]{0,99}(\.[A-Za-z_][A-Za-z0-9_-]{0,99}){0,7}$"
# A program name; a `.` only before another character, so never `..` and never a dot-file.
APP_RE = r"^[A-Za-z0-9][A-Za-z0-9_+-]*(\.[A-Za-z0-9_+-]+)*$"
APP_MAX_LENGTH = 64
TAG_RE = r"^[a-z][a-z0-9_-]{0,30}$"
SECRET_NAME_RE = r"^[a-z][a-z0-9_-]{0,62}$"
AGE_RECIPIENT_RE = r"^(age1[02-9ac-hj-np-z]{58}|ssh-(ed25519|rsa) [A-Za-z0-9+/=]{16,1024})$"
# An entry of a password store (`pass`), such as work/vpn: no part starts with '.' or '-', so an
# entry is never a hidden file, never '..' and never read as an option of `pass show`.
_PASS_PART = r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]{0,99}"
PASS_ENTRY_RE = rf"^{_PASS_PART}(/{_PASS_PART}){{0,15}}$"

# Words `network` and the policy give a meaning of their own, so no compartment may bear them.
RESERVED_NAMES = ("none", "uplink", "dom0")


class SpecRuleError(ValueError):
    """A broken rule, pinned to the place the author has to change.

    `at` is relative to the value being validated: a field name, or an index into a list.
    The loader turns it into a key path and shows the value found there.
    """

    def __init__(self, message: str, *at: str | int, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.at = at
        self.hint = hint


def _not_reserved(name: str) -> str:
    if name in RESERVED_NAMES:
        raise SpecRuleError(
            f"{name!r} is a reserved word",
            hint=f"choose another name; reserved: {', '.join(RESERVED_NAMES)}",
        )
    return name


CompartmentName = Annotated[
    str, StringConstraints(pattern=COMPARTMENT_NAME_RE), AfterValidator(_not_reserved)
]
UnixUser = Annotated[str, StringConstraints(pattern=UNIX_USER_RE)]
PackageName = Annotated[str, StringConstraints(pattern=PACKAGE_RE)]
AppName = Annotated[str, StringConstraints(pattern=APP_RE, max_length=APP_MAX_LENGTH)]
TagName = Annotated[str, StringConstraints(pattern=TAG_RE)]
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_RE)]
AgeRecipient = Annotated[str, StringConstraints(pattern=AGE_RECIPIENT_RE)]
PassEntry = Annotated[str, StringConstraints(pattern=PASS_ENTRY_RE)]

Label = Literal["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"]
Isolation = Literal["namespace", "container", "vm"]
Persistence = Literal["persistent", "disposable"]
System = Literal["x86_64-linux", "aarch64-linux", "riscv64-linux"]
Hardening = Literal["baseline", "strict", "paranoid"]
Filesystem = Literal["bcachefs", "btrfs", "ext4"]
Device = Literal["audio", "microphone", "camera", "usb", "gpu", "block"]
LidAction = Literal["suspend", "hibernate", "lock", "poweroff", "ignore"]
Proto = Literal["tcp", "udp", "icmp"]

# Network values other than a net compartment's name.
NETWORK_NONE = "none"
NETWORK_UPLINK = "uplink"

_T = TypeVar("_T")

# The models are strict (no "2048" for 2048, no 1 for true), but a spec's lists arrive as
# Python lists while the models keep tuples: only the container is lax, its items stay strict.
_LIST = Field(strict=False)


def _no_duplicates(items: tuple[_T, ...]) -> tuple[_T, ...]:
    first_at: dict[_T, int] = {}
    for index, item in enumerate(items):
        if item in first_at:
            raise SpecRuleError(
                "is listed twice", index, hint=f"drop it; it is already at [{first_at[item]}]"
            )
        first_at[item] = index
    return items


def _unsafe_char(ch: str) -> bool:
    """Whitespace, control/format/unassigned characters and shell or Nix metacharacters."""
    return ch.isspace() or unicodedata.category(ch)[0] == "C" or ch in "\"'\\$`;"


def _safe_chars(path: str) -> None:
    # `..` anywhere, not only as a component: `a..b` is never needed, and a rule without an
    # exception is one a reviewer can check at a glance.
    if ".." in path:
        raise ValueError("must not contain '..'")
    if any(_unsafe_char(ch) for ch in path):
        raise ValueError(
            "must not contain whitespace, quotes, '$', '`', ';', '\\' or control characters"
        )
    if len(path) > 1024:
        raise ValueError("is longer than 1024 characters")


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    parts = path.split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError("must not contain '.' or '..' components")
    if "//" in path or (len(path) > 1 and path.endswith("/")):
        raise ValueError("must be normalised (no '//' and no trailing '/')")
    _safe_chars(path)
    return path


def _relative_path(path: str) -> str:
    """A file or folder beside the spec file or below it, in normal form."""
    if not path or path.startswith("/"):
        raise ValueError("must be a path relative to the spec file, such as secrets/vpn.age")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(
            "must stay below the spec file's folder, in normal form: no '.', '..' or '//'"
        )
    _safe_chars(path)
    return path


AbsPath = Annotated[str, AfterValidator(_absolute_path)]
RelPath = Annotated[str, AfterValidator(_relative_path)]


def _comment(text: str) -> str:
    if any(unicodedata.category(ch)[0] == "C" for ch in text):
        raise ValueError("must not contain control characters or line breaks")
    return text


Comment = Annotated[str, StringConstraints(max_length=200), AfterValidator(_comment)]


def _hostname(value: str) -> str:
    """A DNS name (RFC 1123 labels) or an IP address."""
    if "%" not in value:  # an IPv6 scope (fe80::1%eth0) names an interface of one machine
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    if len(value) > 253 or not re.fullmatch(
        r"(?=.*[a-zA-Z])([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*"
        r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?",
        value,
    ):
        raise ValueError("must be a DNS name such as mail.example.com, or an IP address")
    return value.lower()


def _ip_address(value: str) -> str:
    try:
        if "%" in value:
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address such as 192.0.2.53") from None


def _cidr(value: str) -> str:
    try:
        if "%" in value:
            raise ValueError(f"{value!r} has an interface scope")
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"must be a network such as 203.0.113.0/24 ({exc})") from None


def _port_range(value: Any) -> str:
    """One port (443) or an inclusive range ("8000-8080"), normalised to a string.

    A before-validator rather than `int | str`, so that a bad port gives one message rather
    than one per union member.
    """
    shape = 'must be a port such as 443 or a range such as "8000-8080"'
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(shape)
    text = str(value)
    match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text)
    if match is None:
        raise ValueError(shape)
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if not (1 <= low <= high <= 65535):
        raise ValueError("ports run from 1 to 65535 and a range must go upwards")
    return str(low) if low == high else f"{low}-{high}"


def _compartment_subnet(value: str) -> str:
    network = ipaddress.ip_network(_cidr(value))
    if network.version != 4 or not 8 <= network.prefixlen <= 22:
        raise ValueError("must be an IPv4 network between /8 and /22, such as 10.137.0.0/16")
    if not network.is_private:
        raise ValueError("must be a private network (RFC 1918), such as 10.137.0.0/16")
    return str(network)


DnsName = Annotated[str, AfterValidator(_hostname)]
IpAddress = Annotated[str, AfterValidator(_ip_address)]
Cidr = Annotated[str, AfterValidator(_cidr)]
PortRange = Annotated[str, BeforeValidator(_port_range)]


class Model(BaseModel):
    """Frozen, strict about unknown keys, no silent coercion of str to int and back."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, str_strip_whitespace=False)


def _sorted_mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: value[key] for key in sorted(value)}
    return value


# ---- host ----------------------------------------------------------------------------------


class Disk(Model):
    device: AbsPath = "/dev/nvme0n1"
    encryption: Literal["luks2", "none"] = "luks2"
    tpm2: bool = True
    filesystem: Filesystem = "btrfs"
    swap_gb: int = Field(default=8, ge=0, le=1024)

    @model_validator(mode="after")
    def _tpm_needs_luks(self) -> Self:
        if self.tpm2 and self.encryption == "none":
            raise SpecRuleError(
                'tpm2 unlock needs encryption = "luks2"',
                "encryption",
                hint='keep encryption = "luks2", or also set tpm2 = false',
            )
        if not self.device.startswith("/dev/"):
            raise SpecRuleError("must be under /dev/, such as /dev/nvme0n1", "device")
        return self


class Desktop(Model):
    hyprland: bool = False
    lid_switch: LidAction = "suspend"


class Host(Model):
    hostname: Annotated[str, StringConstraints(pattern=HOSTNAME_RE)]
    system: System = "x86_64-linux"
    hardening: Hardening = "strict"
    secure_boot: bool = False
    disk: Disk = Disk()
    desktop: Desktop = Desktop()
    timezone: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")] = (
        "UTC"
    )
    # Point-to-point /31 links to the compartments are carved from this IPv4 network.
    subnet: Annotated[str, AfterValidator(_compartment_subnet)] = "10.137.0.0/16"
    # Resolvers that compartments with a `dns = true` firewall rule may ask; empty means any.
    dns_servers: Annotated[tuple[IpAddress, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    state_version: Annotated[str, StringConstraints(pattern=r"^[0-9]{2}\.[0-9]{2}$")] = "25.11"
    qnix_flake: Annotated[str, StringConstraints(pattern=FLAKE_REF_RE)] = DEFAULT_QNIX_FLAKE

    @model_validator(mode="after")
    def _hibernation_possible(self) -> Self:
        # Swap beside LUKS gets a fresh random key each boot, and paranoid's kernel lockdown
        # forbids hibernation: either way the machine could never resume.
        if self.desktop.lid_switch == "hibernate" and (
            self.hardening == "paranoid" or self.disk.encryption != "none" or not self.disk.swap_gb
        ):
            raise SpecRuleError(
                "this workstation cannot hibernate",
                "desktop",
                "lid_switch",
                hint="hibernation needs unencrypted swap and no paranoid lockdown; "
                'use "suspend" or "lock"',
            )
        return self


# ---- compartments --------------------------------------------------------------------------


class FirewallRule(Model):
    """One allow-list entry. A rule allows; anything no rule allows is dropped."""

    proto: Proto | None = None
    host: DnsName | None = None
    cidr: Cidr | None = None
    ports: Annotated[tuple[PortRange, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    dns: bool = False
    comment: Comment = ""

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.dns:
            extra = [k for k in ("proto", "host", "cidr", "ports") if getattr(self, k)]
            if extra:
                raise SpecRuleError(
                    "a dns rule stands alone",
                    extra[0],
                    hint=f"drop {' and '.join(extra)}, or put them in a rule of their own",
                )
            return self
        if self.host is None and self.cidr is None:
            raise SpecRuleError(
                "a rule needs a host, a cidr, or dns = true",
                hint='add host = "mail.example.com" or cidr = "203.0.113.0/24"',
            )
        if self.host is not None and self.cidr is not None:
            raise SpecRuleError(
                "give either host or cidr, not both", hint="split it into two rules"
            )
        if self.ports and self.proto not in ("tcp", "udp"):
            raise SpecRuleError(
                'ports need proto = "tcp" or "udp"',
                "ports",
                hint=f"proto is {self.proto or 'not set'}; "
                + ("icmp has no ports" if self.proto == "icmp" else 'add proto = "tcp"'),
            )
        return self


class CompartmentBase(Model):
    label: Label = "red"
    isolation: Isolation = "namespace"
    network: str = NETWORK_NONE
    firewall: Annotated[tuple[FirewallRule, ...], _LIST] = ()
    memory_mb: int = Field(default=2048, ge=64, le=1 << 20)
    cpus: int = Field(default=2, ge=1, le=1024)
    pids: int = Field(default=1024, ge=16, le=1 << 22)
    devices: Annotated[tuple[Device, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    packages: Annotated[tuple[PackageName, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    apps: Annotated[tuple[AppName, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    tags: Annotated[tuple[TagName, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    user: UnixUser = "user"
    # Delivered at /run/secrets/<name> while it runs (a disposable gets its template's).
    secrets: Annotated[tuple[SecretName, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    # GUI apps: a Wayland filter of its own (docs/gui.md) is its only display; `fullscreen`
    # lets its windows go fullscreen (else the filter drops the request).
    gui: bool = False
    fullscreen: bool = False

    @field_validator("network")
    @classmethod
    def _network_word(cls, value: str) -> str:
        if value in (NETWORK_NONE, NETWORK_UPLINK) or re.fullmatch(COMPARTMENT_NAME_RE, value):
            return value
        raise ValueError('must be "none", "uplink" or the name of a net compartment')

    @model_validator(mode="after")
    def _gui_where_it_exists(self) -> Self:
        if self.fullscreen and not self.gui:
            raise SpecRuleError(
                "fullscreen is about GUI windows, but gui is not set",
                "fullscreen",
                hint="set gui = true, or drop fullscreen",
            )
        return self

    @model_validator(mode="after")
    def _firewall_needs_network(self) -> Self:
        if self.firewall and self.network == NETWORK_NONE:
            raise SpecRuleError(
                'a firewall needs a network, but network is "none"',
                "firewall",
                hint='set network = "uplink" or a net compartment, or drop the firewall',
            )
        return self


class Compartment(CompartmentBase):
    """A Qubes "qube"."""

    name: CompartmentName
    persistence: Persistence = "persistent"
    persistent_paths: Annotated[tuple[AbsPath, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    provides_network: bool = False
    autostart: bool = False
    # Encrypted snapshots of the state kept: one is taken at each stop and the latest N are
    # kept (qnix.runtime.state); 0 takes none at stop and removes none. A disposable has none.
    snapshots: int = Field(default=5, ge=0, le=1000)
    # An identity on the spec's overlay, held inside the compartment's own network namespace.
    overlay: CompartmentOverlay | None = None

    @model_validator(mode="after")
    def _disposable_keeps_nothing(self) -> Self:
        if self.persistence == "disposable" and self.persistent_paths:
            raise SpecRuleError(
                "a disposable compartment keeps nothing",
                "persistent_paths",
                hint='drop persistent_paths, or set persistence = "persistent"',
            )
        if self.provides_network and self.network == NETWORK_NONE:
            raise SpecRuleError(
                'a net compartment needs a network itself, but network is "none"',
                "provides_network",
                hint='set network = "uplink" or another net compartment',
            )
        return self


class DisposableTemplate(CompartmentBase):
    """What a fresh disposable is made from (Qubes' disposable template)."""

    # Disposables kept started and waiting (Qubes' preloaded disposables): `qnix dispose`
    # takes one instead of building a sandbox, and a new one is started behind it.
    preload: int = Field(default=0, ge=0, le=16)


# ---- policy, secrets, audit ----------------------------------------------------------------


class Policy(Model):
    # Qubes 4.1+ policy lines, evaluated before the files of `dir`.
    rules: Annotated[tuple[Annotated[str, StringConstraints(max_length=4096)], ...], _LIST] = ()
    # A policy.d folder, relative to the spec file.
    dir: RelPath | None = None


class Secret(Model):
    """What a compartment listing it finds at /run/secrets/<name> while it runs.

    `source = "age"` (the default): `file` is age-encrypted to `recipients` and sits beside the
    spec; the host decrypts it with its own key. `source = "pass"`: `path` is an entry of the
    password store of whoever starts the compartment (gpg-encrypted, read with `pass show`).
    """

    source: Literal["age", "pass"] = "age"
    # age: the encrypted file, relative to the spec file, and the public keys it is encrypted to.
    file: RelPath | None = None
    recipients: Annotated[tuple[AgeRecipient, ...], _LIST, AfterValidator(_no_duplicates)] = ()
    # pass: the entry, such as work/vpn.
    path: PassEntry | None = None

    @model_validator(mode="after")
    def _fits_its_source(self) -> Self:
        if self.source == "age":
            if self.path is not None:
                raise SpecRuleError(
                    "an age secret has no path", "path", hint='drop path, or set source = "pass"'
                )
            if self.file is None:
                raise SpecRuleError(
                    "an age secret needs its file",
                    "file",
                    hint='add file = "secrets/NAME.age" (qnix secret add NAME writes it)',
                )
            if not self.recipients:
                if "recipients" in self.model_fields_set:
                    raise SpecRuleError("must not be empty", "recipients")
                raise SpecRuleError(
                    "an age secret needs recipients",
                    "recipients",
                    hint='add recipients = ["age1..."]: the public keys that may decrypt it, '
                    "the host's among them",
                )
            return self
        for key in ("file", "recipients"):
            if getattr(self, key):
                raise SpecRuleError(
                    f"a pass secret has no {key}",
                    key,
                    hint=f'drop {key} (pass encrypts to its own gpg keys), or set source = "age"',
                )
        if self.path is None:
            raise SpecRuleError(
                "a pass secret needs the path of its entry", "path", hint='add path = "work/vpn"'
            )
        return self


RELP_PORT = 2514
SYSLOG_TLS_PORT = 6514
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The host's own TLS certificate and key, as RELP's mutual TLS presents them (deployed by the
# administrator, like any host certificate).
HOST_CERT = "/etc/qnix/tls/host.crt"
HOST_KEY = "/etc/qnix/tls/host.key"
MAX_RECEIVERS = 4
MAX_PEERS = 256


def _one_to(most: int) -> Callable[[tuple[_T, ...]], tuple[_T, ...]]:
    """A list of at least one and at most `most` items (checked after the items themselves,
    so a bad item is the one problem reported)."""

    def check(items: tuple[_T, ...]) -> tuple[_T, ...]:
        if not 1 <= len(items) <= most:
            raise SpecRuleError(
                f"needs 1 to {most} items, not {len(items)}", hint="list them in [...]"
            )
        return items

    return check


def _peer_name(value: str) -> str:
    """A certificate name a receiver admits: a DNS name, or `*.` and one."""
    _hostname(value.removeprefix("*."))
    return value


PeerName = Annotated[str, AfterValidator(_peer_name)]


class RemoteSyslog(Model):
    """Where the audit log is forwarded: one receiver, or several (an HA pair), each written
    to on its own."""

    hosts: Annotated[
        tuple[DnsName, ...],
        _LIST,
        AfterValidator(_one_to(MAX_RECEIVERS)),
        AfterValidator(_no_duplicates),
    ]
    port: int = Field(default=SYSLOG_TLS_PORT, ge=1, le=65535)
    # Required (see _protocol_given); None only while validating.
    protocol: Literal["relp", "tcp", "udp"] | None = None
    tls: bool = True
    ca_file: AbsPath = CA_BUNDLE
    cert_file: AbsPath = HOST_CERT
    key_file: AbsPath = HOST_KEY

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """`host` (one receiver) is `hosts` of one; RELP's port is 2514, the others' 6514.
        The protocol must be said: older specs that left it out meant TCP, and RELP is what
        loses nothing."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "host" in data:
            if "hosts" in data:
                raise SpecRuleError(
                    "give host or hosts, not both", "host", hint="hosts = [...] lists them all"
                )
            data["hosts"] = [data.pop("host")]
        if "port" not in data and data.get("protocol") == "relp":
            data["port"] = RELP_PORT
        return data

    @model_validator(mode="after")
    def _tls_over_a_stream(self) -> Self:
        if self.protocol is None:
            raise SpecRuleError(
                "the protocol must be given",
                "protocol",
                hint='protocol = "relp" loses no entry when a receiver stops (the server needs '
                'imrelp); "tcp" is what qnix used when none was given, and can lose entries',
            )
        if self.tls and self.protocol == "udp":
            raise SpecRuleError(
                'tls needs protocol = "relp" or "tcp"',
                "protocol",
                hint='use "relp", or set tls = false',
            )
        return self


RECEIVED_DIR = "/var/log/qnix-remote"


class LogReceiver(Model):
    """This host receives other hosts' audit logs over RELP with TLS: one append-only file per
    sending host in RECEIVED_DIR."""

    peers: Annotated[
        tuple[PeerName, ...],
        _LIST,
        AfterValidator(_one_to(MAX_PEERS)),
        AfterValidator(_no_duplicates),
    ]
    port: int = Field(default=RELP_PORT, ge=1, le=65535)
    # Listen on this address only (default: every address of the host).
    address: IpAddress | None = None
    ca_file: AbsPath = CA_BUNDLE
    cert_file: AbsPath = HOST_CERT
    key_file: AbsPath = HOST_KEY


class Audit(Model):
    remote_syslog: RemoteSyslog | None = None
    receive: LogReceiver | None = None
    aide_paths: Annotated[tuple[AbsPath, ...], _LIST, AfterValidator(_no_duplicates)] = ()


# ---- overlay: remote access per compartment -------------------------------------------------

NEBULA_PORT = 4242
# Who may give the generated Tailscale policy's tags to a node, unless the spec says.
TAG_OWNERS = ("autogroup:admin",)
TAG_OWNER_RE = r"^(autogroup:[a-z-]+|group:[a-z0-9_-]+|[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+)$"
TagOwner = Annotated[str, StringConstraints(pattern=TAG_OWNER_RE)]


class OverlayAdmit(Model):
    """What a server lets in over the overlay: a protocol and ports, from certificates that
    carry any of `groups`."""

    groups: Annotated[
        tuple[TagName, ...], _LIST, AfterValidator(_one_to(64)), AfterValidator(_no_duplicates)
    ]
    proto: Proto
    ports: Annotated[tuple[PortRange, ...], _LIST, AfterValidator(_no_duplicates)] = ()

    @model_validator(mode="after")
    def _ports_fit(self) -> Self:
        if self.proto == "icmp" and self.ports:
            raise SpecRuleError("icmp has no ports", "ports", hint="drop ports")
        if self.proto != "icmp" and not self.ports:
            raise SpecRuleError(f"{self.proto} needs its ports", "ports", hint="add ports = [445]")
        return self


class OverlayServer(Model):
    """A machine on the overlay (the office server), outside this workstation: its overlay
    address, where it is reached (`host`, `port`), and what it admits."""

    address: IpAddress
    host: DnsName | None = None
    port: int = Field(default=NEBULA_PORT, ge=1, le=65535)
    # A lighthouse tells the compartments where the others are; at least one is needed.
    lighthouse: bool = False
    admit: Annotated[tuple[OverlayAdmit, ...], _LIST] = ()

    @model_validator(mode="after")
    def _lighthouse_reachable(self) -> Self:
        if self.lighthouse and self.host is None:
            raise SpecRuleError(
                "a lighthouse needs the host it is reached at",
                "host",
                hint='add host = "office.example.com" (and port, if not 4242)',
            )
        return self


class Overlay(Model):
    """The overlay network the compartments join (Nebula here; Tailscale or Headscale on
    NixOS and in the generated policy). Its certificate authority: `ca_cert` and `ca_key` on
    this host, or neither (qnix makes one under the state root, limited to the spec's groups
    and subnet)."""

    subnet: Annotated[str, AfterValidator(_cidr)]
    servers: dict[CompartmentName, OverlayServer]
    ca_cert: AbsPath | None = None
    ca_key: AbsPath | None = None
    # Headscale's URL (Tailscale's own coordination server when not given).
    login_server: (
        Annotated[str, StringConstraints(pattern=r"^https://[A-Za-z0-9.:/_-]+$")] | None
    ) = None
    tag_owners: Annotated[
        tuple[TagOwner, ...], _LIST, AfterValidator(_one_to(64)), AfterValidator(_no_duplicates)
    ] = TAG_OWNERS

    @field_validator("servers", mode="after")
    @classmethod
    def _canonical_order(cls, value: Any) -> Any:
        return _sorted_mapping(value)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        subnet = ipaddress.ip_network(self.subnet)
        if subnet.version != 4:
            raise SpecRuleError(
                "must be an IPv4 network, such as 10.42.0.0/16",
                "subnet",
                hint="Nebula 1.6 gives its hosts IPv4 addresses only",
            )
        if (self.ca_cert is None) != (self.ca_key is None):
            given = "ca_cert" if self.ca_key is None else "ca_key"
            raise SpecRuleError(
                "give ca_cert and ca_key together, or neither",
                given,
                hint="neither: qnix makes a certificate authority of its own",
            )
        if not any(server.lighthouse for server in self.servers.values()):
            raise SpecRuleError(
                "no server is a lighthouse",
                "servers",
                hint="set lighthouse = true on the server the compartments ask for the others",
            )
        return self


class CompartmentOverlay(Model):
    """A compartment's own identity on the overlay: its address and the groups its
    certificate carries (what servers admit)."""

    address: IpAddress
    groups: Annotated[
        tuple[TagName, ...], _LIST, AfterValidator(_one_to(64)), AfterValidator(_no_duplicates)
    ]
    # A Tailscale auth key (a secret the compartment lists) for the NixOS output's tailscaled.
    tailscale_auth_key: SecretName | None = None


# ---- the whole workstation -----------------------------------------------------------------


class Workstation(Model):
    host: Host
    compartments: dict[CompartmentName, Compartment] = {}
    disposable_templates: dict[CompartmentName, DisposableTemplate] = {}
    default_disposable: CompartmentName | None = None
    policy: Policy = Policy()
    secrets: dict[SecretName, Secret] = {}
    audit: Audit = Audit()
    overlay: Overlay | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        """A compartment is named by its key; `name` inside must agree if given at all."""
        if isinstance(data, Mapping) and isinstance(data.get("compartments"), Mapping):
            compartments = {}
            for key, body in data["compartments"].items():
                if isinstance(body, Mapping):
                    body = {"name": key, **body}
                compartments[key] = body
            data = {**data, "compartments": compartments}
        return data

    @field_validator("compartments", "disposable_templates", "secrets", mode="after")
    @classmethod
    def _canonical_order(cls, value: Any) -> Any:
        return _sorted_mapping(value)

    @model_validator(mode="after")
    def _name_matches_key(self) -> Self:
        for key, compartment in self.compartments.items():
            if compartment.name != key:
                raise SpecRuleError(
                    "must equal the compartment's key",
                    "compartments",
                    key,
                    "name",
                    hint=f"drop name, or rename the table to compartments.{compartment.name}",
                )
        return self

    def net_compartments(self) -> list[Compartment]:
        return [c for c in self.compartments.values() if c.provides_network]

    def tags(self) -> set[str]:
        return {t for c in self.compartments.values() for t in c.tags} | {
            t for d in self.disposable_templates.values() for t in d.tags
        }
