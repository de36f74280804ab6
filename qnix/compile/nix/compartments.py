"""Compartments on NixOS: where their state lives, NixOS containers, and what the host needs to
run namespace compartments itself.

State. Each compartment owns `/var/lib/qnix/compartments/<name>` (mode 0700, its own unix user);
a persistent one keeps its home in `home/` and each persistent path in `paths/<hash>`, named by
a hash of the path so that no spec text reaches a tmpfiles line or a file name. A disposable keeps
nothing there.

Containers (`isolation = "container"`) are NixOS containers, each with a user namespace of its
own: 65536 host uids from names.allocate_container_ranges, the user inside is uid 1000 of it, and
the compartment's host account is that same host uid, so the folders bound in (state, secrets)
are the user's own inside. The veth to the host is an extra veth
named `names.host_ifname(name)`, not NixOS' own `ve-<name>`: the `inet qnix` table matches the
`qx*` interfaces only, so a `ve-*` link would bypass the compartment's firewall. Resource limits
go on the container's unit, `container@<name>.service`: NixOS starts systemd-nspawn with
`--keep-unit`, and nspawn ignores `--property=` then.

Namespace compartments are started by the qnix runtime with bubblewrap; NixOS provides their
state directories, bubblewrap, user namespaces, and a profile holding their packages
(`/etc/qnix/profiles/<name>`, also one per disposable template).

Secrets. A container or VM listing age secrets finds them at /run/secrets: the secrets module's
unit decrypts them into `/run/qnix-secrets/<name>` before the compartment starts, and that folder
is bound read-only into the container (here) or shared read-only into the VM (vms.py).
"""

from __future__ import annotations

import hashlib
import re

from qnix.compile.names import (
    CONTAINER_USER_ID,
    Link,
    allocate_container_ranges,
    allocate_links,
    host_id,
    host_ifname,
    unix_user,
)
from qnix.compile.nix.printer import Call, Function, NixValue, attr_path
from qnix.spec.model import NETWORK_NONE, Compartment, CompartmentBase, Workstation

STATE_ROOT = "/var/lib/qnix"
COMPARTMENTS_ROOT = f"{STATE_ROOT}/compartments"
PROFILES_ETC = "qnix/profiles"  # below /etc
# Where the secrets units decrypt a container's or VM's age secrets, a folder each: not under
# the qnix runtime's /run/qnix, which `qnix down` removes whole.
SECRETS_RUNTIME_DIR = "/run/qnix-secrets"
# Where a compartment finds its secrets (qnix.runtime.secrets.SECRETS_INSIDE says the same).
SECRETS_INSIDE = "/run/secrets"

# What a tmpfiles path may hold: qnix builds these from names and hashes only.
_TMPFILES_PATH = re.compile(r"/[A-Za-z0-9_./-]+")


def state_dir(name: str) -> str:
    return f"{COMPARTMENTS_ROOT}/{name}"


def home_dir(name: str) -> str:
    return f"{state_dir(name)}/home"


def persistent_dir(name: str, path: str) -> str:
    """Where the host keeps a persistent path of a compartment."""
    return f"{state_dir(name)}/paths/{hashlib.sha256(path.encode()).hexdigest()[:16]}"


def secrets_dir(name: str) -> str:
    """Where the host holds a container's or VM's decrypted age secrets while it runs."""
    return f"{SECRETS_RUNTIME_DIR}/{name}"


def lists_age_secrets(ws: Workstation, compartment: CompartmentBase) -> bool:
    """Whether the NixOS output decrypts secrets for it (pass secrets are the runtime's)."""
    return any(ws.secrets[name].source == "age" for name in compartment.secrets)


def secrets_mount(ws: Workstation, compartment: Compartment) -> str | None:
    """The host folder to show read-only at /run/secrets inside a container or VM, if any."""
    if not lists_age_secrets(ws, compartment):
        return None
    for path in persistent_mounts(compartment):
        # A persistent path there would hide the secrets or sit inside a read-only mount.
        if path == SECRETS_INSIDE or path.startswith(f"{SECRETS_INSIDE}/"):
            raise ValueError(f"persistent path {path!r} overlaps {SECRETS_INSIDE}")
    return secrets_dir(compartment.name)


def home_inside(compartment: CompartmentBase) -> str:
    return f"/home/{compartment.user}"


def persistent_mounts(compartment: Compartment) -> dict[str, str]:
    """Mount point inside -> directory on the host, for a persistent compartment; sorted."""
    if compartment.persistence != "persistent":
        return {}
    mounts = {home_inside(compartment): home_dir(compartment.name)}
    for path in compartment.persistent_paths:
        mounts[path] = persistent_dir(compartment.name, path)
    return dict(sorted(mounts.items()))


def tmpfiles_dir(path: str, mode: str, owner: str, group: str) -> str:
    """A systemd-tmpfiles `d` line. Only qnix-made paths and validated user names get here."""
    if not _TMPFILES_PATH.fullmatch(path) or ".." in path:
        raise ValueError(f"not a path qnix makes: {path!r}")
    for word in (mode, owner, group):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", word):
            raise ValueError(f"not a tmpfiles field: {word!r}")
    return f"d {path} {mode} {owner} {group} -"


def state_rules(ws: Workstation) -> list[str]:
    rules = [
        tmpfiles_dir(STATE_ROOT, "0755", "root", "root"),
        tmpfiles_dir(COMPARTMENTS_ROOT, "0755", "root", "root"),
    ]
    for compartment in ws.compartments.values():
        user = unix_user(compartment.name)
        directories = {state_dir(compartment.name), *persistent_mounts(compartment).values()}
        if compartment.persistent_paths:
            directories.add(f"{state_dir(compartment.name)}/paths")
        # Sorted, a directory comes before those inside it.
        rules += [tmpfiles_dir(path, "0700", user, user) for path in sorted(directories)]
    return rules


def package_list(compartment: CompartmentBase) -> list[NixValue]:
    return [attr_path("pkgs", *package.split(".")) for package in compartment.packages]


def links(ws: Workstation) -> dict[str, Link]:
    return allocate_links(ws.compartments, ws.host.subnet)


def container_ranges(ws: Workstation) -> dict[str, int]:
    """The first host uid of each container's user namespace (its privateUsers)."""
    return allocate_container_ranges(
        c.name for c in ws.compartments.values() if c.isolation == "container"
    )


def host_uids(ws: Workstation) -> dict[str, int]:
    """The uid of each compartment's host account, which owns its state and secrets. A
    container's is the host side of its user inside (uid 1000 in its range), so the folders
    bound into it are that user's own; any other's is the qnix runtime's (names.host_id)."""
    ranges = container_ranges(ws)
    return {
        name: ranges[name] + CONTAINER_USER_ID if name in ranges else host_id(link, ws.host.subnet)
        for name, link in links(ws).items()
    }


def _container(
    ws: Workstation, compartment: Compartment, link: Link, uid_range: int
) -> dict[str, NixValue]:
    ifname = host_ifname(compartment.name)
    networked = compartment.network != NETWORK_NONE
    config: dict[str, NixValue] = {
        "environment": {"systemPackages": package_list(compartment)},
        "system": {"stateVersion": ws.host.state_version},
        "users": {"users": {compartment.user: {"isNormalUser": True, "uid": CONTAINER_USER_ID}}},
    }
    container: dict[str, NixValue] = {
        "autoStart": compartment.autostart,
        "config": Function(("pkgs",), config),
        "ephemeral": compartment.persistence == "disposable",
        "privateNetwork": True,
        # Not "pick": the bound state and secrets belong to the host side of the user inside.
        "privateUsers": uid_range,
    }
    if networked:
        config["networking"] = {"defaultGateway": {"address": link.gateway, "interface": ifname}}
        container["extraVeths"] = {
            ifname: {"hostAddress": link.gateway, "localAddress": link.address}
        }
    bind_mounts: dict[str, NixValue] = {
        mount_point: {"hostPath": source, "isReadOnly": False, "mountPoint": mount_point}
        for mount_point, source in persistent_mounts(compartment).items()
    }
    secrets = secrets_mount(ws, compartment)
    if secrets is not None:
        bind_mounts[SECRETS_INSIDE] = {
            "hostPath": secrets,
            "isReadOnly": True,
            "mountPoint": SECRETS_INSIDE,
        }
    if bind_mounts:
        container["bindMounts"] = dict(sorted(bind_mounts.items()))
    return container


def resource_limits(compartment: CompartmentBase) -> dict[str, NixValue]:
    """systemd resource-control settings for the unit a compartment runs in."""
    return {
        "CPUQuota": f"{compartment.cpus * 100}%",
        "MemoryMax": f"{compartment.memory_mb}M",
        "TasksMax": compartment.pids,
    }


def profile(name: str, body: CompartmentBase) -> dict[str, NixValue]:
    """The packages of a compartment the runtime starts itself, kept alive through /etc."""
    return {
        "source": Call(
            attr_path("pkgs", "buildEnv"), {"name": f"qnix-{name}", "paths": package_list(body)}
        )
    }


def compartments_module(ws: Workstation) -> dict[str, NixValue]:
    containers = [c for c in ws.compartments.values() if c.isolation == "container"]
    # What the runtime starts itself: namespace compartments, and disposables of any template.
    run_by_qnix: dict[str, CompartmentBase] = {
        **{c.name: c for c in ws.compartments.values() if c.isolation == "namespace"},
        **ws.disposable_templates,
    }
    config: dict[str, NixValue] = {}
    systemd: dict[str, NixValue] = {"tmpfiles": {"rules": state_rules(ws)}}
    if containers:
        all_links = links(ws)
        ranges = container_ranges(ws)
        config["containers"] = {
            c.name: _container(ws, c, all_links[c.name], ranges[c.name]) for c in containers
        }
        systemd["services"] = {
            f"container@{c.name}": {"serviceConfig": resource_limits(c)} for c in containers
        }
    if run_by_qnix:
        config["environment"] = {
            "etc": {
                f"{PROFILES_ETC}/{name}": profile(name, body) for name, body in run_by_qnix.items()
            },
            "systemPackages": [attr_path("pkgs", "bubblewrap")],
        }
    if containers or run_by_qnix:
        # bubblewrap and a container's privateUsers both need user namespaces.
        config["security"] = {"allowUserNamespaces": True}
    config["systemd"] = systemd
    return config
