"""Remote access per compartment, from the spec's `[overlay]`: pure text and value trees.

Each compartment with `overlay = { address, groups }` gets an identity of its own on the
overlay network, held inside its own network namespace (never the host's). From the spec:

* a Nebula configuration per compartment (`overlay/nebula/compartments/<name>.yml`): the
  lighthouses, and a firewall that lets the compartment reach exactly what the servers admit
  for its groups, and nothing in;
* a Nebula configuration per server (`overlay/nebula/servers/<name>.yml`), for the office
  admin to deploy: its firewall admits each rule's groups, as the certificates carry them;
* the Tailscale / Headscale policy (`overlay/tailscale-policy.hujson`: tagOwners, acls,
  tests), with one tag per compartment and per server;
* the NixOS `services.tailscale` settings of each container compartment that names an auth key
  (inside the container, which has a network namespace of its own).

The Nebula files name their certificates relative to their own folder (`ca.crt`, `host.crt`,
`host.key`): the runtime starts nebula in the folder that holds them (qnix.runtime.nebula).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from qnix.compile.nix.compartments import SECRETS_INSIDE
from qnix.compile.nix.printer import Function, NixValue
from qnix.spec.model import Compartment, Overlay, OverlayAdmit, OverlayServer, Workstation

OVERLAY_DIR = "overlay"
TAILSCALE_POLICY = f"{OVERLAY_DIR}/tailscale-policy.hujson"
CA_CERT = "ca.crt"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
# The overlay's interface: one per network namespace, so every compartment's has this name.
NEBULA_DEV = "nebula1"
# Below the usual 1500 of the underlay, with room for Nebula's header.
NEBULA_MTU = 1300
LIGHTHOUSE_INTERVAL = 60
# Every address of the namespace nebula runs in: a compartment's own holds only its link.
ANY_ADDRESS = "0.0.0.0"  # noqa: S104

YamlValue = str | int | bool | Sequence["YamlValue"] | Mapping[str, "YamlValue"]


def compartment_config_file(name: str) -> str:
    return f"{OVERLAY_DIR}/nebula/compartments/{name}.yml"


def server_config_file(name: str) -> str:
    return f"{OVERLAY_DIR}/nebula/servers/{name}.yml"


def members(ws: Workstation) -> dict[str, Compartment]:
    """The compartments on the overlay, by name."""
    if ws.overlay is None:
        return {}
    return {n: c for n, c in ws.compartments.items() if c.overlay is not None}


def groups_of(ws: Workstation) -> list[str]:
    """Every group a compartment's certificate carries: what a CA qnix makes may sign."""
    return sorted({g for c in members(ws).values() if c.overlay for g in c.overlay.groups})


def admitted(compartment: Compartment, server: OverlayServer) -> list[OverlayAdmit]:
    """The server's rules that admit one of the compartment's groups."""
    groups = set(compartment.overlay.groups) if compartment.overlay else set()
    return [rule for rule in server.admit if groups & set(rule.groups)]


# ---- YAML ------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")
# Words YAML 1.1 (go-yaml, which Nebula reads with) would take for booleans or null.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})


def _scalar(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    plain = _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS
    if plain and not value[0].isdigit() and not value.startswith("-"):
        return value
    # JSON's double-quoted string is a YAML double-quoted scalar.
    return json.dumps(value, ensure_ascii=True)


def render_yaml(value: Mapping[str, YamlValue], indent: int = 0) -> str:
    """Block-style YAML of mappings, lists, strings, numbers and booleans; empty collections
    in flow style. Keys are written in the order given."""
    lines: list[str] = []
    pad = " " * indent
    for key, item in value.items():
        name = _scalar(key)
        if isinstance(item, Mapping):
            if item:
                lines.append(f"{pad}{name}:\n{render_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{name}: {{}}\n")
        elif isinstance(item, Sequence) and not isinstance(item, str):
            if not item:
                lines.append(f"{pad}{name}: []\n")
                continue
            lines.append(f"{pad}{name}:\n")
            for element in item:
                if isinstance(element, Mapping):
                    body = render_yaml(element, indent + 4)
                    lines.append(f"{pad}  - {body[indent + 4 :]}")
                elif isinstance(element, Sequence) and not isinstance(element, str):
                    raise ValueError("a list inside a list is not written here")
                else:
                    lines.append(f"{pad}  - {_scalar(element)}\n")
        else:
            lines.append(f"{pad}{name}: {_scalar(item)}\n")
    return "".join(lines)


# ---- Nebula ----------------------------------------------------------------------------------


def _port(ports: str) -> str | int:
    return int(ports) if ports.isdigit() else ports


def _rules(rule: OverlayAdmit, **match: YamlValue) -> list[YamlValue]:
    """Nebula firewall rules for one admit rule: one per port (or `any` for icmp)."""
    ports: list[str | int] = [_port(p) for p in rule.ports] or ["any"]
    return [{"port": port, "proto": rule.proto, **match} for port in ports]


def _common(overlay: Overlay, itself: str | None) -> dict[str, YamlValue]:
    """What every member's configuration says: its certificates, where the servers are, and
    which of them are lighthouses."""
    servers = {n: s for n, s in overlay.servers.items() if n != itself}
    lighthouses = [s.address for s in servers.values() if s.lighthouse]
    return {
        "pki": {"ca": CA_CERT, "cert": HOST_CERT, "key": HOST_KEY},
        "static_host_map": {
            s.address: [f"{s.host}:{s.port}"] for s in servers.values() if s.host is not None
        },
        "lighthouse": {
            "am_lighthouse": False,
            "interval": LIGHTHOUSE_INTERVAL,
            "hosts": lighthouses,
        },
    }


def _device() -> dict[str, YamlValue]:
    return {
        "punchy": {"punch": True},
        "tun": {
            "dev": NEBULA_DEV,
            "drop_local_broadcast": True,
            "drop_multicast": True,
            "mtu": NEBULA_MTU,
        },
        "logging": {"format": "text", "level": "info"},
    }


def compartment_config(ws: Workstation, name: str) -> dict[str, YamlValue]:
    """A compartment's Nebula configuration: it reaches what the servers admit for its groups,
    each server by its overlay address, and nothing reaches it (answers come back by the
    firewall's connection tracking)."""
    overlay = ws.overlay
    compartment = ws.compartments[name]
    if overlay is None or compartment.overlay is None:
        raise ValueError(f"compartment {name!r} is not on the overlay")
    outbound: list[YamlValue] = []
    for server in overlay.servers.values():
        for rule in admitted(compartment, server):
            outbound += _rules(rule, cidr=f"{server.address}/32")
    return {
        **_common(overlay, None),
        # A random port: it only ever starts the conversations.
        "listen": {"host": ANY_ADDRESS, "port": 0},
        **_device(),
        "firewall": {"outbound": outbound, "inbound": []},
    }


def server_config(overlay: Overlay, name: str) -> dict[str, YamlValue]:
    """A server's Nebula configuration: it admits each rule's groups, one rule per group (a
    Nebula rule's `groups` would ask for all of them at once)."""
    server = overlay.servers[name]
    common = _common(overlay, name)
    if server.lighthouse:
        common["lighthouse"] = {"am_lighthouse": True}
    inbound: list[YamlValue] = []
    for rule in server.admit:
        for group in rule.groups:
            inbound += _rules(rule, group=group)
    return {
        **common,
        "listen": {"host": ANY_ADDRESS, "port": server.port},
        **_device(),
        "firewall": {
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": inbound,
        },
    }


# ---- Tailscale / Headscale -------------------------------------------------------------------


def compartment_tag(name: str) -> str:
    return f"tag:qnix-{name}"


def server_tag(name: str) -> str:
    return f"tag:server-{name}"


def _destination(server: str, rule: OverlayAdmit) -> str:
    return f"{server_tag(server)}:{','.join(rule.ports) or '*'}"


def tailscale_policy(ws: Workstation) -> dict[str, object]:
    """The tailnet policy: a tag per compartment and per server, an accept per compartment and
    what the servers admit for its groups, and tests that the others are denied."""
    overlay = ws.overlay
    if overlay is None:
        raise ValueError("the spec has no [overlay]")
    on = members(ws)
    owners = list(overlay.tag_owners)
    tags = [compartment_tag(n) for n in on] + [server_tag(n) for n in overlay.servers]
    acls: list[object] = []
    tests: list[object] = []
    for name, compartment in on.items():
        accept: list[str] = []
        deny: list[str] = []
        for server_name, server in overlay.servers.items():
            allowed = admitted(compartment, server)
            for rule in allowed:
                acls.append(
                    {
                        "action": "accept",
                        "src": [compartment_tag(name)],
                        "proto": rule.proto,
                        "dst": [_destination(server_name, rule)],
                    }
                )
            for rule in server.admit:
                if rule.proto == "icmp":
                    continue  # a test names a port
                probe = f"{server_tag(server_name)}:{rule.ports[0].split('-')[0]}"
                (accept if rule in allowed else deny).append(probe)
        if accept or deny:
            test: dict[str, object] = {"src": compartment_tag(name)}
            if accept:
                test["accept"] = accept
            if deny:
                test["deny"] = deny
            tests.append(test)
    return {
        "tagOwners": dict.fromkeys(sorted(tags), owners),
        "acls": acls,
        "tests": tests,
    }


def render_tailscale_policy(ws: Workstation) -> str:
    """The policy as HuJSON (JSON with comments), ready for the admin console or Headscale."""
    header = (
        f"// The tailnet policy of workstation {ws.host.hostname}'s compartments, written by\n"
        "// qnix from its spec: edit the spec, not this file. Give each compartment's node\n"
        "// its tag:qnix-<compartment> and each server's node its tag:server-<server>.\n"
    )
    return header + json.dumps(tailscale_policy(ws), indent=2) + "\n"


def tailscale_up_flags(ws: Workstation, name: str) -> list[str]:
    flags = [f"--advertise-tags={compartment_tag(name)}"]
    if ws.overlay is not None and ws.overlay.login_server is not None:
        flags.append(f"--login-server={ws.overlay.login_server}")
    return flags


def tailscale_containers(ws: Workstation) -> dict[str, NixValue]:
    """`containers.<name>` settings for the container compartments with a Tailscale auth key:
    tailscaled inside the container (its own network namespace), logged in with the key the
    secrets module puts at /run/secrets and tagged as the compartment. NixOS merges this
    `config` with the container's own."""
    containers: dict[str, NixValue] = {}
    for name, compartment in members(ws).items():
        identity = compartment.overlay
        if compartment.isolation != "container" or identity is None:
            continue
        if identity.tailscale_auth_key is None:
            continue
        tailscale: dict[str, NixValue] = {
            "authKeyFile": f"{SECRETS_INSIDE}/{identity.tailscale_auth_key}",
            "enable": True,
            "extraUpFlags": list(tailscale_up_flags(ws, name)),
        }
        containers[name] = {
            "config": Function(("pkgs",), {"services": {"tailscale": tailscale}}),
            "enableTun": True,
        }
    return containers


def overlay_files(ws: Workstation) -> dict[str, str]:
    """The overlay's files of a build, by relative path (none without `[overlay]`)."""
    if ws.overlay is None:
        return {}
    files = {TAILSCALE_POLICY: render_tailscale_policy(ws)}
    for name in members(ws):
        files[compartment_config_file(name)] = render_yaml(compartment_config(ws, name))
    for name in ws.overlay.servers:
        files[server_config_file(name)] = render_yaml(server_config(ws.overlay, name))
    return files
