"""Names in a spec that must point at something in the same spec: networks, secrets,
disposable templates. (Names in policy lines are checked where the policy is read.)"""

from __future__ import annotations

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
