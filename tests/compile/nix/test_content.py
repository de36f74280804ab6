"""What each module says, value by value."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from qnix.compile.desktop import hyprland_rules, sway_fragment
from qnix.compile.names import (
    allocate_container_ranges,
    allocate_links,
    host_ifname,
    link_slot,
    unix_user,
)
from qnix.compile.nix.modules import module_trees
from qnix.compile.nix.printer import Call, Function, NixValue, Raw
from qnix.runtime import live
from tests.compile.nix import reference
from tests.compile.nix.support import (
    MIXED_COMPARTMENTS,
    TEMPLATES,
    all_workstations,
    example_workstations,
    nix_files,
    trees,
    workstation,
)

KSPP_STRICT = {
    "dev.tty.ldisc_autoload": 0,
    "dev.tty.legacy_tiocsti": 0,
    "fs.protected_fifos": 2,
    "fs.protected_hardlinks": 1,
    "fs.protected_regular": 2,
    "fs.protected_symlinks": 1,
    "fs.suid_dumpable": 0,
    "kernel.dmesg_restrict": 1,
    "kernel.kexec_load_disabled": 1,
    "kernel.kptr_restrict": 2,
    "kernel.oops_limit": 100,
    "kernel.perf_event_paranoid": 3,
    "kernel.randomize_va_space": 2,
    "kernel.sysrq": 0,
    "kernel.unprivileged_bpf_disabled": 1,
    "kernel.warn_limit": 100,
    "kernel.yama.ptrace_scope": 2,
    "net.core.bpf_jit_harden": 2,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.all.accept_source_route": 0,
    "net.ipv4.conf.all.log_martians": 1,
    "net.ipv4.conf.all.rp_filter": 1,
    "net.ipv4.conf.all.secure_redirects": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv4.conf.default.accept_source_route": 0,
    "net.ipv4.conf.default.log_martians": 1,
    "net.ipv4.conf.default.rp_filter": 1,
    "net.ipv4.conf.default.secure_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
    "net.ipv4.icmp_echo_ignore_broadcasts": 1,
    "net.ipv4.icmp_ignore_bogus_error_responses": 1,
    "net.ipv4.tcp_syncookies": 1,
    "net.ipv6.conf.all.accept_ra": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.all.accept_source_route": 0,
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv6.conf.default.accept_redirects": 0,
    "net.ipv6.conf.default.accept_source_route": 0,
    "vm.mmap_min_addr": 65536,
    "vm.unprivileged_userfaultfd": 0,
}
STRICT_PARAMS = [
    "slab_nomerge",
    "init_on_alloc=1",
    "init_on_free=1",
    "page_alloc.shuffle=1",
    "randomize_kstack_offset=on",
    "vsyscall=none",
    "debugfs=off",
]
PARANOID_EXTRA_PARAMS = ["lockdown=confidentiality", "module.sig_enforce=1", "oops=panic"]


def get(tree: Any, *path: str) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def module(ws: Any, concern: str) -> dict[str, NixValue]:
    return trees(ws)[concern]


def leaves(
    tree: NixValue, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], NixValue]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, tree


# ---- hardening -------------------------------------------------------------------------------


def test_baseline_sets_the_three_sysctls_every_profile_has() -> None:
    hardening = module(workstation({"hardening": "baseline"}), "hardening")
    assert get(hardening, "boot", "kernel", "sysctl") == {
        "kernel.dmesg_restrict": 1,
        "kernel.kptr_restrict": 2,
        "net.ipv4.tcp_syncookies": 1,
    }
    assert "kernelParams" not in hardening["boot"]
    assert "kexec" not in hardening["boot"]
    assert get(hardening, "security") == {"protectKernelImage": True}


def test_strict_adds_the_kspp_sysctls_params_and_locks() -> None:
    hardening = module(workstation({"hardening": "strict"}), "hardening")
    assert get(hardening, "boot", "kernel", "sysctl") == KSPP_STRICT
    assert get(hardening, "boot", "kernelParams") == STRICT_PARAMS
    assert get(hardening, "boot", "kexec") == {"enable": False}
    assert get(hardening, "security") == {
        "apparmor": {"enable": True},
        "lockKernelModules": True,
        "protectKernelImage": True,
    }


def test_paranoid_goes_further() -> None:
    hardening = module(workstation({"hardening": "paranoid"}), "hardening")
    assert get(hardening, "boot", "kernel", "sysctl") == {
        **KSPP_STRICT,
        "kernel.io_uring_disabled": 2,
        "kernel.yama.ptrace_scope": 3,
    }
    assert get(hardening, "boot", "kernelParams") == STRICT_PARAMS + PARANOID_EXTRA_PARAMS
    assert get(hardening, "security") == {
        "allowSimultaneousMultithreading": False,
        "apparmor": {"enable": True, "killUnconfinedConfinables": True},
        "lockKernelModules": True,
        "protectKernelImage": True,
    }
    audit = module(workstation({"hardening": "paranoid"}), "audit")
    assert get(audit, "security", "audit", "enable") == "lock"


@pytest.mark.parametrize("system", ["aarch64-linux", "riscv64-linux"])
def test_x86_only_parameters_stay_off_other_systems(system: str) -> None:
    hardening = module(workstation({"hardening": "paranoid", "system": system}), "hardening")
    assert get(hardening, "boot", "kernelParams") == [
        p for p in STRICT_PARAMS + PARANOID_EXTRA_PARAMS if p != "vsyscall=none"
    ]
    assert get(hardening, "nixpkgs", "hostPlatform") == system


def test_rp_filter_is_loose_only_behind_a_net_compartment() -> None:
    behind = workstation({"hardening": "strict"}, MIXED_COMPARTMENTS)
    sysctl = get(module(behind, "hardening"), "boot", "kernel", "sysctl")
    assert sysctl["net.ipv4.conf.all.rp_filter"] == 2
    assert sysctl["net.ipv4.conf.default.rp_filter"] == 2
    uplink_only = workstation(
        {"hardening": "strict"}, {"web": {"network": "uplink", "firewall": [{"dns": True}]}}
    )
    sysctl = get(module(uplink_only, "hardening"), "boot", "kernel", "sysctl")
    assert sysctl["net.ipv4.conf.all.rp_filter"] == 1


def test_host_identity() -> None:
    ws = workstation({"hostname": "desk-7", "timezone": "Europe/Berlin", "system": "aarch64-linux"})
    hardening = module(ws, "hardening")
    assert hardening["networking"] == {"hostName": "desk-7"}
    assert hardening["time"] == {"timeZone": "Europe/Berlin"}
    assert hardening["nixpkgs"] == {"hostPlatform": "aarch64-linux"}
    assert hardening["system"] == {"stateVersion": "25.11"}


HIBERNATING_HOST = {
    "hardening": "baseline",
    "disk": {"encryption": "none", "tpm2": False, "swap_gb": 16},
    "desktop": {"lid_switch": "hibernate"},
}


def test_hibernating_on_lid_close_keeps_the_kernel_image_replaceable() -> None:
    ws = workstation(HIBERNATING_HOST)
    assert get(module(ws, "hardening"), "security", "protectKernelImage") is False


# ---- compartments ----------------------------------------------------------------------------

MIXED = workstation({"hardening": "strict"}, MIXED_COMPARTMENTS, disposable_templates=TEMPLATES)
LINKS = allocate_links(MIXED.compartments, MIXED.host.subnet)
CONTAINER_RANGES = allocate_container_ranges(
    c.name for c in MIXED.compartments.values() if c.isolation == "container"
)


def test_containers_are_nixos_containers_with_their_own_veth() -> None:
    containers = get(module(MIXED, "compartments"), "containers")
    assert sorted(containers) == ["a-compartment-name-of-31-chars1", "sys-net", "work"]
    work = containers["work"]
    ifname = host_ifname("work")
    assert re.fullmatch(r"qx[0-9a-f]{10}", ifname)
    assert {k: v for k, v in work.items() if k != "config"} == {
        "autoStart": True,
        "bindMounts": {
            "/home/user": {
                "hostPath": "/var/lib/qnix/compartments/work/home",
                "isReadOnly": False,
                "mountPoint": "/home/user",
            },
            "/home/user/.mozilla": {
                "hostPath": "/var/lib/qnix/compartments/work/paths/"
                + hashlib.sha256(b"/home/user/.mozilla").hexdigest()[:16],
                "isReadOnly": False,
                "mountPoint": "/home/user/.mozilla",
            },
            "/srv/data": {
                "hostPath": "/var/lib/qnix/compartments/work/paths/"
                + hashlib.sha256(b"/srv/data").hexdigest()[:16],
                "isReadOnly": False,
                "mountPoint": "/srv/data",
            },
        },
        "ephemeral": False,
        "extraVeths": {
            ifname: {"hostAddress": LINKS["work"].gateway, "localAddress": LINKS["work"].address}
        },
        "privateNetwork": True,
        "privateUsers": CONTAINER_RANGES["work"],
    }
    config = work["config"]
    assert isinstance(config, Function)
    assert config.params == ("pkgs",)
    assert config.body == {
        "environment": {
            "systemPackages": [Raw("pkgs.firefox"), Raw("pkgs.python3Packages.requests")]
        },
        "networking": {"defaultGateway": {"address": LINKS["work"].gateway, "interface": ifname}},
        "system": {"stateVersion": "25.11"},
        "users": {"users": {"user": {"isNormalUser": True, "uid": 1000}}},
    }


def test_what_is_bound_into_a_container_or_vm_belongs_to_the_user_inside() -> None:
    """A container's user namespace maps its uid 1000 to the host account that owns its state
    and secrets; a VM's user has that account's uid. No container's range holds another's, or
    any host uid a compartment of the spec runs as."""
    users = get(module(MIXED, "users"), "users", "users")
    containers = get(module(MIXED, "compartments"), "containers")
    runtime_uids = {live.host_identity(MIXED, name).uid for name in MIXED.compartments}
    spans = []
    for name, container in containers.items():
        first = container["privateUsers"]
        assert isinstance(first, int)
        inner = container["config"].body["users"]["users"]["user"]["uid"]
        assert users[unix_user(name)]["uid"] == first + inner == first + 1000
        assert first >= 0x10000000 and first + 0x10000 <= 0x70000000
        assert not [uid for uid in runtime_uids if first <= uid < first + 0x10000]
        spans.append(range(first, first + 0x10000))
    assert len(spans) == 3
    for one, other in itertools.combinations(spans, 2):
        assert one.stop <= other.start or other.stop <= one.start
    vms = get(module(MIXED, "vms"), "microvm", "vms")
    for name, vm in vms.items():
        guest_uid = vm["config"].body["users"]["users"]["user"]["uid"]
        host_uid = live.host_identity(MIXED, name).uid
        assert guest_uid == users[unix_user(name)]["uid"] == host_uid


def test_a_disposable_container_is_ephemeral_and_keeps_nothing() -> None:
    sys_net = get(module(MIXED, "compartments"), "containers", "sys-net")
    assert sys_net["ephemeral"] is True
    assert "bindMounts" not in sys_net
    assert sys_net["autoStart"] is True


def test_a_container_without_network_has_no_veth_at_all() -> None:
    ws = workstation({}, {"offline": {"isolation": "container"}})
    offline = get(module(ws, "compartments"), "containers", "offline")
    assert offline["privateNetwork"] is True
    assert "extraVeths" not in offline
    assert "networking" not in offline["config"].body


def test_container_limits_go_on_the_container_unit() -> None:
    services = get(module(MIXED, "compartments"), "systemd", "services")
    assert services["container@work"] == {
        "serviceConfig": {"CPUQuota": "400%", "MemoryMax": "4096M", "TasksMax": 2048}
    }
    assert services["container@sys-net"] == {
        "serviceConfig": {"CPUQuota": "200%", "MemoryMax": "512M", "TasksMax": 1024}
    }


def test_state_directories_belong_to_each_compartments_user() -> None:
    rules = get(module(MIXED, "compartments"), "systemd", "tmpfiles", "rules")
    assert rules[:2] == [
        "d /var/lib/qnix 0755 root root -",
        "d /var/lib/qnix/compartments 0755 root root -",
    ]
    mozilla = hashlib.sha256(b"/home/user/.mozilla").hexdigest()[:16]
    data = hashlib.sha256(b"/srv/data").hexdigest()[:16]
    work = [rule for rule in rules if "/compartments/work" in rule]
    assert work == [
        "d /var/lib/qnix/compartments/work 0700 qx-work qx-work -",
        "d /var/lib/qnix/compartments/work/home 0700 qx-work qx-work -",
        "d /var/lib/qnix/compartments/work/paths 0700 qx-work qx-work -",
        f"d /var/lib/qnix/compartments/work/paths/{data} 0700 qx-work qx-work -",
        f"d /var/lib/qnix/compartments/work/paths/{mozilla} 0700 qx-work qx-work -",
    ]
    assert [r for r in rules if "/compartments/browse" in r] == [
        "d /var/lib/qnix/compartments/browse 0700 qx-browse qx-browse -"
    ]


def test_namespace_compartments_get_bubblewrap_user_namespaces_and_a_profile() -> None:
    compartments = module(MIXED, "compartments")
    assert get(compartments, "security") == {"allowUserNamespaces": True}
    assert get(compartments, "environment", "systemPackages") == [Raw("pkgs.bubblewrap")]
    etc = get(compartments, "environment", "etc")
    assert sorted(etc) == [
        "qnix/profiles/browse",
        "qnix/profiles/default-dvm",
        "qnix/profiles/vault",
    ]
    assert etc["qnix/profiles/vault"] == {
        "source": Call(
            Raw("pkgs.buildEnv"), {"name": "qnix-vault", "paths": [Raw("pkgs.keepassxc")]}
        )
    }


def test_no_compartments_means_no_containers_and_no_user_namespaces() -> None:
    compartments = module(workstation({}), "compartments")
    assert compartments == {
        "systemd": {
            "tmpfiles": {
                "rules": [
                    "d /var/lib/qnix 0755 root root -",
                    "d /var/lib/qnix/compartments 0755 root root -",
                ]
            }
        }
    }


# ---- VMs -------------------------------------------------------------------------------------


def test_vms_are_microvms() -> None:
    vms = module(MIXED, "vms")
    assert vms["microvm"]["host"] == {"enable": True}  # type: ignore[index]
    assert get(vms, "boot", "kernelModules") == ["tun", "vhost_net"]
    build = get(vms, "microvm", "vms", "build")
    assert build["autostart"] is True
    guest = build["config"].body
    ifname = host_ifname("build")
    mac = guest["microvm"]["interfaces"][0]["mac"]
    assert guest["microvm"] == {
        "hypervisor": "qemu",
        "interfaces": [{"id": ifname, "mac": mac, "type": "tap"}],
        "mem": 8192,
        "shares": [
            {
                "mountPoint": "/home/user",
                "proto": "virtiofs",
                "source": "/var/lib/qnix/compartments/build/home",
                "tag": "qx" + hashlib.sha256(b"/home/user").hexdigest()[:12],
            },
            {
                "mountPoint": "/var/lib/build",
                "proto": "virtiofs",
                "source": "/var/lib/qnix/compartments/build/paths/"
                + hashlib.sha256(b"/var/lib/build").hexdigest()[:16],
                "tag": "qx" + hashlib.sha256(b"/var/lib/build").hexdigest()[:12],
            },
        ],
        "vcpu": 4,
    }
    assert len(ifname) <= 15
    # Locally administered (bit 1 of the first octet) and unicast (bit 0 clear), from the name.
    digest = hashlib.sha256(b"qnix-mac\x00build").digest()
    assert mac == "02:" + ":".join(f"{b:02x}" for b in digest[:5])
    assert get(guest, "systemd", "network", "networks", "10-qnix") == {
        "address": [f"{LINKS['build'].address}/31"],
        "gateway": [LINKS["build"].gateway],
        "matchConfig": {"MACAddress": mac},
    }
    assert guest["environment"] == {"systemPackages": [Raw("pkgs.gcc")]}
    assert guest["system"] == {"stateVersion": "25.11"}


def test_a_disposable_offline_vm_has_no_interface_and_no_share() -> None:
    guest = get(module(MIXED, "vms"), "microvm", "vms", "scratch", "config").body
    assert guest["microvm"]["interfaces"] == []
    assert guest["microvm"]["shares"] == []
    assert "networking" not in guest
    assert "systemd" not in guest


def test_macs_differ_between_vms() -> None:
    machines = get(module(MIXED, "vms"), "microvm", "vms")
    other = workstation({}, {"build2": {"isolation": "vm", "network": "uplink"}})
    macs = {
        get(module(other, "vms"), "microvm", "vms", "build2", "config").body["microvm"][
            "interfaces"
        ][0]["mac"],
        machines["build"]["config"].body["microvm"]["interfaces"][0]["mac"],
    }
    assert len(macs) == 2


def test_no_vms_means_an_empty_vms_module() -> None:
    assert module(workstation({}, {"a": {"isolation": "container"}}), "vms") == {}


# ---- network, users, audit, secrets, desktop -------------------------------------------------


def test_network_module_carries_the_nft_table_verbatim() -> None:
    body = '\tchain x {\n\t\tcomment "${builtins.abort \\"x\\"}"\n\t}\n'
    network = module_trees(MIXED, body)["network"]
    assert network == {
        "boot": {"kernel": {"sysctl": {"net.ipv4.ip_forward": 1}}, "kernelModules": ["veth"]},
        "networking": {
            "nftables": {"enable": True, "tables": {"qnix": {"content": body, "family": "inet"}}}
        },
    }


def test_no_network_means_no_forwarding() -> None:
    ws = workstation({}, {"vault": {}})
    network = module_trees(ws, "")["network"]
    assert "boot" not in network
    assert get(network, "networking", "nftables", "enable") is True


def test_one_unprivileged_user_per_compartment_with_its_own_home() -> None:
    users = get(module(MIXED, "users"), "users", "users")
    assert sorted(users) == sorted(unix_user(name) for name in MIXED.compartments)
    homes = [user["home"] for user in users.values()]
    assert len(set(homes)) == len(homes) == len(MIXED.compartments)
    long_name = "a-compartment-name-of-31-chars1"
    assert unix_user(long_name) != "qx-" + long_name  # 34 characters: hashed down to 32
    assert users[unix_user("work")] == {
        "createHome": False,
        "description": "qnix compartment work",
        "group": "qx-work",
        "home": "/var/lib/qnix/compartments/work",
        "isSystemUser": True,
        "shell": Raw('"${pkgs.shadow}/bin/nologin"'),
        "uid": CONTAINER_RANGES["work"] + 1000,  # a container: the host side of its user
    }
    assert users[unix_user("build")]["uid"] == (
        0x70000000 + link_slot(LINKS["build"].gateway, MIXED.host.subnet)
    )
    groups = get(module(MIXED, "users"), "users", "groups")
    # The same ids the runtime runs each compartment as, but for a container's.
    expected = {
        name: CONTAINER_RANGES[name] + 1000
        if name in CONTAINER_RANGES
        else live.host_identity(MIXED, name).uid
        for name in MIXED.compartments
    }
    assert groups == {unix_user(name): {"gid": uid} for name, uid in expected.items()}
    assert {name: users[unix_user(name)]["uid"] for name in MIXED.compartments} == expected


def test_audit_watches_config_state_and_module_loading() -> None:
    """The rest of the audit module: tests/compile/nix/test_audit_module.py."""
    assert get(module(MIXED, "audit"), "security", "audit", "rules")[:4] == [
        "-w /etc -p wa -k qnix-etc",
        "-w /var/lib/qnix -p wa -k qnix-state",
        "-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k qnix-modules",
        "-a always,exit -F arch=b32 -S init_module,finit_module,delete_module -k qnix-modules",
    ]


def test_desktop_has_hyprland_the_lid_and_a_menu_entry_per_app() -> None:
    ws = example_workstations()["smb-office.toml"]
    desktop = module(ws, "desktop")
    assert desktop["programs"] == {"hyprland": {"enable": True}}
    assert desktop["services"] == {
        "logind": {"settings": {"Login": {"HandleLidSwitch": "suspend"}}}
    }
    entries = get(desktop, "environment", "systemPackages")
    assert (
        Call(
            Raw("pkgs.makeDesktopItem"),
            {
                "desktopName": "[work] libreoffice",
                "exec": "qnix run --gui work -- libreoffice",
                "name": "qnix-work-libreoffice",
            },
        )
        in entries
    )
    # A disposable template's app: a fresh disposable each time.
    assert entries[-1] == Call(
        Raw("pkgs.makeDesktopItem"),
        {
            "desktopName": "[offline-dvm] libreoffice",
            "exec": "qnix dispose --template offline-dvm -- libreoffice",
            "name": "qnix-offline-dvm-libreoffice",
        },
    )
    apps = [(c.name, app) for c in ws.compartments.values() for app in c.apps]
    apps += [(n, app) for n, t in ws.disposable_templates.items() for app in t.apps]
    assert [e.argument["desktopName"] for e in entries] == [f"[{c}] {a}" for c, a in apps]


def test_desktop_installs_the_label_colours_window_rules_for_gui_compartments() -> None:
    ws = workstation(
        {"desktop": {"hyprland": True}},
        {
            "work": {"label": "blue", "gui": True, "apps": ["firefox"]},
            "plain": {"label": "red"},
        },
    )
    desktop = module(ws, "desktop")
    assert get(desktop, "environment", "etc") == {
        "sway/config.d/50-qnix-labels.conf": {"text": sway_fragment(ws)},
        "qnix/qnix-labels.conf": {"text": hyprland_rules(ws)},
    }
    assert get(desktop, "environment", "systemPackages") == [
        Call(
            Raw("pkgs.makeDesktopItem"),
            {
                "desktopName": "[work] firefox",
                "exec": "qnix run --gui work -- firefox",
                "name": "qnix-work-firefox",
            },
        )
    ]
    # environment.* is in the audit namespaces' reference; every option set is declared there.
    lines = [*reference.reference_lines(), *reference.tsv_lines(reference.AUDIT_OPTIONS_TSV)]
    checked = ("environment", "programs", "services.logind")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "CHECKED", checked)
        report = reference.check(desktop, reference.tree_of(lines))
    assert report.errors == []
    assert {
        "environment.etc.<name>.text",
        "environment.systemPackages",
        "programs.hyprland.enable",
    } <= report.options


@pytest.mark.parametrize("action", ["suspend", "hibernate", "lock", "poweroff", "ignore"])
def test_lid_switch(action: str) -> None:
    host = HIBERNATING_HOST if action == "hibernate" else {"desktop": {"lid_switch": action}}
    desktop = module(workstation(host), "desktop")
    assert desktop == {"services": {"logind": {"settings": {"Login": {"HandleLidSwitch": action}}}}}


# ---- disk and boot ---------------------------------------------------------------------------


def partitions(ws: Any) -> dict[str, Any]:
    return get(module(ws, "disk"), "disko", "devices", "disk", "main", "content", "partitions")


def test_btrfs_in_luks2_with_tpm2_and_swap() -> None:
    ws = workstation({"disk": {"device": "/dev/sda", "swap_gb": 16}})
    disk = get(module(ws, "disk"), "disko", "devices", "disk", "main")
    assert disk["device"] == "/dev/sda"
    assert disk["type"] == "disk"
    assert disk["content"]["type"] == "gpt"
    parts = partitions(ws)
    assert parts["ESP"] == {
        "content": {
            "format": "vfat",
            "mountOptions": ["umask=0077"],
            "mountpoint": "/boot",
            "type": "filesystem",
        },
        "size": "1G",
        "type": "EF00",
    }
    assert parts["swap"] == {"content": {"randomEncryption": True, "type": "swap"}, "size": "16G"}
    luks = parts["root"]["content"]
    assert parts["root"]["size"] == "100%"
    assert {k: v for k, v in luks.items() if k != "content"} == {
        "extraFormatArgs": ["--type", "luks2"],
        "name": "cryptroot",
        "settings": {"allowDiscards": True},
        "type": "luks",
    }
    options = ["compress=zstd", "noatime"]
    assert luks["content"] == {
        "extraArgs": ["-f"],
        "subvolumes": {
            "@home": {"mountOptions": options, "mountpoint": "/home"},
            "@nix": {"mountOptions": options, "mountpoint": "/nix"},
            "@root": {"mountOptions": options, "mountpoint": "/"},
            "@var-lib-qnix": {"mountOptions": options, "mountpoint": "/var/lib/qnix"},
        },
        "type": "btrfs",
    }
    assert get(module(ws, "disk"), "boot", "initrd") == {
        "luks": {"devices": {"cryptroot": {"crypttabExtraOpts": ["tpm2-device=auto"]}}},
        "systemd": {"enable": True},
    }


@pytest.mark.parametrize("filesystem", ["bcachefs", "ext4"])
def test_unencrypted_filesystem_sits_on_the_partition(filesystem: str) -> None:
    ws = workstation(
        {"disk": {"filesystem": filesystem, "encryption": "none", "tpm2": False, "swap_gb": 0}}
    )
    parts = partitions(ws)
    assert parts["root"] == {
        "content": {"format": filesystem, "mountpoint": "/", "type": "filesystem"},
        "size": "100%",
    }
    assert "swap" not in parts
    boot = get(module(ws, "disk"), "boot")
    assert "initrd" not in boot
    assert boot.get("supportedFilesystems") == (["bcachefs"] if filesystem == "bcachefs" else None)


def test_plain_swap_without_encryption() -> None:
    ws = workstation({"disk": {"encryption": "none", "tpm2": False, "swap_gb": 4}})
    assert partitions(ws)["swap"] == {
        "content": {"randomEncryption": False, "type": "swap"},
        "size": "4G",
    }


def test_luks_without_tpm2_asks_for_the_passphrase() -> None:
    ws = workstation({"disk": {"tpm2": False}})
    assert "initrd" not in get(module(ws, "disk"), "boot")
    assert partitions(ws)["root"]["content"]["type"] == "luks"


def test_secure_boot_is_lanzaboote_instead_of_systemd_boot() -> None:
    on = get(module(workstation({"secure_boot": True}), "disk"), "boot")
    assert on["lanzaboote"] == {"enable": True, "pkiBundle": "/var/lib/sbctl"}
    assert on["loader"] == {
        "efi": {"canTouchEfiVariables": True},
        "systemd-boot": {"enable": Call(Raw("lib.mkForce"), False)},
    }
    off = get(module(workstation({"secure_boot": False}), "disk"), "boot")
    assert "lanzaboote" not in off
    assert off["loader"] == {
        "efi": {"canTouchEfiVariables": True},
        "systemd-boot": {"enable": True},
    }
    assert "lanzaboote" not in "".join(nix_files(workstation({"secure_boot": False})).values())


def test_microvm_appears_only_with_vms() -> None:
    without = workstation({}, {"a": {"isolation": "container"}, "b": {}})
    assert "microvm" not in "".join(nix_files(without).values())
    assert "microvm" in nix_files(MIXED)["flake.nix"]


# ---- the modules as one configuration --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(all_workstations()))
def test_no_two_modules_set_the_same_option_differently(name: str) -> None:
    """NixOS merges lists and sets across modules, but two definitions of one value conflict."""
    ws = all_workstations()[name]
    defined: dict[tuple[str, ...], tuple[str, NixValue]] = {}
    for concern, tree in trees(ws).items():
        for path, value in leaves(tree):
            if isinstance(value, list | tuple | Function):
                continue
            for length in range(1, len(path)):
                prefix = path[:length]
                assert prefix not in defined, f"{concern} sets inside {prefix}, a value"
            assert path not in defined, f"{path} set by {defined[path][0]} and {concern}"
            defined[path] = (concern, value)
