"""Split GPG and split SSH on a stand-in host: the keys are made in the vault (network none),
the client signs through qnix.Gpg and qnix.SshAgent, the signatures are checked on the host
with the public keys only, forbidden gpg options are refused by the client and by the vault,
and no byte of either private key is ever in the client, in its state folder or in anything
it received. A compartment without a policy line gets nothing of the vault.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnix.broker import calls
from qnix.inside import split
from tests.conftest import need
from tests.runtime.livehost import QNIX, LiveHost

SPEC = """\
[host]
hostname = "lab"
subnet = "10.214.0.0/16"

[compartments.work]
memory_mb = 128
autostart = true

[compartments.other]
memory_mb = 128
autostart = true

[compartments.vault]
memory_mb = 256
network = "none"

[policy]
rules = [
  "qnix.Gpg * work vault allow",
  "qnix.SshAgent * work vault allow",
]
"""
GPG_CLIENT = ["python3", "/opt/qnix-agent/split.py", "gpg-client", "--target", "vault", "--"]
VAULT_SETUP = """\
set -e
gpg --batch --quiet --passphrase '' --quick-gen-key 'Vault Key <vault@example.org>' \
    ed25519 sign never 2>/dev/null
gpg --list-secret-keys --with-colons | sed -n 's/^fpr:*\\([0-9A-F]*\\):$/\\1/p' | head -n 1
mkdir -p -m 700 ~/.ssh
ssh-keygen -q -t ed25519 -N '' -C vault@example.org -f ~/.ssh/id_ed25519
ssh-agent -a ~/.ssh/agent.sock >/dev/null 2>&1 </dev/null
SSH_AUTH_SOCK=~/.ssh/agent.sock ssh-add -q ~/.ssh/id_ed25519 2>/dev/null
"""
# In a client: an SSH_AUTH_SOCK served by call.py --listen, then list, remove, list, sign.
SSH_SESSION = """\
mkdir -p -m 700 ~/.ssh
printf '%s\\n' "$1" > vault.pub
printf 'hello\\n' > msg
rm -f msg.sig
python3 -I -S /opt/qnix-agent/call.py --listen ~/.ssh/agent.sock vault qnix.SshAgent \
    </dev/null >/dev/null 2>relay.err &
relay=$!
n=0
while [ ! -S ~/.ssh/agent.sock ] && [ $n -lt 250 ]; do sleep 0.02; n=$((n + 1)); done
export SSH_AUTH_SOCK=~/.ssh/agent.sock
ssh-add -L 2>/dev/null; echo "list=$?"
ssh-add -D 2>/dev/null; echo "remove=$?"
ssh-add -L 2>/dev/null; echo "list=$?"
ssh-keygen -Y sign -f vault.pub -n file msg 2>/dev/null; echo "sign=$?"
kill $relay
"""


@dataclass(frozen=True)
class Vault:
    fingerprint: str
    ssh_public: str  # the authorized_keys line
    secrets: dict[str, bytes]  # private key material, by what it is


def gpg_secret_scalars(home: Path) -> dict[str, bytes]:
    """The `d` of every key in gpg's private-keys-v1.d (extended key format)."""
    found = {}
    for key_file in sorted((home / ".gnupg" / "private-keys-v1.d").glob("*.key")):
        text = key_file.read_text()
        for match in re.finditer(r"\(d\s*#([0-9A-Fa-f\s]+)#\)", text):
            found[f"gpg d of {key_file.name}"] = bytes.fromhex("".join(match.group(1).split()))
    return found


def ssh_ed25519_seed(private_key: Path) -> bytes:
    """The 32-byte seed of an unencrypted OpenSSH ed25519 private key file."""
    lines = private_key.read_text().splitlines()
    blob = base64.b64decode("".join(line for line in lines if not line.startswith("-----")))
    magic = b"openssh-key-v1\0"
    assert blob.startswith(magic)
    position = len(magic)

    def string(data: bytes) -> bytes:
        nonlocal position
        size = int.from_bytes(data[position : position + 4], "big")
        value = data[position + 4 : position + 4 + size]
        position += 4 + size
        return value

    assert (string(blob), string(blob), string(blob)) == (b"none", b"none", b"")
    position += 4  # the number of keys: 1
    string(blob)  # the public key
    private = string(blob)
    position = 8  # two check integers
    assert string(private) == b"ssh-ed25519"
    public = string(private)
    secret = string(private)
    assert len(secret) == 64 and secret[32:] == public
    return secret[:32]


def forms(secret: bytes) -> list[bytes]:
    """How a key could show up: raw, in hex, or in base64 at any of the three alignments (the
    characters that only the secret's bits decide)."""
    found = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + secret)
        first = -(-8 * shift // 6)
        last = (8 * shift + 8 * len(secret)) // 6
        found.append(encoded[first:last])
    return found


def leaks(secrets: dict[str, bytes], data: bytes) -> list[str]:
    """The names of the secrets in `data` (line breaks of wrapped text ignored)."""
    flat = data.replace(b"\n", b"").replace(b"\r", b"")
    return [
        name
        for name, secret in secrets.items()
        if any(form in data or form in flat for form in forms(secret))
    ]


def files_under(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.fixture(scope="module")
def host() -> Iterator[LiveHost]:
    made = LiveHost()
    try:
        made.ok("apply", str(made.spec(SPEC)))
        made.ok("start", "vault")
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def vault(host: LiveHost) -> Vault:
    need("gpg")
    need("ssh-keygen")
    result = host.qnix("run", "vault", "--", "sh", "-c", VAULT_SETUP)
    assert result.returncode == 0, result.stderr
    fingerprint = result.stdout.strip()
    assert re.fullmatch(r"[0-9A-F]{40}", fingerprint), result.stdout
    home = host.paths.home("vault")
    secrets = gpg_secret_scalars(home)
    secrets["ssh ed25519 seed"] = ssh_ed25519_seed(home / ".ssh" / "id_ed25519")
    assert len(secrets) == 2
    # The search can find them: every secret is in the vault's own state folder.
    vault_bytes = b"".join(path.read_bytes() for path in files_under(home))
    assert leaks(secrets, vault_bytes) == sorted(secrets)
    ssh_public = (home / ".ssh" / "id_ed25519.pub").read_text().strip()
    return Vault(fingerprint, ssh_public, secrets)


def run_bytes(
    host: LiveHost, name: str, *argv: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [QNIX, "run", name, "--", *argv],
        input=stdin,
        capture_output=True,
        env=host.env,
        timeout=60,
        check=False,
    )


def call_events(host: LiveHost) -> list[dict[str, object]]:
    lines = host.paths.audit_log.read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["event"] == "call"]


# ---- split GPG ------------------------------------------------------------------------------


def test_a_client_signs_with_the_vaults_key_and_the_host_verifies(
    host: LiveHost, vault: Vault, tmp_path: Path
) -> None:
    document = b"quarterly report\n"
    # The way git signs: gpg --status-fd=2 -bsau KEY, the data on stdin.
    signed = run_bytes(
        host,
        "work",
        *GPG_CLIENT,
        "--status-fd=2",
        "-bsau",
        vault.fingerprint,
        stdin=document,
    )
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith(b"-----BEGIN PGP SIGNATURE-----\n")
    assert b"[GNUPG:] SIG_CREATED D 22 8 00 " in signed.stderr
    assert signed.stderr.rstrip().endswith(vault.fingerprint.encode())
    assert leaks(vault.secrets, signed.stdout + signed.stderr) == []

    # On the host, with nothing but the exported public key.
    exported = run_bytes(host, "vault", "gpg", "--export", "--armor", vault.fingerprint)
    assert exported.stdout.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    gpg = [need("gpg"), "--homedir", str(gnupg), "--batch", "--no-tty"]
    try:
        subprocess.run([*gpg, "--import"], input=exported.stdout, check=True, capture_output=True)
        (tmp_path / "doc").write_bytes(document)
        (tmp_path / "doc.asc").write_bytes(signed.stdout)
        good = subprocess.run(
            [
                *gpg,
                "--status-fd",
                "1",
                "--verify",
                str(tmp_path / "doc.asc"),
                str(tmp_path / "doc"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert good.returncode == 0, good.stderr
        assert f"[GNUPG:] VALIDSIG {vault.fingerprint} " in good.stdout
        (tmp_path / "doc").write_bytes(document.replace(b"quarterly", b"annual"))
        bad = subprocess.run(
            [
                *gpg,
                "--status-fd",
                "1",
                "--verify",
                str(tmp_path / "doc.asc"),
                str(tmp_path / "doc"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad.returncode == 1
        assert "[GNUPG:] BADSIG " in bad.stdout
    finally:
        subprocess.run([need("gpgconf"), "--homedir", str(gnupg), "--kill", "all"], check=False)


def test_the_client_verifies_a_detached_signature_through_the_vault(
    host: LiveHost, vault: Vault
) -> None:
    script = (
        "printf 'minutes\\n' > minutes.txt\n"
        '"$@" --detach-sign --armor < minutes.txt > minutes.txt.asc || exit 9\n'
        '"$@" --status-fd=1 --verify minutes.txt.asc minutes.txt\n'
    )
    result = run_bytes(host, "work", "sh", "-c", script, "sh", *GPG_CLIENT)
    assert result.returncode == 0, result.stderr
    assert f"[GNUPG:] VALIDSIG {vault.fingerprint} ".encode() in result.stdout
    assert leaks(vault.secrets, result.stdout + result.stderr) == []


FORBIDDEN = {
    "export secret keys": (
        ["--export-secret-keys"],
        "option '--export-secret-keys' is not allowed",
    ),
    "export secret subkeys": (
        ["--armor", "--export-secret-subkeys"],
        "option '--export-secret-subkeys' is not allowed",
    ),
    "an abbreviation gpg would take": (
        ["--export-secret-k"],
        "option '--export-secret-k' is not allowed",
    ),
    "another home": (["--homedir", "/tmp", "--sign"], "option '--homedir' is not allowed"),
    "another home, inline": (
        ["--homedir=/tmp", "--sign"],
        "option '--homedir' takes no value or is not allowed",
    ),
    "output to a file": (
        ["--detach-sign", "--output", "/home/user/x"],
        "value '/home/user/x' is not allowed for --output",
    ),
    "commands from a descriptor": (
        ["--command-fd", "0", "--sign"],
        "option '--command-fd' is not allowed",
    ),
    "status to another descriptor": (
        ["--status-fd=3", "--sign"],
        "value '3' is not allowed for --status-fd",
    ),
    "a passphrase descriptor": (
        ["--passphrase-fd", "0", "--sign"],
        "option '--passphrase-fd' is not allowed",
    ),
    "a file to sign": (
        ["--sign", "/home/user/.gnupg/pubring.kbx"],
        "'/home/user/.gnupg/pubring.kbx': the data comes on stdin, not in a file",
    ),
    "a file to verify, in the vault": (
        ["--verify", "/home/user/.gnupg/trustdb.gpg"],
        "'/home/user/.gnupg/trustdb.gpg': the data comes on stdin, not in a file",
    ),
    "deleting keys": (["--delete-secret-keys"], "option '--delete-secret-keys' is not allowed"),
    "importing keys": (["--import"], "option '--import' is not allowed"),
    "an option as a key": (
        ["--sign", "--local-user", "--homedir"],
        "value '--homedir' is not allowed for --local-user",
    ),
    "a value missing": (["-bsau"], "option -u needs a value"),
    "no command": (["--armor"], "commands none are not allowed together (or none was given)"),
    "two commands": (
        ["--sign", "--export"],
        "commands --export --sign are not allowed together (or none was given)",
    ),
}

# Runs in the client: hands each header straight to call.py (no client-side checks), so the
# vault's own allow-list is what answers.
RAW_GPG = r"""
import base64, json, subprocess, sys
results = []
for header in json.load(sys.stdin):
    body = json.dumps(header).encode()
    done = subprocess.run(
        [sys.executable, "-I", "-S", "/opt/qnix-agent/call.py", "vault", "qnix.Gpg"],
        input=len(body).to_bytes(4, "big") + body + b"data\n",
        capture_output=True,
    )
    results.append([done.returncode, base64.b64encode(done.stdout).decode(), done.stderr.decode()])
print(json.dumps(results))
"""


def test_forbidden_options_are_refused_by_the_vault(host: LiveHost, vault: Vault) -> None:
    headers: list[object] = [{"args": args} for args, _ in FORBIDDEN.values()]
    headers += [{"args": ["--sign"], "homedir": "/tmp"}, {"args": ["--sign"], "signature": "AA=="}]
    result = run_bytes(
        host, "work", "python3", "-I", "-S", "-c", RAW_GPG, stdin=json.dumps(headers).encode()
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    expected = [message for _, message in FORBIDDEN.values()] + [
        "request header must be {args, signature}",
        "a signature comes only with --verify",
    ]
    received = b"".join(base64.b64decode(stdout) for _, stdout, _ in answers)
    assert received == b""
    assert [(code, stderr) for code, _, stderr in answers] == [
        (split.REFUSED, f"qnix-gpg (vault): refused: {message}\n") for message in expected
    ]
    assert leaks(vault.secrets, result.stdout + result.stderr) == []


def test_forbidden_options_are_refused_by_the_client_before_any_call(
    host: LiveHost, vault: Vault
) -> None:
    calls_before = len(call_events(host))
    for args, message in FORBIDDEN.values():
        if args[0] == "--verify":
            continue  # a client reads its own files for --verify (they never reach the vault)
        result = run_bytes(host, "work", *GPG_CLIENT, *args)
        assert (result.returncode, result.stdout, result.stderr.decode()) == (
            split.REFUSED,
            b"",
            f"qnix-gpg: {message}\n",
        )
    assert len(call_events(host)) == calls_before


def test_without_a_policy_line_gpg_gets_nothing_of_the_vault(host: LiveHost, vault: Vault) -> None:
    result = run_bytes(host, "other", *GPG_CLIENT, "--detach-sign", "--armor", stdin=b"sign me\n")
    assert (result.returncode, result.stdout, result.stderr) == (
        calls.REFUSED,
        b"",
        b"qnix-call: qnix.Gpg refused: denied by policy\n",
    )
    last = call_events(host)[-1]
    assert (last["source"], last["service"], last["decision"]) == ("other", "qnix.Gpg", "deny")


# ---- split SSH ------------------------------------------------------------------------------


def test_a_client_signs_with_the_vaults_ssh_key_and_the_host_verifies(
    host: LiveHost, vault: Vault, tmp_path: Path
) -> None:
    session = run_bytes(host, "work", "sh", "-c", SSH_SESSION, "sh", vault.ssh_public)
    # Listing and signing reach the vault's agent; removing its keys does not.
    assert session.stdout.decode() == (
        f"{vault.ssh_public}\nlist=0\nremove=1\n{vault.ssh_public}\nlist=0\nsign=0\n"
    )
    work = host.paths.home("work")
    signature = (work / "msg.sig").read_bytes()
    assert signature.startswith(b"-----BEGIN SSH SIGNATURE-----\n")
    key_type, key, comment = vault.ssh_public.split()
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'{comment} namespaces="file" {key_type} {key}\n')
    (tmp_path / "msg.sig").write_bytes(signature)
    verify = [need("ssh-keygen"), "-Y", "verify", "-f", str(allowed), "-I", comment, "-n", "file"]
    good = subprocess.run(
        [*verify, "-s", str(tmp_path / "msg.sig")],
        input=(work / "msg").read_bytes(),
        capture_output=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f'Good "file" signature for {comment} with ED25519 key'.encode())
    bad = subprocess.run(
        [*verify, "-s", str(tmp_path / "msg.sig")],
        input=b"other\n",
        capture_output=True,
        check=False,
    )
    assert bad.returncode != 0
    assert leaks(vault.secrets, session.stdout + session.stderr + signature) == []


def test_without_a_policy_line_ssh_gets_nothing_of_the_vault(host: LiveHost, vault: Vault) -> None:
    session = run_bytes(host, "other", "sh", "-c", SSH_SESSION, "sh", vault.ssh_public)
    # Each step fails (how depends on when the refused connection closes: EOF or EPIPE).
    lines = session.stdout.decode().splitlines()
    assert [line.split("=")[0] for line in lines] == ["list", "remove", "list", "sign"]
    assert all(line.split("=")[1] != "0" for line in lines), lines
    other = host.paths.home("other")
    assert not (other / "msg.sig").exists()
    relay_errors = (other / "relay.err").read_text()
    assert "qnix-call: qnix.SshAgent refused: denied by policy\n" in relay_errors
    denied = [
        e for e in call_events(host) if e["source"] == "other" and e["service"] == "qnix.SshAgent"
    ]
    assert denied and {e["decision"] for e in denied} == {"deny"}


# ---- the private keys never left the vault ----------------------------------------------------


def test_no_private_key_byte_is_anywhere_in_the_clients(host: LiveHost, vault: Vault) -> None:
    for name in ("work", "other"):
        for path in files_under(host.paths.state_dir(name)):
            assert leaks(vault.secrets, path.read_bytes()) == [], path


# ---- the allow-list, pure -----------------------------------------------------------------------

ALLOWED_HEAD = set(split.GPG_FLAGS - split.DROPPED_FLAGS) | set(split.GPG_COMMANDS.values())
TOKENS = st.sampled_from(
    [
        *split.GPG_COMMANDS,
        *split.GPG_FLAGS,
        *split.GPG_VALUES,
        *(f"-{letter}" for letter in split.GPG_SHORT),
        "-bsau",
        "--",
        "-",
        "1",
        "3",
        "SHA256",
        "vault@example.org",
        "0x" + "AB" * 20,
        "--export-secret-keys",
        "--homedir",
        "--output=/tmp/x",
        "--command-fd=0",
        "/etc/passwd",
        "../x",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(TOKENS, st.text(max_size=12)), max_size=10))
def test_the_vault_passes_gpg_only_allowed_options(untrusted: list[str]) -> None:
    try:
        request = split.parse_gpg_args(untrusted, files_allowed=False)
    except split.GpgRefused:
        return
    argv = request.argv()
    head, operands = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    for option in head:
        name, _, value = option.partition("=")
        if name in split.GPG_VALUES:
            assert split.GPG_VALUES[name].fullmatch(value), option
        else:
            assert option in ALLOWED_HEAD, option
    assert frozenset(request.commands) in split.COMMAND_SETS
    for operand in operands:
        assert request.commands & split.KEY_OPERAND_COMMANDS
        assert split.KEY_RE.fullmatch(operand) and not operand.startswith("-"), operand


def test_git_style_signing_options_parse_to_gpg_arguments() -> None:
    request = split.parse_gpg_args(
        ["--status-fd=2", "-bsau", "0xABCDEF0123456789"], files_allowed=False
    )
    assert request.argv() == [
        "--status-fd=2",
        "--armor",
        "--local-user=0xABCDEF0123456789",
        "--detach-sign",
        "--sign",
        "--",
    ]
