"""Secrets at run time, on a stand-in host (tests/runtime/livehost.py), with the real age, pass
and gpg; and `qnix secret add|edit|rm|ls` on a spec's repository.

The acceptance test: a spec with two compartments, one listing a secret. The holder finds it at
/run/secrets/NAME (its plaintext, mode 0400, its user's, not writable); the other has no such
file and finds the plaintext in nothing it can read; a disposable of a template listing it gets
it too; the audit log names each delivery with the ciphertext's hash. After the compartments
stop, the plaintext (random for each run) is in no file of the state root, the run root, the
build output, the audit log, /tmp or /dev/shm. With two secrets declared, a compartment listing
one finds the other's name and plaintext nowhere (SECRET_FINDER, which the container and VM tests
use too). A wrong or missing identity refuses the start and leaves nothing running.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import secrets as random
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qnix.compile.inputs import load
from qnix.compile.nix.modules import HOST_IDENTITY
from qnix.errors import QnixError
from qnix.runtime import secrets
from qnix.runtime.live import KeeperConfig
from tests.conftest import EXAMPLES, need
from tests.runtime.livehost import QNIX, LiveHost

DEMO_KEY = EXAMPLES / "keys" / "demo-only.agekey"


@pytest.fixture(scope="module")
def live_host() -> Iterator[LiveHost]:
    host = LiveHost()
    try:
        yield host
    finally:
        host.close()


# ---- helpers -----------------------------------------------------------------------------------


def new_key(folder: Path, name: str = "host.agekey") -> tuple[Path, str]:
    """A fresh age identity (0600) and its public key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / name
    subprocess.run([need("age-keygen"), "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(
        [need("age-keygen"), "-y", str(key)], check=True, capture_output=True, text=True
    )
    return key, public.stdout.strip()


def encrypt_to(recipient: str, plaintext: bytes, target: Path) -> None:
    """The plaintext goes to age through a pipe: it is never in a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [need("age"), "--recipient", recipient, "--output", str(target)],
        input=plaintext,
        check=True,
    )


def age_decrypt(key: Path, file: Path) -> bytes:
    return subprocess.run(
        [need("age"), "--decrypt", "--identity", str(key), str(file)],
        check=True,
        capture_output=True,
    ).stdout


def run_qnix(
    host: LiveHost, *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QNIX, *args],
        input=input,
        capture_output=True,
        text=True,
        env={**host.env, **(env or {})},
        timeout=120,
        check=False,
    )


def ok(host: LiveHost, *args: str, env: dict[str, str] | None = None, input: str = "") -> str:
    result = run_qnix(host, *args, env=env, input=input)
    assert result.returncode == 0, f"qnix {' '.join(args)}: {result.stderr}"
    return result.stdout


def probe(
    host: LiveHost, name: str, code: str, env: dict[str, str] | None = None, input: str = ""
) -> Any:
    """Run Python `code` inside compartment `name` and decode the JSON it prints."""
    return json.loads(ok(host, "run", name, "--", "python3", "-c", code, env=env, input=input))


def files_holding(needle: bytes, roots: Iterable[Path]) -> tuple[list[str], set[str]]:
    """Every regular file below `roots` holding `needle`, and every file read (unreadable and
    special files are passed over)."""
    found: list[str] = []
    scanned: set[str] = set()
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue
                scanned.add(path)
                if needle in data:
                    found.append(path)
    return found, scanned


def audit_entries(host: LiveHost, event: str) -> list[dict[str, Any]]:
    lines = host.paths.audit_log.read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["event"] == event]


# What the holder of a secret sees of it.
HOLDER_PROBE = r"""
import errno, hashlib, json, os, pwd, stat
path = "/run/secrets/token"
info = os.stat(path)
with open(path, "rb") as handle:
    digest = hashlib.sha256(handle.read()).hexdigest()
report = {
    "mode": oct(stat.S_IMODE(info.st_mode)),
    "owner": pwd.getpwuid(info.st_uid).pw_name,
    "me": pwd.getpwuid(os.getuid()).pw_name,
    "sha256": digest,
    "listing": sorted(os.listdir("/run/secrets")),
}
attempts = {
    "append": lambda: open(path, "ab"),
    "chmod": lambda: os.chmod(path, 0o600),
    "unlink": lambda: os.unlink(path),
}
for what, action in attempts.items():
    try:
        action()
        report[what] = "done"
    except OSError as exc:
        report[what] = errno.errorcode[exc.errno]
print(json.dumps(report))
"""

# A compartment without the secret looks for its plaintext (read from stdin) in every file it
# can read, and in what its processes show in /proc. The host's system trees bound read-only
# (/usr and the links into it, /nix) hold nothing qnix writes; /sys and /dev hold no files.
SEEKER_PROBE = r"""
import json, os, sys
needle = sys.stdin.buffer.read()
skip = {"/usr", "/nix", "/proc", "/sys", "/dev", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
        "/libx32"}
found, scanned = [], []
def check(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return
    scanned.append(path)
    if needle in data:
        found.append(path)
for folder, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            check(path)
for pid in os.listdir("/proc"):
    if pid.isdigit() and pid != str(os.getpid()):
        for part in ("cmdline", "environ"):
            check(f"/proc/{pid}/{part}")
print(json.dumps({
    "secret": os.path.exists("/run/secrets/token"),
    "secrets_folder": os.path.exists("/run/secrets"),
    "found": found,
    "scanned": scanned,
}))
"""

# Inside a compartment, for each secret in the JSON on stdin ({name: plaintext}): every path
# whose last part holds its name, and every file, process command line or environment holding
# its plaintext. The host's system trees, bound read-only (/usr and the links into it, /nix, the
# interpreter's prefix), hold nothing qnix writes; /sys and /dev hold no files.
SECRET_FINDER = r"""
import json, os, sys
wanted = json.load(sys.stdin)
skip = {"/usr", "/nix", "/proc", "/sys", "/dev", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
        "/libx32", os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
found = {name: {"paths": [], "holding": []} for name in wanted}
scanned = []
def check(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return
    scanned.append(path)
    for name, plaintext in wanted.items():
        if plaintext.encode() in data:
            found[name]["holding"].append(path)
for folder, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
    for entry in (*dirs, *files):
        for name in wanted:
            if name in entry:
                found[name]["paths"].append(os.path.join(folder, entry))
    for entry in files:
        path = os.path.join(folder, entry)
        if os.path.isfile(path) and not os.path.islink(path):
            check(path)
for pid in os.listdir("/proc"):
    if pid.isdigit() and pid != str(os.getpid()):
        for part in ("cmdline", "environ"):
            check(f"/proc/{pid}/{part}")
print(json.dumps({
    "listing": sorted(os.listdir("/run/secrets")) if os.path.isdir("/run/secrets") else None,
    "found": {name: {k: sorted(v) for k, v in where.items()} for name, where in found.items()},
    "home": os.environ["HOME"],
    "scanned": scanned,
}))
"""
# Copies of the compartment's own secret where a leaked one could lie: finding them shows the
# finder searches there.
COPY_OWN = 'cp "/run/secrets/$1" /tmp/copy && cp "/run/secrets/$1" "$HOME/copy"'


def secret_sightings(
    qnix: Callable[..., str], name: str, own: str, plaintexts: dict[str, bytes]
) -> dict[str, Any]:
    """SECRET_FINDER's report from compartment `name`, which lists the secret `own`, with its
    copies planted in /tmp and the home for the time of the search. `qnix(*args, input=...)`
    runs qnix and returns its output."""
    qnix("run", name, "--", "sh", "-c", COPY_OWN, "sh", own, input="")
    try:
        wanted = {secret: text.decode() for secret, text in plaintexts.items()}
        seen: dict[str, Any] = json.loads(
            qnix("run", name, "--", "python3", "-c", SECRET_FINDER, input=json.dumps(wanted))
        )
    finally:
        qnix("run", name, "--", "sh", "-c", 'rm -f /tmp/copy "$HOME/copy"', input="")
    return seen


def only_its_own(seen: dict[str, Any], own: str) -> dict[str, Any]:
    """What `seen` must be for a compartment that lists `own` and no other secret sought: that
    one at /run/secrets/OWN and in the copies, the others nowhere."""
    home = seen["home"]
    return {
        "listing": [own],
        "found": {
            secret: (
                {
                    "paths": [f"/run/secrets/{own}"],
                    "holding": sorted([f"/run/secrets/{own}", "/tmp/copy", f"{home}/copy"]),
                }
                if secret == own
                else {"paths": [], "holding": []}
            )
            for secret in seen["found"]
        },
    }


def sightings_of(seen: dict[str, Any]) -> dict[str, Any]:
    return {key: seen[key] for key in ("listing", "found")}


TWO_COMPARTMENTS = """\
[host]
hostname = "lab"
subnet = "10.207.0.0/16"

[compartments.holder]
memory_mb = 128
user = "alice"
secrets = ["token"]

[compartments.other]
memory_mb = 128

[disposable_templates.dvm]
memory_mb = 128
secrets = ["token"]

[secrets.token]
file = "secrets/token.age"
recipients = ["{recipient}"]
"""


def _nothing_running(host: LiveHost, name: str) -> None:
    assert not host.paths.run_dir(name).exists()
    assert host.ls()[name]["state"] == "stopped"
    assert not any(cgroup.endswith(f"-{name}") for cgroup in host.cgroup_names())


# ---- the acceptance test -----------------------------------------------------------------------


def test_a_secret_reaches_only_its_compartment_and_leaves_no_plaintext_behind(
    live_host: LiveHost,
) -> None:
    plaintext = f"qnix-test-secret-{random.token_hex(16)}\n".encode()
    key, recipient = new_key(live_host.base / "keys")
    spec = live_host.spec(TWO_COMPARTMENTS.format(recipient=recipient))
    cipher_file = live_host.base / "secrets" / "token.age"
    encrypt_to(recipient, plaintext, cipher_file)
    with_key = {"QNIX_AGE_IDENTITY": str(key)}
    build = live_host.base / "build"

    ok(live_host, "apply", str(spec))
    ok(live_host, "start", "holder", env=with_key)
    ok(live_host, "start", "other", env=with_key)
    try:
        seen = probe(live_host, "holder", HOLDER_PROBE)
        assert seen == {
            "mode": "0o400",
            "owner": "alice",
            "me": "alice",
            "sha256": hashlib.sha256(plaintext).hexdigest(),
            "listing": ["token"],
            "append": "EACCES",
            "chmod": "EROFS",
            "unlink": "EBUSY",
        }
        seeker = probe(live_host, "other", SEEKER_PROBE, input=plaintext.decode().strip())
        assert (seeker["secret"], seeker["secrets_folder"], seeker["found"]) == (False, False, [])
        # Not vacuous: it read its home, /etc, /run and the agent's files.
        assert {"/etc/passwd", "/etc/resolv.conf", "/opt/qnix-agent/agent.pyc"} <= set(
            seeker["scanned"]
        )

        disposed = json.loads(
            ok(
                live_host,
                "dispose",
                "--template",
                "dvm",
                "--",
                "python3",
                "-c",
                HOLDER_PROBE,
                env=with_key,
            )
        )
        assert {key: disposed[key] for key in ("mode", "owner", "sha256", "append")} == {
            "mode": "0o400",
            "owner": "user",
            "sha256": hashlib.sha256(plaintext).hexdigest(),
            "append": "EACCES",
        }
    finally:
        ok(live_host, "stop", "holder")
        ok(live_host, "stop", "other")

    ciphertext_sha256 = hashlib.sha256(cipher_file.read_bytes()).hexdigest()
    delivered = [
        {key: entry[key] for key in ("compartment", "secret", "source", "ciphertext_sha256")}
        for entry in audit_entries(live_host, "secret")
    ]
    assert delivered == [
        {
            "compartment": "holder",
            "secret": "token",
            "source": "age",
            "ciphertext_sha256": ciphertext_sha256,
        },
        {
            "compartment": "disp1",
            "secret": "token",
            "source": "age",
            "ciphertext_sha256": ciphertext_sha256,
        },
    ]
    audit_text = live_host.paths.audit_log.read_text()
    assert hashlib.sha256(plaintext).hexdigest() not in audit_text

    ok(live_host, "build", str(spec), "-o", str(build))
    assert (build / "secrets" / "token.age").read_bytes() == cipher_file.read_bytes()
    assert (live_host.paths.generation_dir / "secrets" / "token.age").exists()
    roots = [
        live_host.paths.state_root,
        live_host.paths.run_root,
        build,
        Path("/tmp"),  # this test's state, run and build folders too
        Path("/dev/shm"),
    ]
    found, scanned = files_holding(plaintext.strip(), roots)
    assert found == []
    assert {str(live_host.paths.audit_log), str(build / "modules" / "secrets.nix")} <= scanned
    assert str(live_host.paths.generation_dir / "spec.json") in scanned


TWO_SECRETS = """\
[host]
hostname = "lab"
subnet = "10.207.0.0/16"

[compartments.alpha]
memory_mb = 128
secrets = ["first-key"]

[compartments.beta]
memory_mb = 128
secrets = ["second-key"]

[secrets.first-key]
file = "secrets/first-key.age"
recipients = ["{recipient}"]

[secrets.second-key]
file = "secrets/second-key.age"
recipients = ["{recipient}"]
"""


def test_a_compartment_gets_the_one_secret_it_lists_of_two_declared(live_host: LiveHost) -> None:
    """alpha lists first-key only: second-key's name and plaintext are nowhere in it. Control:
    beta, which lists second-key, finds it with the same search."""
    key, recipient = new_key(live_host.base / "two-keys")
    plaintexts = {
        name: f"qnix-{name}-{random.token_hex(16)}\n".encode()
        for name in ("first-key", "second-key")
    }
    for name, plaintext in plaintexts.items():
        encrypt_to(recipient, plaintext, live_host.base / "secrets" / f"{name}.age")
    qnix = functools.partial(ok, live_host, env={"QNIX_AGE_IDENTITY": str(key)})
    qnix("apply", str(live_host.spec(TWO_SECRETS.format(recipient=recipient), "two.toml")))
    qnix("start", "alpha")
    qnix("start", "beta")
    try:
        in_alpha = secret_sightings(qnix, "alpha", "first-key", plaintexts)
        in_beta = secret_sightings(qnix, "beta", "second-key", plaintexts)
    finally:
        qnix("stop", "alpha")
        qnix("stop", "beta")
    assert sightings_of(in_alpha) == only_its_own(in_alpha, "first-key")
    assert sightings_of(in_beta) == only_its_own(in_beta, "second-key")
    # Not vacuous: it read the agent's files and /etc besides /run, /tmp and the home.
    assert {"/etc/passwd", "/opt/qnix-agent/agent.pyc"} <= set(in_alpha["scanned"])


def test_a_wrong_or_missing_identity_refuses_the_start_and_leaves_nothing(
    live_host: LiveHost,
) -> None:
    _, recipient = new_key(live_host.base / "right")
    wrong, _ = new_key(live_host.base / "wrong")
    spec = live_host.spec(TWO_COMPARTMENTS.format(recipient=recipient), "refuse.toml")
    encrypt_to(recipient, b"never delivered\n", live_host.base / "secrets" / "token.age")
    ok(live_host, "apply", str(spec))
    cipher = live_host.paths.generation_dir / "secrets" / "token.age"
    secret_events = len(audit_entries(live_host, "secret"))

    refused = run_qnix(live_host, "start", "holder", env={"QNIX_AGE_IDENTITY": str(wrong)})
    assert refused.returncode == 1
    first = refused.stderr.splitlines()[0]
    assert first == (
        f"error: compartment holder did not start: secret token: age cannot decrypt {cipher} "
        f"with the identity {wrong}: no identity matched any of the recipients"
    )
    _nothing_running(live_host, "holder")

    missing = live_host.base / "no-such.agekey"
    refused = run_qnix(live_host, "start", "holder", env={"QNIX_AGE_IDENTITY": str(missing)})
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[:2] == [
        f"error: no age identity at {missing}",
        f"  hint: put this host's key there (age-keygen -o {missing}; chmod 0400), or name "
        "another with QNIX_AGE_IDENTITY=FILE; its public key (age-keygen -y FILE) must be "
        "among the secret's recipients",
    ]
    _nothing_running(live_host, "holder")

    refused = run_qnix(
        live_host,
        "dispose",
        "--template",
        "dvm",
        "--",
        "true",
        env={"QNIX_AGE_IDENTITY": str(wrong)},
    )
    assert refused.returncode == 1
    assert "no identity matched any of the recipients" in refused.stderr
    assert [s for s in live_host.ls() if s.startswith("disp")] == []
    assert live_host.compartment_netns() == {"holder", "other"}
    # Nothing was delivered, so nothing is recorded as delivered.
    assert len(audit_entries(live_host, "secret")) == secret_events


def _gpg(home: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(
        [need("gpg"), "--batch", "--quiet", "--homedir", str(home), *args],
        input=input,
        check=True,
        capture_output=True,
    ).stdout.decode()


def test_a_pass_entry_is_delivered_byte_for_byte(live_host: LiveHost) -> None:
    """A real password store (pass + gpg, in a GNUPGHOME of the test's), read at start."""
    home = live_host.base / "gnupg"
    home.mkdir(mode=0o700)
    store = live_host.base / "store"
    env = {"GNUPGHOME": str(home), "PASSWORD_STORE_DIR": str(store)}
    _gpg(home, "--passphrase", "", "--quick-generate-key", "qnix test <t@example.invalid>")
    fingerprint = next(
        line.split(":")[9]
        for line in _gpg(home, "--with-colons", "--list-keys").splitlines()
        if line.startswith("fpr:")
    )
    # Binary-safe: a NUL and a carriage return survive, as pass stores them.
    plaintext = f"qnix-test-pass-{random.token_hex(16)}\0\r\n".encode()
    passenv = {**os.environ, **env}
    try:
        subprocess.run(
            [need("pass"), "init", fingerprint], env=passenv, check=True, capture_output=True
        )
        subprocess.run(
            [need("pass"), "insert", "--multiline", "work/vpn"],
            input=plaintext,
            env=passenv,
            check=True,
            capture_output=True,
        )
        spec = live_host.spec(
            '[host]\nhostname = "lab"\nsubnet = "10.207.0.0/16"\n\n'
            '[compartments.holder]\nmemory_mb = 128\nsecrets = ["vpn"]\n\n'
            '[secrets.vpn]\nsource = "pass"\npath = "work/vpn"\n',
            "pass.toml",
        )
        assert [s.to_json() for s in secrets.statuses(load(spec), None, env)] == [
            {
                "name": "vpn",
                "source": "pass",
                "location": "work/vpn",
                "recipients": [],
                "used_by": ["holder"],
                "status": "entry present",
            }
        ]
        ok(live_host, "apply", str(spec))
        ok(live_host, "start", "holder", env=env)
        try:
            inside = probe(
                live_host,
                "holder",
                "import hashlib, json, os; data = open('/run/secrets/vpn', 'rb').read(); "
                "print(json.dumps([hashlib.sha256(data).hexdigest(), "
                "oct(os.stat('/run/secrets/vpn').st_mode & 0o777)]))",
            )
        finally:
            ok(live_host, "stop", "holder")
        assert inside == [hashlib.sha256(plaintext).hexdigest(), "0o400"]
        entry = audit_entries(live_host, "secret")[-1]
        gpg_file = store / "work" / "vpn.gpg"
        assert (entry["compartment"], entry["secret"], entry["source"]) == ("holder", "vpn", "pass")
        assert entry["ciphertext_sha256"] == hashlib.sha256(gpg_file.read_bytes()).hexdigest()

        refused = run_qnix(live_host, "start", "holder", env={**env, "GNUPGHOME": str(store)})
        assert refused.returncode == 1
        assert refused.stderr.startswith(
            "error: compartment holder did not start: secret vpn: pass cannot decrypt the "
            "entry work/vpn: "
        )
        _nothing_running(live_host, "holder")
        found, _ = files_holding(plaintext[:-3], [live_host.base, Path("/dev/shm")])
        assert found == []
    finally:
        subprocess.run([need("gpgconf"), "--kill", "all"], env=passenv, check=False)


# ---- pieces --------------------------------------------------------------------------------------


def test_the_identity_comes_from_the_option_then_the_environment_then_etc(tmp_path: Path) -> None:
    option, env_key = tmp_path / "option.key", tmp_path / "env.key"
    environ = {secrets.ENV_IDENTITY: str(env_key)}
    assert secrets.identity_path(option, environ) == option
    assert secrets.identity_path(None, environ) == env_key
    assert secrets.identity_path(None, {}) == Path("/etc/qnix/host.agekey")
    # The NixOS output hands its units the same file.
    assert str(secrets.DEFAULT_IDENTITY) == HOST_IDENTITY
    with pytest.raises(QnixError, match="no age identity at"):
        secrets.require_identity(option, environ)


def test_decrypt_gives_the_exact_bytes_in_a_sealed_memfd(tmp_path: Path) -> None:
    key, recipient = new_key(tmp_path)
    plaintext = bytes(range(256)) + b"\r\n\0end"
    encrypt_to(recipient, plaintext, tmp_path / "s.age")
    fd = secrets.decrypt("age", str(tmp_path / "s.age"), str(key))
    try:
        assert os.read(fd, 1024) == plaintext
        with pytest.raises(OSError) as sealed:
            os.write(fd, b"x")
        assert sealed.value.errno == errno.EPERM
    finally:
        os.close(fd)
    with pytest.raises(QnixError, match="unknown secret source"):
        secrets.decrypt("vault", "x", None)


def test_keeper_configuration_carries_the_secrets() -> None:
    config = KeeperConfig(
        name="work",
        user="user",
        host_uid=0x70000002,
        host_gid=0x70000002,
        home=None,
        netns_path="/run/netns/qnix-work",
        cgroup="qnix-work",
        memory_bytes=1 << 27,
        pids=64,
        run_dir="/run/qnix/compartments/work",
        agent_socket="/run/qnix/compartments/work/agent.sock",
        state_file="/run/qnix/compartments/work/state.json",
        interpreter="/usr/bin/python3",
        interpreter_prefix=None,
        resolv_conf="",
        secrets=(
            ("vpn", "age", "/run/qnix/generation/secrets/vpn.age"),
            ("otp", "pass", "bank/otp"),
        ),
        age_identity="/etc/qnix/host.agekey",
    )
    assert KeeperConfig.from_json(config.to_json()) == config


# ---- qnix secret ---------------------------------------------------------------------------------


def _repository(tmp_path: Path, recipients: list[str]) -> Path:
    spec = tmp_path / "repo" / "ws.toml"
    spec.parent.mkdir()
    spec.write_text(
        '[host]\nhostname = "lab"\n\n'
        '[compartments.work]\nsecrets = ["vpn"]\n\n'
        f'[secrets.vpn]\nfile = "secrets/vpn.age"\nrecipients = {json.dumps(recipients)}\n\n'
        f'[secrets.spare]\nfile = "secrets/spare.age"\nrecipients = {json.dumps(recipients)}\n'
    )
    return spec


def qnix_cli(*args: str, input: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [QNIX, "secret", *args],
        input=input,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


def test_add_encrypts_to_every_recipient_in_the_spec(tmp_path: Path) -> None:
    first, first_public = new_key(tmp_path / "keys", "first")
    second, second_public = new_key(tmp_path / "keys", "second")
    ssh_key = tmp_path / "keys" / "ssh"
    subprocess.run(
        [need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True
    )
    ssh_public = " ".join(ssh_key.with_suffix(".pub").read_text().split()[:2])
    spec = _repository(tmp_path, [first_public, second_public, ssh_public])
    target = spec.parent / "secrets" / "vpn.age"

    assert qnix_cli("add", "vpn", "--spec", str(spec), input=b"one\0two\n") == (
        0,
        f"vpn: wrote {target} (3 recipients)\n",
    )
    for identity in (first, second, ssh_key):
        assert age_decrypt(identity, target) == b"one\0two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    code, output = qnix_cli("add", "vpn", "--spec", str(spec), input=b"other\n")
    assert (code, output.splitlines()[0]) == (1, f"error: {target} exists")
    assert age_decrypt(first, target) == b"one\0two\n"

    source = tmp_path / "plain"
    source.write_bytes(b"from a file\n")
    assert (
        qnix_cli("add", "vpn", "--spec", str(spec), "--from-file", str(source), "--force")[0] == 0
    )
    assert age_decrypt(second, target) == b"from a file\n"

    code, output = qnix_cli("add", "nope", "--spec", str(spec), input=b"x")
    assert (code, output.splitlines()[0]) == (
        1,
        f"error: {spec} declares no secret 'nope' (declared: spare, vpn)",
    )


# An editor that reports where it was given the plaintext, then appends a line to it.
INSPECTING_EDITOR = """\
import json, os, stat, sys
path = sys.argv[1]
info, folder = os.stat(path), os.stat(os.path.dirname(path))
mounts = [line.split() for line in open("/proc/self/mountinfo")]
mount = max(
    (m for m in mounts if path.startswith(m[4].rstrip("/") + "/")), key=lambda m: len(m[4])
)
report = {
    "mode": oct(stat.S_IMODE(info.st_mode)),
    "folder": oct(stat.S_IMODE(folder.st_mode)),
    "fs": mount[mount.index("-") + 1],
}
json.dump(report, open(REPORT, "w"))
open(path, "a").write("appended\\n")
"""


def test_edit_works_in_memory_and_reencrypts_only_a_change(tmp_path: Path) -> None:
    key, public = new_key(tmp_path / "keys")
    spec = _repository(tmp_path, [public])
    target = spec.parent / "secrets" / "vpn.age"
    encrypt_to(public, b"old value\n", target)
    shm_before = set(os.listdir("/dev/shm"))
    edit = ("edit", "vpn", "--spec", str(spec), "--identity", str(key))

    # The editor sees a file on a tmpfs, 0600, in a folder only we can enter.
    inspect = tmp_path / "inspect.py"
    report = tmp_path / "report.json"
    inspect.write_text(INSPECTING_EDITOR.replace("REPORT", repr(str(report))))
    env = {"EDITOR": f"python3 {inspect}", "XDG_RUNTIME_DIR": ""}
    assert qnix_cli(*edit, env=env) == (0, "vpn: re-encrypted\n")
    assert json.loads(report.read_text()) == {"mode": "0o600", "folder": "0o700", "fs": "tmpfs"}
    assert age_decrypt(key, target) == b"old value\nappended\n"

    before = target.read_bytes()
    assert qnix_cli(*edit, env={"EDITOR": "true"}) == (0, "vpn: unchanged\n")
    code, output = qnix_cli(*edit, env={"EDITOR": "false"})
    assert (code, output) == (1, f"error: the editor exited with code 1; {target} is unchanged\n")
    assert target.read_bytes() == before

    # A secret without a file yet starts empty.
    spare = spec.parent / "secrets" / "spare.age"
    write_new = "python3 -c \"import sys; open(sys.argv[1], 'w').write('new\\\\n')\""
    assert qnix_cli("edit", "spare", "--spec", str(spec), env={"EDITOR": write_new}) == (
        0,
        "spare: re-encrypted\n",
    )
    assert age_decrypt(key, spare) == b"new\n"
    assert set(os.listdir("/dev/shm")) == shm_before  # every scratch folder wiped


def test_rm_refuses_a_secret_in_use_and_ls_tells_who_uses_what(tmp_path: Path) -> None:
    key, public = new_key(tmp_path / "keys")
    other, _ = new_key(tmp_path / "keys", "other")
    spec = _repository(tmp_path, [public])
    for name in ("vpn", "spare"):
        encrypt_to(public, b"x\n", spec.parent / "secrets" / f"{name}.age")

    code, output = qnix_cli("ls", "--spec", str(spec), "--identity", str(key), "--json")
    assert code == 0
    assert json.loads(output) == [
        {
            "name": "spare",
            "source": "age",
            "location": "secrets/spare.age",
            "recipients": [public],
            "used_by": [],
            "status": "opens",
        },
        {
            "name": "vpn",
            "source": "age",
            "location": "secrets/vpn.age",
            "recipients": [public],
            "used_by": ["work"],
            "status": "opens",
        },
    ]
    code, output = qnix_cli("ls", "--spec", str(spec), "--identity", str(other), "--json")
    assert [entry["status"] for entry in json.loads(output)] == [
        "does not open: no identity matched any of the recipients"
    ] * 2

    code, output = qnix_cli("rm", "vpn", "--spec", str(spec))
    assert (code, output.splitlines()[0]) == (1, "error: secret vpn is still listed by work")
    assert qnix_cli("rm", "spare", "--spec", str(spec)) == (
        0,
        f"spare: removed {spec.parent / 'secrets' / 'spare.age'}; "
        f"now drop [secrets.spare] from {spec}\n",
    )
    code, output = qnix_cli("ls", "--spec", str(spec), "--identity", str(key), "--json")
    assert [entry["status"] for entry in json.loads(output)] == ["file missing", "opens"]


def test_the_spec_examples_open_with_the_demo_key() -> None:
    loaded = load(EXAMPLES / "smb-office.toml")
    assert {s.name: s.status for s in secrets.statuses(loaded, DEMO_KEY)} == {
        "bank-otp": "opens",
        "vault-master": "opens",
        "work-vpn": "opens",
    }
