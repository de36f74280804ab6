"""Every invalid spec is refused, one problem per mistake, each with key path, value and hint."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qnix.compile.inputs import load
from qnix.errors import Problem, QnixError, SpecError
from qnix.spec.wording import format_path, show
from tests.conftest import EXAMPLES, need

HOST = '[host]\nhostname = "h"\n'
AGE_KEY = "age14etvufpqjyhty3mmt88xdph427sglwpa699jkxhe3m9n9vrssg5st08shd"
SECRET = f'[secrets.work-vpn]\nfile = "vpn.age"\nrecipients = ["{AGE_KEY}"]\n'
UPLINK = '[compartments.a]\nnetwork = "uplink"\n'
FIELDS = (
    "apps, autostart, cpus, devices, firewall, fullscreen, gui, isolation, label, memory_mb, name, "
    "network, overlay, "
    "packages, persistence, persistent_paths, pids, provides_network, secrets, snapshots, tags, "
    "user"
)


@dataclass(frozen=True)
class Bad:
    """An invalid spec and the one problem it must give."""

    id: str
    text: str
    path: str
    message: str
    value: str | None = None  # exactly as shown; None: no value makes sense here
    hint: str | None = None  # a fragment of the hint; None: there must be no hint
    suffix: str = ".toml"
    files: Mapping[str, str | bytes] = field(default_factory=dict)


def toml(body: str = "", top: str = "") -> str:
    """A spec with a valid host: top-level keys first, then tables."""
    return top + HOST + body


def rule(text: str) -> str:
    return toml(UPLINK + f"firewall = [{text}]\n")


def policy(*rules: str, body: str = '[compartments.work]\ntags = ["work"]\n') -> str:
    return toml(body + f"[policy]\nrules = {json.dumps(list(rules))}\n")


CASES = [
    # ---- unknown keys, with did-you-mean at every level
    Bad(
        "unknown-top-level-key",
        toml("[compartment.a]\n"),
        "compartment",
        "unknown key",
        hint="did you mean 'compartments'?",
    ),
    Bad(
        "unknown-compartment-key",
        toml('[compartments.a]\nnetwrok = "uplink"\n'),
        "compartments.a.netwrok",
        "unknown key",
        hint="did you mean 'network'?",
    ),
    Bad(
        "unknown-firewall-rule-key",
        rule('{ prot = "tcp", cidr = "192.0.2.0/24" }'),
        "compartments.a.firewall[0].prot",
        "unknown key",
        hint="did you mean 'proto'?",
    ),
    Bad(
        "unknown-disk-key",
        toml('[host.disk]\nfilesytem = "btrfs"\n'),
        "host.disk.filesytem",
        "unknown key",
        hint="did you mean 'filesystem'?",
    ),
    Bad(
        "unknown-syslog-key",
        toml('[audit.remote_syslog]\nhost = "logs.example.com"\nprotcol = "tcp"\n'),
        "audit.remote_syslog.protcol",
        "unknown key",
        hint="did you mean 'protocol'?",
    ),
    Bad(
        "unknown-key-far-from-any",
        toml("[compartments.a]\nzzzz = 1\n"),
        "compartments.a.zzzz",
        "unknown key",
        hint=f"known keys here: {FIELDS}",
    ),
    Bad(
        "unknown-key-with-a-dot",
        toml('[compartments.a]\n"x.y" = 1\n'),
        'compartments.a["x.y"]',
        "unknown key",
        hint=f"known keys here: {FIELDS}",
    ),
    # ---- compartment names
    Bad(
        "name-uppercase",
        toml("[compartments.Work]\n"),
        "compartments.Work",
        "is not a valid compartment name",
        '"Work"',
        "did you mean 'work'?",
    ),
    Bad(
        "name-too-long",
        toml(f"[compartments.{'a' * 32}]\n"),
        f"compartments.{'a' * 32}",
        "is not a valid compartment name",
        json.dumps("a" * 32),
        "1-31 long",
    ),
    Bad(
        "name-leading-digit",
        toml("[compartments.1work]\n"),
        "compartments.1work",
        "is not a valid compartment name",
        '"1work"',
        "starting with a letter",
    ),
    Bad(
        "name-path-traversal",
        toml('[compartments."../x"]\n'),
        'compartments["../x"]',
        "is not a valid compartment name",
        '"../x"',
        "lower-case letters",
    ),
    Bad(
        "name-with-nul",
        json.dumps({"host": {"hostname": "h"}, "compartments": {"a\u0000b": {}}}),
        'compartments["a\\u0000b"]',
        "is not a valid compartment name",
        '"a\\u0000b"',
        "lower-case letters",
        suffix=".json",
    ),
    Bad(
        "name-with-bidi-override",
        json.dumps({"host": {"hostname": "h"}, "compartments": {"adm\u202enib": {}}}),
        'compartments["adm\\u202enib"]',
        "is not a valid compartment name",
        '"adm\\u202enib"',
        "lower-case letters",
        suffix=".json",
    ),
    Bad(
        "template-name",
        toml("[disposable_templates.Dvm]\n"),
        "disposable_templates.Dvm",
        "is not a valid compartment name",
        '"Dvm"',
        "did you mean 'dvm'?",
    ),
    Bad(
        "secret-name",
        toml(SECRET.replace("work-vpn", "Work_VPN")),
        "secrets.Work_VPN",
        "is not a valid secret name",
        '"Work_VPN"',
        "did you mean 'work_vpn'?",
        files={"vpn.age": EXAMPLES.joinpath("secrets/work-vpn.age").read_bytes()},
    ),
    Bad(
        "name-reserved",
        toml("[compartments.uplink]\n"),
        "compartments.uplink",
        "'uplink' is a reserved word",
        '"uplink"',
        "choose another name",
    ),
    Bad(
        "name-disagrees-with-key",
        toml('[compartments.a]\nname = "b"\n'),
        "compartments.a.name",
        "must equal the compartment's key",
        '"b"',
        "drop name",
    ),
    Bad(
        "template-named-like-a-compartment",
        toml("[compartments.a]\n[disposable_templates.a]\n"),
        "disposable_templates.a",
        "has the name of a compartment",
        '"a"',
        "rename one of them",
    ),
    # ---- words from a fixed set
    Bad(
        "label",
        toml('[compartments.a]\nlabel = "blu"\n'),
        "compartments.a.label",
        "must be one of: red, orange, yellow, green, gray, blue, purple, black",
        '"blu"',
        "did you mean 'blue'?",
    ),
    Bad(
        "isolation",
        toml('[compartments.a]\nisolation = "vmm"\n'),
        "compartments.a.isolation",
        "must be one of: namespace, container, vm",
        '"vmm"',
        "did you mean 'vm'?",
    ),
    Bad(
        "system",
        '[host]\nhostname = "h"\nsystem = "x86_64"\n',
        "host.system",
        "must be one of: x86_64-linux, aarch64-linux, riscv64-linux",
        '"x86_64"',
        "did you mean 'x86_64-linux'?",
    ),
    Bad(
        "hardening",
        '[host]\nhostname = "h"\nhardening = "strictt"\n',
        "host.hardening",
        "must be one of: baseline, strict, paranoid",
        '"strictt"',
        "did you mean 'strict'?",
    ),
    Bad(
        "filesystem",
        toml('[host.disk]\nfilesystem = "btrfss"\n'),
        "host.disk.filesystem",
        "must be one of: bcachefs, btrfs, ext4",
        '"btrfss"',
        "did you mean 'btrfs'?",
    ),
    Bad(
        "label-as-list",
        toml('[compartments.a]\nlabel = ["red"]\n'),
        "compartments.a.label",
        "must be one of:",
        '["red"]',
        "a string such as 'red', not a list",
    ),
    # ---- host
    Bad(
        "hibernate-with-encrypted-swap",
        toml('[host.desktop]\nlid_switch = "hibernate"\n'),
        "host.desktop.lid_switch",
        "this workstation cannot hibernate",
        '"hibernate"',
        'use "suspend" or "lock"',
    ),
    Bad(
        "tpm2-without-encryption",
        toml('[host.disk]\nencryption = "none"\n'),
        "host.disk.encryption",
        'tpm2 unlock needs encryption = "luks2"',
        '"none"',
        "tpm2 = false",
    ),
    Bad(
        "disk-outside-dev",
        toml('[host.disk]\ndevice = "/home/disk.img"\n'),
        "host.disk.device",
        "must be under /dev/",
        '"/home/disk.img"',
    ),
    Bad(
        "hostname",
        '[host]\nhostname = "Bad_Host"\n',
        "host.hostname",
        "is not a valid host name",
        '"Bad_Host"',
        "did you mean 'bad-host'?",
    ),
    Bad("hostname-missing", "[host]\n", "host.hostname", "required key is missing"),
    Bad(
        "qnix-flake-breaks-out-of-its-string",
        '[host]\nhostname = "h"\nqnix_flake = "github:a/b\\"; x = \\"${y}"\n',
        "host.qnix_flake",
        "is not a valid flake reference",
        '"github:a/b\\"; x = \\"${y}"',
        "github:owner/repo",
    ),
    Bad("host-missing", "[compartments.a]\n", "host", "required key is missing"),
    Bad(
        "subnet-too-small",
        '[host]\nhostname = "h"\nsubnet = "10.0.0.0/30"\n',
        "host.subnet",
        "must be an IPv4 network between /8 and /22",
        '"10.0.0.0/30"',
    ),
    Bad(
        "dns-server",
        '[host]\nhostname = "h"\ndns_servers = ["resolver"]\n',
        "host.dns_servers[0]",
        "must be an IP address",
        '"resolver"',
    ),
    # ---- firewall rules
    *(
        Bad(
            f"port-{raw}",
            rule(f'{{ proto = "tcp", cidr = "192.0.2.0/24", ports = [{raw}] }}'),
            "compartments.a.firewall[0].ports[0]",
            message,
            raw,
        )
        for raw, message in (
            ("0", "ports run from 1 to 65535"),
            ("70000", "ports run from 1 to 65535"),
            ('"80-20"', "a range must go upwards"),
            ('"http"', 'must be a port such as 443 or a range such as "8000-8080"'),
            ("1.5", 'must be a port such as 443 or a range such as "8000-8080"'),
            ("true", 'must be a port such as 443 or a range such as "8000-8080"'),
        )
    ),
    Bad(
        "port-listed-twice-as-number-and-string",
        rule('{ proto = "tcp", cidr = "192.0.2.0/24", ports = [443, "443"] }'),
        "compartments.a.firewall[0].ports[1]",
        "is listed twice",
        '"443"',
        "already at [0]",
    ),
    Bad(
        "ports-with-icmp",
        rule('{ proto = "icmp", cidr = "192.0.2.0/24", ports = [7] }'),
        "compartments.a.firewall[0].ports",
        'ports need proto = "tcp" or "udp"',
        "[7]",
        "icmp has no ports",
    ),
    Bad(
        "ports-without-proto",
        rule('{ cidr = "192.0.2.0/24", ports = [443] }'),
        "compartments.a.firewall[0].ports",
        'ports need proto = "tcp" or "udp"',
        "[443]",
        'add proto = "tcp"',
    ),
    Bad(
        "rule-with-host-and-cidr",
        rule('{ host = "example.com", cidr = "192.0.2.0/24" }'),
        "compartments.a.firewall[0]",
        "give either host or cidr, not both",
        hint="split it into two rules",
    ),
    Bad(
        "rule-with-neither",
        rule('{ proto = "tcp", ports = [443] }'),
        "compartments.a.firewall[0]",
        "a rule needs a host, a cidr, or dns = true",
        hint="cidr =",
    ),
    Bad(
        "dns-rule-with-ports",
        rule("{ dns = true, ports = [53] }"),
        "compartments.a.firewall[0].ports",
        "a dns rule stands alone",
        "[53]",
        "drop ports",
    ),
    *(
        Bad(
            f"host-{host}",
            rule(f'{{ host = "{host}" }}'),
            "compartments.a.firewall[0].host",
            "must be a DNS name such as mail.example.com, or an IP address",
            json.dumps(host),
        )
        for host in ("exa mple.com", "a;b", "fe80::1%eth0", "-bad.example")
    ),
    Bad(
        "cidr-host-bits",
        rule('{ cidr = "10.0.0.1/8" }'),
        "compartments.a.firewall[0].cidr",
        "10.0.0.1/8 has host bits set",
        '"10.0.0.1/8"',
    ),
    Bad(
        "cidr-garbage",
        rule('{ cidr = "10.0.0.0/33" }'),
        "compartments.a.firewall[0].cidr",
        "must be a network such as 203.0.113.0/24",
        '"10.0.0.0/33"',
    ),
    Bad(
        "comment-with-line-break",
        rule('{ cidr = "192.0.2.0/24", comment = "a\\nb" }'),
        "compartments.a.firewall[0].comment",
        "must not contain control characters or line breaks",
        '"a\\nb"',
    ),
    Bad(
        "firewall-without-network",
        toml('[compartments.a]\nfirewall = [{ cidr = "192.0.2.0/24" }]\n'),
        "compartments.a.firewall",
        'a firewall needs a network, but network is "none"',
        hint='set network = "uplink"',
    ),
    # ---- network chain
    Bad(
        "network-names-no-compartment",
        toml(
            '[compartments.sys-net]\nnetwork = "uplink"\nprovides_network = true\n'
            '[compartments.a]\nnetwork = "sys-nett"\n'
        ),
        "compartments.a.network",
        "names no compartment",
        '"sys-nett"',
        "did you mean 'sys-net'?",
    ),
    Bad(
        "network-misspelt-uplink",
        toml('[compartments.a]\nnetwork = "uplnk"\n'),
        "compartments.a.network",
        "names no compartment",
        '"uplnk"',
        "did you mean 'uplink'?",
    ),
    Bad(
        "network-names-no-net-compartment",
        toml('[compartments.b]\nnetwork = "uplink"\n[compartments.a]\nnetwork = "b"\n'),
        "compartments.a.network",
        "'b' is not a net compartment",
        '"b"',
        "set provides_network = true in compartments.b",
    ),
    Bad(
        "network-cycle",
        toml(
            '[compartments.b]\nnetwork = "a"\nprovides_network = true\n'
            '[compartments.a]\nnetwork = "b"\nprovides_network = true\n'
        ),
        "compartments.a.network",
        "network chain is a cycle: a -> b -> a",
        '"b"',
        'network = "uplink"',
    ),
    Bad(
        "net-compartment-without-network",
        toml("[compartments.a]\nprovides_network = true\n"),
        "compartments.a.provides_network",
        "a net compartment needs a network itself",
        "true",
        'set network = "uplink"',
    ),
    # ---- secrets
    Bad(
        "secret-not-declared",
        toml('[compartments.a]\nsecrets = ["work-vnp"]\n' + SECRET),
        "compartments.a.secrets[0]",
        "names no secret",
        '"work-vnp"',
        "did you mean 'work-vpn'?",
        files={"vpn.age": EXAMPLES.joinpath("secrets/work-vpn.age").read_bytes()},
    ),
    Bad(
        "secret-file-missing",
        toml(SECRET),
        "secrets.work-vpn.file",
        "file not found",
        '"vpn.age"',
        "age -r RECIPIENT",
    ),
    Bad(
        "secret-file-plaintext",
        toml(SECRET),
        "secrets.work-vpn.file",
        "is not an age-encrypted file",
        '"vpn.age"',
        "encrypt it with age",
        files={"vpn.age": "hunter2\n"},
    ),
    Bad(
        "secret-file-outside-the-spec-folder",
        toml(SECRET.replace('"vpn.age"', '"../vpn.age"')),
        "secrets.work-vpn.file",
        "must stay below the spec file's folder",
        '"../vpn.age"',
    ),
    Bad(
        "age-recipient",
        toml(SECRET.replace(AGE_KEY, "age1notakey")),
        "secrets.work-vpn.recipients[0]",
        "is not a valid recipient",
        '"age1notakey"',
        "an age public key (age1...)",
        files={"vpn.age": EXAMPLES.joinpath("secrets/work-vpn.age").read_bytes()},
    ),
    Bad(
        "no-recipients",
        toml(SECRET.replace(f'"{AGE_KEY}"', "")),
        "secrets.work-vpn.recipients",
        "must not be empty",
        "[]",
    ),
    # ---- policy
    Bad(
        "policy-unknown-compartment",
        policy("qnix.Filecopy * work wrok ask"),
        "policy.rules[0]",
        "target 'wrok' names no compartment",
        '"qnix.Filecopy * work wrok ask"',
        "did you mean 'work'?",
    ),
    Bad(
        "policy-net-port-out-of-range",
        policy("qnix.Net +tcp+99999 work @anyvm allow"),
        "policy.rules[0]",
        "bad qnix.Net argument '+tcp+99999': use +tcp+PORT or +udp+PORT",
        '"qnix.Net +tcp+99999 work @anyvm allow"',
    ),
    Bad(
        "policy-unknown-tag",
        policy("qnix.Filecopy * @tag:wrok @anyvm ask"),
        "policy.rules[0]",
        "source tag 'wrok' is on no compartment",
        '"qnix.Filecopy * @tag:wrok @anyvm ask"',
        "did you mean 'work'?",
    ),
    Bad(
        "policy-bad-action",
        policy("qnix.Filecopy * work @anyvm allw"),
        "policy.rules[0]",
        "unknown action 'allw'; use allow, deny or ask",
        '"qnix.Filecopy * work @anyvm allw"',
    ),
    Bad(
        "policy-too-few-fields",
        policy("qnix.Filecopy * work"),
        "policy.rules[0]",
        "expected: service argument source target action",
        '"qnix.Filecopy * work"',
    ),
    Bad(
        "policy-default-as-source",
        policy("qnix.Filecopy * @default work allow"),
        "policy.rules[0]",
        "@default is valid only as a target",
        '"qnix.Filecopy * @default work allow"',
    ),
    Bad(
        "policy-bad-user",
        policy("qnix.Filecopy * work @anyvm allow user=root;id"),
        "policy.rules[0]",
        "bad user='root;id': not a Unix user name",
        '"qnix.Filecopy * work @anyvm allow user=root;id"',
    ),
    Bad(
        "policy-bad-notify",
        policy("qnix.Filecopy * work @anyvm deny notify=maybe"),
        "policy.rules[0]",
        "bad notify='maybe': use notify=yes or notify=no",
        '"qnix.Filecopy * work @anyvm deny notify=maybe"',
    ),
    Bad(
        "proto-as-number",
        rule('{ proto = 6, cidr = "192.0.2.0/24" }'),
        "compartments.a.firewall[0].proto",
        "must be one of: tcp, udp, icmp",
        "6",
        "a string such as 'tcp', not a number",
    ),
    Bad(
        "policy-redirect-to-many",
        policy("qnix.Filecopy * work @anyvm allow target=@anyvm"),
        "policy.rules[0]",
        "bad target=@anyvm: name one compartment",
        '"qnix.Filecopy * work @anyvm allow target=@anyvm"',
    ),
    Bad(
        "policy-redirect-to-nothing",
        policy("qnix.Filecopy * @anyvm @anyvm allow target=wrok"),
        "policy.rules[0]",
        "parameter target 'wrok' names no compartment",
        '"qnix.Filecopy * @anyvm @anyvm allow target=wrok"',
        "did you mean 'work'?",
    ),
    Bad(
        "policy-dir-bad-file-name",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "policy file name is not lower-case letters",
        '"Office Rules.policy"',
        "rename it",
        files={"policy.d/Office Rules.policy": "qnix.Filecopy * work work deny\n"},
    ),
    Bad(
        "policy-dir-file-before-inline-rules",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "policy file name sorts at or before 00-spec.policy",
        '"00-early.policy"',
        "rename it, such as 10-00-early.policy",
        files={"policy.d/00-early.policy": "qnix.Filecopy * work work deny\n"},
    ),
    Bad(
        "policy-dir-bad-line",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "30-office.policy:3: unknown action 'permit'",
        '"qnix.Clipboard * work @anyvm permit"',
        files={
            "policy.d/30-office.policy": "# office\nqnix.Filecopy * work @anyvm ask\n"
            "qnix.Clipboard * work @anyvm permit\n"
        },
    ),
    Bad(
        "policy-dir-unknown-compartment",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "10-a.policy:1: source 'wokr' names no compartment",
        '"qnix.Filecopy * wokr @anyvm ask"',
        "did you mean 'work'?",
        files={"policy.d/10-a.policy": "qnix.Filecopy * wokr @anyvm ask\n"},
    ),
    Bad(
        "policy-dir-error-in-an-included-file",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "include/office:1: expected: service argument source target action",
        files={
            "policy.d/30-a.policy": "!include include/office\n",
            "policy.d/include/office": "qnix.Filecopy work\n",
        },
    ),
    Bad(
        "policy-dir-include-of-a-missing-file",
        toml('[compartments.work]\n[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "30-a.policy:2: 'include/none' is not a file",
        files={"policy.d/30-a.policy": "# office\n!include include/none\n"},
    ),
    Bad(
        "policy-dir-missing",
        toml('[policy]\ndir = "policy.d"\n'),
        "policy.dir",
        "is not a folder",
        '"policy.d"',
        "a path relative to the spec file",
    ),
    # ---- GUI
    Bad(
        "fullscreen-without-gui",
        toml("[compartments.a]\nfullscreen = true\n"),
        "compartments.a.fullscreen",
        "fullscreen is about GUI windows, but gui is not set",
        "true",
        "set gui = true",
    ),
    Bad(
        "gui-not-a-boolean",
        toml('[disposable_templates.t]\ngui = "x11"\n'),
        "disposable_templates.t.gui",
        "must be true or false",
        '"x11"',
    ),
    # ---- paths, packages, lists
    Bad(
        "persistent-paths-on-a-disposable",
        toml('[compartments.a]\npersistence = "disposable"\npersistent_paths = ["/home/user/x"]\n'),
        "compartments.a.persistent_paths",
        "a disposable compartment keeps nothing",
        '["/home/user/x"]',
        'persistence = "persistent"',
    ),
    Bad(
        "relative-persistent-path",
        toml('[compartments.a]\npersistent_paths = ["home/user"]\n'),
        "compartments.a.persistent_paths[0]",
        "must be an absolute path",
        '"home/user"',
    ),
    Bad(
        "path-with-dot-dot",
        toml('[compartments.a]\npersistent_paths = ["/home/user/../../etc"]\n'),
        "compartments.a.persistent_paths[0]",
        "must not contain '.' or '..' components",
        '"/home/user/../../etc"',
    ),
    Bad(
        "path-with-dollar",
        toml('[audit]\naide_paths = ["/srv/$HOME"]\n'),
        "audit.aide_paths[0]",
        "must not contain whitespace, quotes, '$'",
        '"/srv/$HOME"',
    ),
    Bad(
        "duplicate-packages",
        toml('[compartments.a]\npackages = ["firefox", "gimp", "firefox"]\n'),
        "compartments.a.packages[2]",
        "is listed twice",
        '"firefox"',
        "already at [0]",
    ),
    Bad(
        "package-with-shell",
        toml('[compartments.a]\npackages = ["firefox; rm -rf /"]\n'),
        "compartments.a.packages[0]",
        "is not a valid package name",
        '"firefox; rm -rf /"',
        "a nixpkgs attribute path",
    ),
    Bad(
        "app-with-slash",
        toml('[compartments.a]\napps = ["../bin/sh"]\n'),
        "compartments.a.apps[0]",
        "is not a valid program name",
        '"../bin/sh"',
        "without '/'",
    ),
    Bad(
        "apps-as-string",
        toml('[compartments.a]\napps = "firefox"\n'),
        "compartments.a.apps",
        "must be a list",
        '"firefox"',
        'write a list, even of one item: ["firefox"]',
    ),
    # ---- numbers and types
    Bad(
        "memory-below-minimum",
        toml("[compartments.a]\nmemory_mb = 32\n"),
        "compartments.a.memory_mb",
        "must be at least 64",
        "32",
    ),
    Bad(
        "memory-as-word",
        toml('[compartments.a]\nmemory_mb = "lots"\n'),
        "compartments.a.memory_mb",
        "must be a whole number",
        '"lots"',
    ),
    Bad(
        "memory-as-quoted-number",
        toml('[compartments.a]\nmemory_mb = "4096"\n'),
        "compartments.a.memory_mb",
        "must be a whole number",
        '"4096"',
        "write the number without quotes: 4096",
    ),
    Bad(
        "cpus-as-boolean",
        toml("[compartments.a]\ncpus = true\n"),
        "compartments.a.cpus",
        "must be a whole number",
        "true",
    ),
    Bad(
        "boolean-as-string",
        toml('[compartments.a]\nautostart = "true"\n'),
        "compartments.a.autostart",
        "must be true or false",
        '"true"',
        "write it without quotes: true",
    ),
    Bad(
        "compartments-as-number",
        '{"compartments": 3, "host": {"hostname": "h"}}',
        "compartments",
        "must be a table (TOML) or an object (JSON)",
        "3",
        suffix=".json",
    ),
    Bad(
        "compartment-as-number",
        toml(top="compartments = { a = 3 }\n"),
        "compartments.a",
        "must be a table (TOML) or an object (JSON)",
        "3",
    ),
    Bad(
        "firewall-as-table",
        toml(UPLINK + "firewall = {}\n"),
        "compartments.a.firewall",
        "must be a list",
        "{}",
    ),
    Bad(
        "spec-as-list",
        "[1, 2]",
        "",
        "must be a table (TOML) or an object (JSON)",
        "[1, 2]",
        suffix=".json",
    ),
    Bad(
        "long-value-is-cut",
        toml(f'[compartments.a]\nlabel = "{"x" * 200}"\n'),
        "compartments.a.label",
        "must be one of:",
        '"' + "x" * 76 + "...",
    ),
    # ---- references between parts
    Bad(
        "default-disposable-names-nothing",
        toml("[disposable_templates.default-dvm]\n", top='default_disposable = "default-dv"\n'),
        "default_disposable",
        "names no disposable template",
        '"default-dv"',
        "did you mean 'default-dvm'?",
    ),
    Bad(
        "tls-over-udp",
        toml('[audit.remote_syslog]\nhost = "logs.example.com"\nprotocol = "udp"\n'),
        "audit.remote_syslog.protocol",
        'tls needs protocol = "relp" or "tcp"',
        '"udp"',
        "set tls = false",
    ),
    Bad(
        "syslog-without-protocol",
        toml('[audit.remote_syslog]\nhost = "logs.example.com"\n'),
        "audit.remote_syslog.protocol",
        "the protocol must be given",
        None,
        'protocol = "relp" loses no entry',
    ),
    Bad(
        "syslog-host-and-hosts",
        toml(
            '[audit.remote_syslog]\nhost = "a.example.com"\nhosts = ["b.example.com"]\n'
            'protocol = "relp"\n'
        ),
        "audit.remote_syslog.host",
        "give host or hosts, not both",
        '"a.example.com"',
        "hosts = [...]",
    ),
    Bad(
        "syslog-receiver-twice",
        toml(
            '[audit.remote_syslog]\nhosts = ["a.example.com", "a.example.com"]\nprotocol = "relp"\n'
        ),
        "audit.remote_syslog.hosts[1]",
        "is listed twice",
        '"a.example.com"',
        "drop it",
    ),
    Bad(
        "syslog-without-receivers",
        toml('[audit.remote_syslog]\nhosts = []\nprotocol = "relp"\n'),
        "audit.remote_syslog.hosts",
        "needs 1 to 4 items, not 0",
        "[]",
        "list them",
    ),
    Bad(
        "receiver-without-peers",
        toml("[audit.receive]\nport = 2514\n"),
        "audit.receive.peers",
        "missing",
        None,
        None,
    ),
    Bad(
        "receiver-peer-not-a-name",
        toml('[audit.receive]\npeers = ["*.exa mple.com"]\n'),
        "audit.receive.peers[0]",
        "",
        '"*.exa mple.com"',
        None,
    ),
    # ---- documents that do not parse
    Bad(
        "toml-syntax",
        toml("[compartments.a\n"),
        "",
        "TOML syntax error: Expected ']' at the end of a table declaration (at line 3, column 16)",
    ),
    Bad(
        "json-nested-too-deeply",
        '{"host": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "",
        "nested too deeply",
        suffix=".json",
    ),
    Bad(
        "json-syntax",
        '{\n  "host": {"hostname": "h"},\n}\n',
        "",
        "JSON syntax error at line 3 column 1",
        suffix=".json",
    ),
    Bad(
        "json-duplicate-key",
        '{"host": {"hostname": "h"}, "host": {"hostname": "i"}}',
        "",
        "JSON object has a key twice",
        '"host"',
        "silently keep the last one",
        suffix=".json",
    ),
    Bad(
        "unknown-suffix",
        "host: {}\n",
        "",
        "unknown spec format '.yaml'",
        hint="use .toml, .json or .nix",
        suffix=".yaml",
    ),
    Bad("not-utf8", '[host]\nhostname = "\udcff"\n', "", "not UTF-8 (byte 19)"),
]


def write_case(case: Bad, directory: Path) -> Path:
    spec = directory / f"spec{case.suffix}"
    spec.write_bytes(case.text.encode("utf-8", "surrogateescape"))
    for name, content in case.files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return spec


def problems_of(spec: Path) -> list[Problem]:
    with pytest.raises(SpecError) as caught:
        load(spec)
    return caught.value.problems


def test_there_are_many_distinct_cases() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_invalid_spec_gives_one_located_problem(case: Bad, tmp_path: Path) -> None:
    spec = write_case(case, tmp_path)
    problems = problems_of(spec)
    assert len(problems) == 1, "\n".join(p.render() for p in problems)
    (problem,) = problems
    assert problem.file == str(spec)
    assert problem.path == case.path
    assert case.message in problem.message
    assert problem.value == (case.value or "")
    if case.hint is None:
        assert problem.hint == ""
    else:
        assert case.hint in problem.hint
    where = f"{spec}: {case.path}: " if case.path else f"{spec}: "
    assert problem.render().startswith(where + problem.message)


def test_render_shows_file_path_value_and_hint(tmp_path: Path) -> None:
    spec = tmp_path / "office.toml"
    spec.write_text(toml('[compartments.work]\nnetwrok = "uplink"\nlabel = "blu"\n'))
    with pytest.raises(SpecError) as caught:
        load(spec)
    assert caught.value.exit_code == 2
    assert caught.value.render() == (
        "error: invalid spec: 2 problems\n"
        f"  {spec}: compartments.work.label: must be one of: red, orange, yellow, green, gray,"
        ' blue, purple, black (got "blu")\n'
        "    hint: did you mean 'blue'?\n"
        f"  {spec}: compartments.work.netwrok: unknown key\n"
        "    hint: did you mean 'network'?"
    )


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[host]\nhostname = "Bad Host"\nsystem = "x86"\n'
        '[compartments.a]\nnetwrok = "uplink"\nmemory_mb = 1\npackages = ["a b"]\n'
        "[compartments.B]\n"
        'firewall = [{ dns = true }, { proto = "tcp", cidr = "192.0.2.0/24", ports = [0, "x"] }]\n'
    )
    problems = problems_of(spec)
    assert [p.path for p in problems] == [
        "host.hostname",
        "host.system",
        "compartments.a.memory_mb",
        "compartments.a.packages[0]",
        "compartments.a.netwrok",
        "compartments.B",
        "compartments.B.firewall[1].ports[0]",
        "compartments.B.firewall[1].ports[1]",
    ]


def test_several_reference_problems_are_reported_together(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        toml(
            '[compartments.a]\nnetwork = "nowhere"\nsecrets = ["ghost"]\n'
            '[compartments.b]\nnetwork = "a"\n'
            "[disposable_templates.a]\n"
            '[policy]\nrules = ["qnix.Filecopy * a c ask", "qnix.Clipboard * @tag:x a deny"]\n',
            top='default_disposable = "dvm"\n',
        )
    )
    with pytest.raises(SpecError) as caught:
        load(spec)
    assert caught.value.message == "invalid spec: 7 problems"
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("disposable_templates.a", "has the name of a compartment"),
        ("compartments.a.network", "names no compartment"),
        ("compartments.b.network", "'a' is not a net compartment"),
        ("compartments.a.secrets[0]", "names no secret"),
        ("default_disposable", "names no disposable template"),
        ("policy.rules[0]", "target 'c' names no compartment"),
        ("policy.rules[1]", "source tag 'x' is on no compartment"),
    ]


def test_more_compartments_than_the_subnet_holds(tmp_path: Path) -> None:
    # A /22 has 512 slots for /31 links and slot 0 is the network's own: 512 cannot fit.
    names = [f"c{i}" for i in range(512)]
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "host": {"hostname": "h", "subnet": "10.0.0.0/22"},
                "compartments": {name: {} for name in names},
            }
        )
    )
    (problem,) = problems_of(spec)
    assert problem.path == "host.subnet"
    assert problem.message == "512 compartments do not fit in 10.0.0.0/22"
    assert problem.value == '"10.0.0.0/22"'
    assert problem.hint == "a /21 network or larger holds 512 compartments"
    spec.write_text(spec.read_text().replace('"c0": {}, ', ""))
    assert len(load(spec).workstation.compartments) == 511


def test_nix_evaluation_error_names_the_file(tmp_path: Path) -> None:
    need("nix-instantiate")
    spec = tmp_path / "broken.nix"
    spec.write_text('{\n  host.hostname = "h" + 1;\n}\n')
    (problem,) = problems_of(spec)
    assert problem.file == str(spec)
    assert problem.path == ""
    # Nix names the file and the line; the column is Nix's business.
    assert re.fullmatch(
        re.escape(
            f"Nix evaluation failed: cannot coerce an integer to a string (at {spec.resolve()}:2:"
        )
        + r"[0-9]+\)",
        problem.message,
    ), problem.message
    assert problem.render().startswith(f"{spec}: Nix evaluation failed")


def test_nix_spec_is_validated_like_any_other(tmp_path: Path) -> None:
    need("nix-instantiate")
    spec = tmp_path / "spec.nix"
    spec.write_text('{ host.hostname = "h"; compartments.a.label = "blu"; }\n')
    (problem,) = problems_of(spec)
    assert (problem.file, problem.path, problem.value) == (
        str(spec),
        "compartments.a.label",
        '"blu"',
    )


def test_nix_spec_without_nix_instantiate_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.nix"
    spec.write_text('{ host.hostname = "h"; }\n')
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("nix-instantiate") is None
    with pytest.raises(QnixError) as caught:
        load(spec)
    assert not isinstance(caught.value, SpecError)
    assert caught.value.message == f"cannot evaluate {spec}: nix-instantiate is not installed"
    assert "apt-get install nix-bin" in caught.value.hint
    assert "or write the spec as TOML or JSON" in caught.value.hint


def test_key_paths_quote_odd_keys_and_index_lists() -> None:
    assert format_path(("compartments", "work", "firewall", 2, "ports")) == (
        "compartments.work.firewall[2].ports"
    )
    assert format_path(("compartments", "a.b", "x y", 0)) == 'compartments["a.b"]["x y"][0]'
    assert format_path(("compartments", "")) == 'compartments[""]'
    assert format_path(("secrets", 'say "hi"')) == 'secrets["say \\"hi\\""]'
    assert format_path(("compartments", "w" * 64)) == f"compartments.{'w' * 64}"
    assert format_path(("compartments", "w" * 65)) == f'compartments["{"w" * 65}"]'
    assert format_path(("compartments", "w" * 100)) == f'compartments["{"w" * 76}...]'
    assert format_path(()) == ""


def test_values_are_json_quoted_escaped_and_cut() -> None:
    assert show("work") == '"work"'
    assert show(443) == "443"
    assert show(True) == "true"
    assert show(None) == "null"
    assert show(["a", 1]) == '["a", 1]'
    assert show("Zürich") == '"Zürich"'
    assert show("a\x1b[31mred\u202e") == '"a\\u001b[31mred\\u202e"'
    assert show("\U000e0041") == '"\\U000e0041"'
    assert show("x" * 100) == '"' + "x" * 76 + "..."
    assert len(show(list(range(100)))) == 80
