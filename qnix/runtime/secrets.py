"""Secrets at run time: decrypted into memory when a compartment starts, never onto a disk.

A compartment that lists a secret finds it at /run/secrets/<name> for as long as it runs:
mode 0400, owned by its user, on a read-only mount, in the sandbox's own memory. Nothing of the
plaintext is ever written to a file on the host:

* `qnix apply` installs the live generation, which carries each age secret's ciphertext
  unchanged (`secrets/<name>.age`, as in the NixOS build).
* Starting a compartment (`start`, `run`, `dispose`, `apply` with autostart) resolves the host's
  age identity and hands the keeper one `Delivery` per secret (`keeper_fields`); a missing
  identity refuses the start before any process exists.
* The keeper decrypts each secret into a sealed memfd (`decrypt`): `age --output` and pass's gpg
  write the plaintext straight into it through /proc/<keeper>/fd/<n>, so it never passes
  through a pipe, a text decoder or a file. bubblewrap copies it into the sandbox's own tmpfs
  (`--perms 0400 --ro-bind-data`); the keeper closes the memfd once bubblewrap has started.
  A secret that cannot be decrypted fails the start: a compartment never runs without one.
* Once the compartment is up, one audit event "secret" per secret names the compartment, the
  secret and the sha256 of its ciphertext (never of the plaintext).

The host's age identity: `--identity FILE` where a command offers it, else the environment
variable QNIX_AGE_IDENTITY, else /etc/qnix/host.agekey (where the NixOS output expects it too).

`qnix secret add|edit|rm|ls` work on a spec's repository, agenix-like: `add` encrypts to the
recipients the spec lists, `edit` decrypts into a private folder on a tmpfs, runs $EDITOR and
re-encrypts, `ls` shows who uses each secret and whether an identity opens it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qnix.errors import QnixError
from qnix.runner import require_tool, run
from qnix.runtime.files import atomic_write
from qnix.spec.model import SECRET_NAME_RE

if TYPE_CHECKING:
    from qnix.runtime.paths import RuntimePaths
    from qnix.spec.load import LoadedSpec
    from qnix.spec.model import CompartmentBase, Secret, Workstation

log = logging.getLogger("qnix.run")

SOURCE_AGE = "age"
SOURCE_PASS = "pass"
SECRETS_INSIDE = "/run/secrets"
SECRET_MODE = 0o400
ENV_IDENTITY = "QNIX_AGE_IDENTITY"
# The file the NixOS output hands its units as well (qnix.compile.nix.modules.HOST_IDENTITY).
DEFAULT_IDENTITY = Path("/etc/qnix/host.agekey")
# Well inside the time `start` waits for its keeper (keeper.READY_TIMEOUT + 15 s).
DECRYPT_TIMEOUT = 15.0
# File systems that keep their files in memory only: where `edit` may put a plaintext.
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

# (secret name, source, where): `where` is the ciphertext's absolute path for an age secret,
# the entry for a pass secret. Plain strings, so that it travels in the keeper's JSON.
Delivery = tuple[str, str, str]


def inside_path(name: str) -> str:
    """Where secret `name` appears inside a compartment."""
    if not re.fullmatch(SECRET_NAME_RE, name):
        raise ValueError(f"not a secret name: {name!r}")
    return f"{SECRETS_INSIDE}/{name}"


# ---- the host's identity -----------------------------------------------------------------------


def identity_path(
    option: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The age identity to use: `option`, else QNIX_AGE_IDENTITY, else DEFAULT_IDENTITY."""
    env = os.environ if environ is None else environ
    chosen = option or env.get(ENV_IDENTITY) or DEFAULT_IDENTITY
    return Path(os.path.abspath(chosen))


def require_identity(
    option: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """`identity_path`, refused unless it is a file this process can read."""
    path = identity_path(option, environ)
    if not path.is_file():
        raise QnixError(
            f"no age identity at {path}",
            hint=f"put this host's key there (age-keygen -o {path}; chmod 0400), or name "
            f"another with {ENV_IDENTITY}=FILE; its public key (age-keygen -y FILE) must be "
            "among the secret's recipients",
        )
    if not os.access(path, os.R_OK):
        raise QnixError(
            f"cannot read the age identity {path}",
            hint="run qnix as root (the key should be readable by root only)",
        )
    return path


# ---- what a starting compartment gets ----------------------------------------------------------


def deliveries(
    ws: Workstation, compartment: CompartmentBase, generation_dir: Path
) -> tuple[Delivery, ...]:
    """One delivery per secret `compartment` lists, its age ciphertexts in `generation_dir`."""
    from qnix.compile.nix.modules import secret_file

    found: list[Delivery] = []
    for name in compartment.secrets:
        secret = ws.secrets.get(name)
        if secret is None:  # the loader refuses this; a hand-edited generation might not
            raise QnixError(f"secret {name!r} is not declared in the live generation")
        if secret.source == SOURCE_AGE:
            found.append((name, SOURCE_AGE, str(generation_dir / secret_file(name))))
        else:
            assert secret.path is not None  # the model demands it
            found.append((name, SOURCE_PASS, secret.path))
    return tuple(found)


def keeper_fields(
    paths: RuntimePaths, ws: Workstation, compartment: CompartmentBase
) -> dict[str, Any]:
    """The KeeperConfig fields that deliver `compartment`'s secrets. Refuses at once, before
    any process starts, when an age secret has no ciphertext or no readable identity."""
    found = deliveries(ws, compartment, paths.generation_dir)
    identity = None
    for name, source, where in found:
        if source == SOURCE_AGE and not Path(where).is_file():
            raise QnixError(
                f"the live generation holds no ciphertext of secret {name}",
                hint="bring the host to the spec again: qnix apply SPEC",
            )
        if source == SOURCE_AGE and identity is None:
            identity = str(require_identity())
    return {"secrets": found, "age_identity": identity}


def _seal(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    os.lseek(fd, 0, os.SEEK_SET)


def _fd_path(fd: int) -> str:
    """A path another process (running as root, or as us) opens to write into our `fd`."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _reason(stderr: str, code: int) -> str:
    """The line of a tool's complaint that says what went wrong (age's and gpg's own words)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    chosen = (errors or lines or [f"exit code {code}"])[0]
    return chosen.removeprefix("age: ").removeprefix("error: ")


def _age_decrypt(output: str, ciphertext: str, identity: str) -> None:
    """age writes the plaintext of `ciphertext` into `output` itself (a memfd's /proc path, or
    a file on a tmpfs): it never passes through this process."""
    age = require_tool("age", "age")
    result = run(
        [age, "--decrypt", "--identity", identity, "--output", output, ciphertext],
        timeout=DECRYPT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        reason = _reason(result.stderr, result.returncode)
        raise QnixError(
            f"age cannot decrypt {ciphertext} with the identity {identity}: {reason}",
            hint="is this host's public key (age-keygen -y IDENTITY) among the secret's "
            "recipients? `qnix secret ls --spec SPEC --identity IDENTITY` shows what it opens",
        )


def password_store(environ: Mapping[str, str] | None = None) -> Path:
    """The password store `pass` reads: PASSWORD_STORE_DIR, else ~/.password-store."""
    env = os.environ if environ is None else environ
    return Path(env.get("PASSWORD_STORE_DIR") or Path.home() / ".password-store")


def pass_entry_file(entry: str, environ: Mapping[str, str] | None = None) -> Path:
    """The gpg-encrypted file of a pass entry: its ciphertext."""
    return password_store(environ) / f"{entry}.gpg"


def _pass_decrypt_into(fd: int, entry: str) -> None:
    if not pass_entry_file(entry).is_file():
        raise QnixError(
            f"the password store {password_store()} has no entry {entry}",
            hint="add it with: pass insert ENTRY; PASSWORD_STORE_DIR names another store",
        )
    tool = require_tool("pass", "pass")
    # pass hands PASSWORD_STORE_GPG_OPTS to gpg (pass(1)): gpg writes the plaintext into the
    # memfd itself, byte for byte, rather than through `pass show`'s output.
    options = f"{os.environ.get('PASSWORD_STORE_GPG_OPTS', '')} --output {_fd_path(fd)}"
    result = run(
        [tool, "show", "--", entry],
        timeout=DECRYPT_TIMEOUT,
        check=False,
        env={**os.environ, "PASSWORD_STORE_GPG_OPTS": options.strip()},
    )
    # Its output is never shown: for a folder it would be a listing, never the secret, but
    # nothing of what pass prints belongs in a message.
    if result.returncode != 0 or result.stdout:
        reason = _reason(result.stderr, result.returncode)
        raise QnixError(
            f"pass cannot decrypt the entry {entry}: {reason}",
            hint="`pass show ENTRY` as the user starting the compartment must work without "
            "asking (an unlocked gpg-agent)",
        )


def decrypt(source: str, where: str, identity: str | None) -> int:
    """A sealed memfd holding the plaintext of one secret, at its start (close-on-exec: pass it
    to the one process that reads it)."""
    fd = os.memfd_create("qnix-secret", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if source == SOURCE_AGE:
            if identity is None:
                raise QnixError("an age secret needs the host's age identity")
            _age_decrypt(_fd_path(fd), where, identity)
        elif source == SOURCE_PASS:
            _pass_decrypt_into(fd, where)
        else:
            raise QnixError(f"unknown secret source {source!r}")
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def decrypt_all(found: Sequence[Delivery], identity: str | None) -> dict[str, int]:
    """A sealed memfd per secret, by name; all or none (a failure closes those made)."""
    fds: dict[str, int] = {}
    try:
        for name, source, where in found:
            inside_path(name)  # a name that could not be a file inside is refused here
            try:
                fds[name] = decrypt(source, where, identity)
            except QnixError as exc:
                raise QnixError(f"secret {name}: {exc.message}", hint=exc.hint) from exc
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def ciphertext_sha256(source: str, where: str) -> str:
    """The sha256 of what a secret is decrypted from: the audit trail names this, never
    anything derived from the plaintext."""
    file = Path(where) if source == SOURCE_AGE else pass_entry_file(where)
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_delivered(paths: RuntimePaths, compartment: str, found: Sequence[Delivery]) -> None:
    """One audit event per secret a compartment that just started holds."""
    from qnix.audit import events

    for name, source, where in found:
        events.record(
            paths,
            "secret",
            compartment=compartment,
            secret=name,
            source=source,
            ciphertext_sha256=ciphertext_sha256(source, where),
        )


# ---- qnix secret: the spec's repository ---------------------------------------------------------


def _declared(loaded: LoadedSpec, name: str) -> Secret:
    secret = loaded.workstation.secrets.get(name)
    if secret is None:
        known = ", ".join(loaded.workstation.secrets) or "none"
        raise QnixError(
            f"{loaded.path} declares no secret {name!r} (declared: {known})",
            hint=f'declare it first: [secrets.{name}] with file = "secrets/{name}.age" and '
            'recipients = ["age1..."]',
        )
    return secret


def _age_file(loaded: LoadedSpec, name: str) -> Path:
    secret = _declared(loaded, name)
    if secret.file is None:
        raise QnixError(
            f"secret {name} comes from the password store ({secret.path}), not an age file",
            hint=f"manage it with pass: pass edit {secret.path}",
        )
    return loaded.base_dir / secret.file


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("qnix-secret", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    """All a file descriptor (a memfd) holds, from its start."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def encrypt(plaintext_path: str, recipients: Sequence[str]) -> bytes:
    """The age ciphertext of the file at `plaintext_path` (a /proc/<pid>/fd path of a memfd,
    or the author's own file) to every recipient."""
    if not recipients:
        raise QnixError("a secret needs at least one recipient")
    age = require_tool("age", "age")
    out = os.memfd_create("qnix-ciphertext", os.MFD_CLOEXEC)
    try:
        argv = [age, "--encrypt"]
        for recipient in recipients:
            argv += ["--recipient", recipient]
        run([*argv, "--output", _fd_path(out), plaintext_path], timeout=DECRYPT_TIMEOUT)
        return read_fd(out)
    finally:
        os.close(out)


def add(loaded: LoadedSpec, name: str, plaintext: bytes | Path, *, force: bool = False) -> Path:
    """Encrypt `plaintext` (bytes, or a file of the author's) to the recipients the spec lists
    for secret `name`, and write its file atomically. Refuses to replace one unless `force`."""
    target = _age_file(loaded, name)
    if target.exists() and not force:
        raise QnixError(
            f"{target} exists",
            hint=f"change it with: qnix secret edit {name} --spec {loaded.path}; or replace "
            "it with --force",
        )
    recipients = _declared(loaded, name).recipients
    if isinstance(plaintext, Path):
        ciphertext = encrypt(str(plaintext), recipients)
    else:
        fd = _memfd_with(plaintext)
        try:
            ciphertext = encrypt(_fd_path(fd), recipients)
        finally:
            os.close(fd)
    atomic_write(target, ciphertext, 0o644)
    return target


def remove(loaded: LoadedSpec, name: str) -> Path:
    """Delete secret `name`'s file; refused while a compartment or template lists it."""
    target = _age_file(loaded, name)
    users = used_by(loaded.workstation, name)
    if users:
        raise QnixError(
            f"secret {name} is still listed by {', '.join(users)}",
            hint="drop it from their `secrets` first",
        )
    try:
        target.unlink()
    except FileNotFoundError:
        raise QnixError(f"{target} does not exist") from None
    return target


def used_by(ws: Workstation, name: str) -> list[str]:
    """Who lists secret `name`: compartments by name, disposable templates marked as such."""
    return [c for c, body in ws.compartments.items() if name in body.secrets] + [
        f"{t} (disposable template)"
        for t, body in ws.disposable_templates.items()
        if name in body.secrets
    ]


def _mount_type(path: Path) -> str:
    """The file system type of the mount holding `path`, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            separator = fields.index("-")
            inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fields[separator + 1]
    return kind


def scratch_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where a plaintext being edited may live: the user's runtime folder, /dev/shm."""
    env = os.environ if environ is None else environ
    candidates = [Path(env["XDG_RUNTIME_DIR"])] if env.get("XDG_RUNTIME_DIR") else []
    # mkdtemp makes a fresh 0700 folder in it: no other user can plant or read anything.
    return [*candidates, Path("/dev/shm")]  # noqa: S108


def _wipe(folder: Path) -> None:
    """Overwrite every file below `folder` with zeros, then remove it all."""
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            with contextlib.suppress(OSError), file.open("r+b") as handle:
                handle.write(b"\0" * file.stat().st_size)
                handle.flush()
                os.fsync(handle.fileno())
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def private_scratch(environ: Mapping[str, str] | None = None) -> Iterator[Path]:
    """A folder only we can enter (0700) on a file system kept in memory; wiped afterwards."""
    for root in scratch_roots(environ):
        if root.is_dir() and _mount_type(root) in MEMORY_FILE_SYSTEMS:
            folder = Path(tempfile.mkdtemp(prefix="qnix-secret-", dir=root))
            break
    else:
        raise QnixError(
            "no memory-backed folder for the plaintext: neither $XDG_RUNTIME_DIR nor /dev/shm "
            "is a tmpfs",
            hint="mount a tmpfs on /dev/shm; qnix never writes a plaintext to a disk",
        )
    try:
        yield folder
    finally:
        _wipe(folder)


def _file_sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def edit(
    loaded: LoadedSpec,
    name: str,
    identity: Path | None,
    editor: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Decrypt secret `name` into a private memory-backed folder (an empty file for a new one),
    run `editor` on it, re-encrypt if it changed; True if the secret changed."""
    target = _age_file(loaded, name)
    if not editor:
        raise QnixError("no editor", hint="set EDITOR (or VISUAL), e.g. EDITOR=vi")
    with private_scratch(environ) as folder:
        work = folder / name
        work.touch(mode=0o600)  # age and the editor write into it; it stays ours alone
        if target.exists():
            key = str(require_identity(identity, environ))
            _age_decrypt(str(work), str(target), key)
        before = _file_sha256(work)
        argv = [*editor, str(work)]
        log.debug("$ %s", shlex.join(argv))
        # The one subprocess that is not run through runner.run: an editor needs the terminal.
        try:
            code = subprocess.run(argv, check=False).returncode
        except FileNotFoundError:
            raise QnixError(f"editor not found: {editor[0]}", hint="set EDITOR") from None
        if code != 0:
            raise QnixError(f"the editor exited with code {code}; {target} is unchanged")
        if _file_sha256(work) == before:
            return False
        atomic_write(target, encrypt(str(work), _declared(loaded, name).recipients), 0o644)
        return True


def editor_command(environ: Mapping[str, str] | None = None) -> list[str]:
    """$VISUAL, else $EDITOR, else vi, split as a shell would."""
    env = os.environ if environ is None else environ
    return shlex.split(env.get("VISUAL") or env.get("EDITOR") or "vi")


@dataclass(frozen=True, slots=True)
class SecretStatus:
    name: str
    source: str
    location: str  # the file, relative to the spec, or the pass entry
    recipients: tuple[str, ...]
    used_by: tuple[str, ...]
    # age: "opens", "does not open: <why>", "no identity", "file missing";
    # pass: "entry present", "entry missing".
    status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "recipients": list(self.recipients),
            "used_by": list(self.used_by),
            "status": self.status,
        }


def _opens(file: Path, identity: Path | None) -> str:
    if not file.is_file():
        return "file missing"
    if identity is None:
        return "no identity"
    fd = os.memfd_create("qnix-secret-check", os.MFD_CLOEXEC)
    try:
        _age_decrypt(_fd_path(fd), str(file), str(identity))
    except QnixError as exc:
        return "does not open: " + exc.message.rsplit(": ", 1)[-1]
    finally:
        os.close(fd)  # the plaintext is dropped unread
    return "opens"


def statuses(
    loaded: LoadedSpec, identity: Path | str | None, environ: Mapping[str, str] | None = None
) -> list[SecretStatus]:
    """Every secret the spec declares, who uses it, and whether `identity` opens it (pass
    entries are only looked for, never decrypted)."""
    ws = loaded.workstation
    key: Path | None = None
    with contextlib.suppress(QnixError):
        key = require_identity(identity, environ)
    found = []
    for name, secret in ws.secrets.items():
        if secret.file is not None:
            location = secret.file
            status = _opens(loaded.base_dir / secret.file, key)
        else:
            assert secret.path is not None
            location = secret.path
            present = pass_entry_file(secret.path, environ).is_file()
            status = "entry present" if present else "entry missing"
        found.append(
            SecretStatus(
                name,
                secret.source,
                location,
                secret.recipients,
                tuple(used_by(ws, name)),
                status,
            )
        )
    return found
