"""The spec as frozen, typed models.

Everything a spec says is validated here, at the edge; code past this point trusts these models.
Defaults are the safe choice: no network, strict hardening, full-disk encryption.
Mappings are re-ordered by key after validation, so the model of a spec does not depend on the
order its author wrote things in (lists keep their order: in a firewall or a policy, order means).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
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
# A nixpkgs attribute path such as `firefox` or `python3Packages.requests`.
PACKAGE_RE = r"^[A-Za-z_][A-Za-z0-9_'-]*(\.[A-Za-z_][A-Za-z0-9_'-]*)*$"
APP_RE = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
TAG_RE = r"^[a-z][a-z0-9_-]{0,30}$"
SECRET_NAME_RE = r"^[a-z][a-z0-9_-]{0,62}$"
AGE_RECIPIENT_RE = r"^(age1[02-9ac-hj-np-z]{58}|ssh-(ed25519|rsa) [A-Za-z0-9+/=]{16,1024})$"

CompartmentName = Annotated[str, StringConstraints(pattern=COMPARTMENT_NAME_RE)]
UnixUser = Annotated[str, StringConstraints(pattern=UNIX_USER_RE)]
PackageName = Annotated[str, StringConstraints(pattern=PACKAGE_RE)]
AppName = Annotated[str, StringConstraints(pattern=APP_RE)]
TagName = Annotated[str, StringConstraints(pattern=TAG_RE)]
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_RE)]
AgeRecipient = Annotated[str, StringConstraints(pattern=AGE_RECIPIENT_RE)]
Comment = Annotated[str, StringConstraints(max_length=200)]

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


def _no_duplicates(items: tuple[_T, ...]) -> tuple[_T, ...]:
    seen: set[_T] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{item!r} is listed twice")
        seen.add(item)
    return items


def _absolute_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    parts = path.split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError("must not contain '.' or '..' components")
    if "//" in path or (len(path) > 1 and path.endswith("/")):
        raise ValueError("must be normalised (no '//' and no trailing '/')")
    if any(ord(ch) < 0x21 or ch in "\"'\\$`;" or ord(ch) == 0x7F for ch in path):
        raise ValueError(
            "must not contain spaces, quotes, '$', '`', ';', '\\' or control characters"
        )
    if len(path) > 1024:
        raise ValueError("is longer than 1024 characters")
    return path


AbsPath = Annotated[str, AfterValidator(_absolute_path)]


def _hostname(value: str) -> str:
    """A DNS name (RFC 1123 labels) or an IP address."""
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
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address such as 192.0.2.53") from None


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"must be a network such as 203.0.113.0/24 ({exc})") from None


def _port_range(value: int | str) -> str:
    """One port (443) or an inclusive range ("8000-8080"), normalised to a string."""
    text = str(value)
    match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text)
    if match is None:
        raise ValueError('must be a port such as 443 or a range such as "8000-8080"')
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
PortRange = Annotated[int | str, AfterValidator(_port_range)]


class Model(BaseModel):
    """Frozen, strict about unknown keys, no silent coercion of str to int and back."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, str_strip_whitespace=False)


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
            raise ValueError('tpm2 unlock needs encryption = "luks2"')
        if not self.device.startswith("/dev/"):
            raise ValueError("device must be under /dev/, such as /dev/nvme0n1")
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
    dns_servers: tuple[IpAddress, ...] = ()
    state_version: Annotated[str, StringConstraints(pattern=r"^[0-9]{2}\.[0-9]{2}$")] = "25.11"


# ---- compartments --------------------------------------------------------------------------


class FirewallRule(Model):
    """One allow-list entry. A rule allows; anything no rule allows is dropped."""

    proto: Proto | None = None
    host: DnsName | None = None
    cidr: Cidr | None = None
    ports: Annotated[tuple[PortRange, ...], AfterValidator(_no_duplicates)] = ()
    dns: bool = False
    comment: Comment = ""

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.dns:
            if self.host or self.cidr or self.ports or self.proto:
                raise ValueError("a dns rule stands alone: drop proto, host, cidr and ports")
            return self
        if self.host is None and self.cidr is None:
            raise ValueError("a rule needs a host, a cidr, or dns = true")
        if self.host is not None and self.cidr is not None:
            raise ValueError("give either host or cidr, not both")
        if self.ports and self.proto not in ("tcp", "udp"):
            raise ValueError('ports need proto = "tcp" or "udp"')
        return self


class CompartmentBase(Model):
    label: Label = "red"
    isolation: Isolation = "namespace"
    network: str = NETWORK_NONE
    firewall: tuple[FirewallRule, ...] = ()
    memory_mb: int = Field(default=2048, ge=64, le=1 << 20)
    cpus: int = Field(default=2, ge=1, le=1024)
    pids: int = Field(default=1024, ge=16, le=1 << 22)
    devices: Annotated[tuple[Device, ...], AfterValidator(_no_duplicates)] = ()
    packages: Annotated[tuple[PackageName, ...], AfterValidator(_no_duplicates)] = ()
    apps: Annotated[tuple[AppName, ...], AfterValidator(_no_duplicates)] = ()
    tags: Annotated[tuple[TagName, ...], AfterValidator(_no_duplicates)] = ()
    user: UnixUser = "user"

    @field_validator("network")
    @classmethod
    def _network_word(cls, value: str) -> str:
        if value in (NETWORK_NONE, NETWORK_UPLINK) or re.fullmatch(COMPARTMENT_NAME_RE, value):
            return value
        raise ValueError('must be "none", "uplink" or the name of a net compartment')

    @model_validator(mode="after")
    def _firewall_needs_network(self) -> Self:
        if self.firewall and self.network == NETWORK_NONE:
            raise ValueError(
                'a firewall needs a network: set network = "uplink" or a net compartment'
            )
        return self


class Compartment(CompartmentBase):
    """A Qubes "qube"."""

    name: CompartmentName
    persistence: Persistence = "persistent"
    persistent_paths: Annotated[tuple[AbsPath, ...], AfterValidator(_no_duplicates)] = ()
    provides_network: bool = False
    autostart: bool = False
    secrets: Annotated[tuple[SecretName, ...], AfterValidator(_no_duplicates)] = ()

    @model_validator(mode="after")
    def _disposable_keeps_nothing(self) -> Self:
        if self.persistence == "disposable" and self.persistent_paths:
            raise ValueError("a disposable compartment keeps nothing: drop persistent_paths")
        if self.provides_network and self.network == NETWORK_NONE:
            raise ValueError('a net compartment needs a network itself: "uplink" or another one')
        return self


class DisposableTemplate(CompartmentBase):
    """What a fresh disposable is made from (Qubes' disposable template)."""


# ---- policy, secrets, audit ----------------------------------------------------------------


class Policy(Model):
    # Qubes 4.1+ policy lines, evaluated before the files of `dir`.
    rules: tuple[Annotated[str, StringConstraints(max_length=4096)], ...] = ()
    # A policy.d folder, relative to the spec file.
    dir: str | None = None


class Secret(Model):
    file: str
    recipients: Annotated[tuple[AgeRecipient, ...], AfterValidator(_no_duplicates)] = Field(
        min_length=1
    )


class RemoteSyslog(Model):
    host: DnsName
    port: int = Field(default=6514, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    tls: bool = True

    @model_validator(mode="after")
    def _tls_over_tcp(self) -> Self:
        if self.tls and self.protocol != "tcp":
            raise ValueError('tls needs protocol = "tcp"')
        return self


class Audit(Model):
    remote_syslog: RemoteSyslog | None = None
    aide_paths: Annotated[tuple[AbsPath, ...], AfterValidator(_no_duplicates)] = ()


# ---- the whole workstation -----------------------------------------------------------------


class Workstation(Model):
    host: Host
    compartments: dict[str, Compartment] = {}
    disposable_templates: dict[CompartmentName, DisposableTemplate] = {}
    default_disposable: CompartmentName | None = None
    policy: Policy = Policy()
    secrets: dict[SecretName, Secret] = {}
    audit: Audit = Audit()

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
                raise ValueError(
                    f"compartments.{key}.name is {compartment.name!r}; it must equal its key"
                )
        return self

    def net_compartments(self) -> list[Compartment]:
        return [c for c in self.compartments.values() if c.provides_network]

    def tags(self) -> set[str]:
        return {t for c in self.compartments.values() for t in c.tags} | {
            t for d in self.disposable_templates.values() for t in d.tags
        }
