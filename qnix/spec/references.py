"""Names in a spec that must point at something in the same spec: networks, secrets,
disposable templates. (Names in policy lines are checked where the policy is read.)"""

from __future__ import annotations

import ipaddress

from qnix.errors import Problem
from qnix.spec import model
from qnix.spec.model import NETWORK_NONE, NETWORK_UPLINK, Workstation
from qnix.spec.wording import did_you_mean, show


def check_spec_references(file: str, workstation: Workstation) -> list[Problem]:
    """Names that must point at something: networks, secrets, templates."""
    problems: list[Problem] = []
    compartments = workstation.compartments
    templates = workstation.disposable_templates

    for name in sorted(set(compartments) & set(templates)):
        problems.append(
            Problem(
                file,
                f"disposable_templates.{name}",
                "has the name of a compartment",
                show(name),
                "a name can mean only one thing in a policy; rename one of them",
            )
        )

    networked: list[tuple[str, model.CompartmentBase]] = [
        *((f"compartments.{n}", c) for n, c in compartments.items()),
        *((f"disposable_templates.{n}", t) for n, t in templates.items()),
    ]
    for where, unit in networked:
        net = unit.network
        if net in (NETWORK_NONE, NETWORK_UPLINK):
            continue
        target = compartments.get(net)
        if target is None:
            close = did_you_mean(net, [*compartments, NETWORK_NONE, NETWORK_UPLINK])
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    "names no compartment",
                    show(net),
                    close or 'use "none", "uplink" or a net compartment',
                )
            )
        elif not target.provides_network:
            problems.append(
                Problem(
                    file,
                    f"{where}.network",
                    f"{net!r} is not a net compartment",
                    show(net),
                    f"set provides_network = true in compartments.{net}",
                )
            )

    problems += _network_cycles(file, workstation)
    problems += _overlay_problems(file, workstation)

    for where, unit in networked:
        for index, secret_name in enumerate(unit.secrets):
            secret = workstation.secrets.get(secret_name)
            if secret is None:
                problems.append(
                    Problem(
                        file,
                        f"{where}.secrets[{index}]",
                        "names no secret",
                        show(secret_name),
                        did_you_mean(secret_name, list(workstation.secrets))
                        or "declare it under [secrets]",
                    )
                )
            elif secret.source == "pass" and unit.isolation != "namespace":
                # NixOS starts containers and VMs itself, at boot: no password store is open.
                problems.append(
                    Problem(
                        file,
                        f"{where}.secrets[{index}]",
                        f"a pass secret cannot reach a {unit.isolation} compartment",
                        show(secret_name),
                        "NixOS decrypts a container's or VM's secrets at boot with the host's "
                        'key: make it an age secret, or use isolation = "namespace"',
                    )
                )

    if (
        workstation.default_disposable is not None
        and workstation.default_disposable not in templates
    ):
        problems.append(
            Problem(
                file,
                "default_disposable",
                "names no disposable template",
                show(workstation.default_disposable),
                did_you_mean(workstation.default_disposable, list(templates))
                or "declare it under [disposable_templates]",
            )
        )

    return problems


def _network_cycles(file: str, workstation: Workstation) -> list[Problem]:
    """A net chain must end at the uplink; report each cycle once, from its smallest name."""
    problems = []
    compartments = workstation.compartments
    reported: set[str] = set()
    for start in compartments:
        seen: list[str] = []
        current: str | None = start
        while current is not None and current in compartments and current not in seen:
            seen.append(current)
            current = compartments[current].network
        if current is not None and current in seen:
            cycle = seen[seen.index(current) :]
            key = min(cycle)
            if key in reported:
                continue
            reported.add(key)
            ring = " -> ".join([*cycle, current])
            problems.append(
                Problem(
                    file,
                    f"compartments.{key}.network",
                    f"network chain is a cycle: {ring}",
                    show(compartments[key].network),
                    'one net compartment in the chain must use network = "uplink"',
                )
            )
    return problems


def _lets_out(rule: model.FirewallRule, server: model.OverlayServer) -> bool:
    """Whether a firewall rule lets a compartment's overlay traffic reach a server's port."""
    if rule.proto != "udp" or server.host is None:
        return False
    if not any(_port_in(server.port, ports) for ports in rule.ports):
        return False
    if rule.host is not None:
        return rule.host == server.host
    if rule.cidr is None:
        return False
    try:
        address = ipaddress.ip_address(server.host)
    except ValueError:
        return False  # a name: only a rule naming it lets it out
    return address in ipaddress.ip_network(rule.cidr)


def _port_in(port: int, ports: str) -> bool:
    low, _, high = ports.partition("-")
    return int(low) <= port <= int(high or low)


def _firewall_hint(server: model.OverlayServer) -> str:
    host = server.host or ""
    try:
        target = f'cidr = "{ipaddress.ip_address(host)}/32"'
    except ValueError:
        target = f'host = "{host}"'
    return f'add {{ proto = "udp", {target}, ports = [{server.port}] }} to its firewall'


def _overlay_problems(file: str, workstation: Workstation) -> list[Problem]:
    """Each overlay address inside the overlay's subnet and used once; a compartment on the
    overlay has a network, runs where its namespace holds the overlay's interface, and its
    firewall lets it reach each lighthouse."""
    problems: list[Problem] = []
    overlay = workstation.overlay
    members = {n: (c, c.overlay) for n, c in workstation.compartments.items() if c.overlay}
    if overlay is None:
        problems += [
            Problem(
                file,
                f"compartments.{name}.overlay",
                "there is no [overlay] to join",
                hint="add [overlay] with its subnet and servers (docs/fleet.md)",
            )
            for name in members
        ]
        return problems
    subnet = ipaddress.ip_network(overlay.subnet)
    taken: dict[str, str] = {}
    placed = [(f"overlay.servers.{n}", s.address) for n, s in overlay.servers.items()]
    placed += [(f"compartments.{n}.overlay", o.address) for n, (_, o) in members.items()]
    for where, address in placed:
        parsed = ipaddress.ip_address(address)
        if parsed not in subnet or parsed in (subnet.network_address, subnet.broadcast_address):
            problems.append(
                Problem(
                    file,
                    f"{where}.address",
                    f"is not a host address of the overlay's subnet {overlay.subnet}",
                    show(address),
                )
            )
        elif address in taken:
            problems.append(
                Problem(
                    file,
                    f"{where}.address",
                    f"is already the address of {taken[address]}",
                    show(address),
                    "each member of the overlay needs an address of its own",
                )
            )
        else:
            taken[address] = where.removesuffix(".overlay")
    lighthouses = [s for s in overlay.servers.values() if s.lighthouse]
    for name, (compartment, identity) in members.items():
        where = f"compartments.{name}"
        if compartment.network == NETWORK_NONE:
            problems.append(
                Problem(
                    file,
                    f"{where}.overlay",
                    'the overlay needs a network, but network is "none"',
                    hint='set network = "uplink" or a net compartment',
                )
            )
            continue
        if compartment.isolation == "vm":
            problems.append(
                Problem(
                    file,
                    f"{where}.overlay",
                    "a VM compartment cannot join the overlay yet",
                    show(compartment.isolation),
                    "the overlay's interface is made in the compartment's namespace, which a "
                    'VM\'s guest does not share: use isolation = "namespace" or "container"',
                )
            )
        for server in lighthouses:
            if not any(_lets_out(rule, server) for rule in compartment.firewall):
                problems.append(
                    Problem(
                        file,
                        f"{where}.firewall",
                        f"does not let the overlay reach lighthouse {server.host}:{server.port}",
                        hint=_firewall_hint(server),
                    )
                )
        key = identity.tailscale_auth_key
        if key is not None and compartment.isolation != "container":
            problems.append(
                Problem(
                    file,
                    f"{where}.overlay.tailscale_auth_key",
                    "only a container compartment runs Tailscale on NixOS",
                    show(key),
                    'use isolation = "container" (tailscaled runs inside the container), or '
                    "drop it: the qnix runtime joins the compartment to Nebula",
                )
            )
        elif key is not None and key not in compartment.secrets:
            problems.append(
                Problem(
                    file,
                    f"{where}.overlay.tailscale_auth_key",
                    "names a secret the compartment does not list",
                    show(key),
                    f'add "{key}" to compartments.{name}.secrets',
                )
            )
    return problems
