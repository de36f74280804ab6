"""`qnix integrity init|check`: an AIDE baseline of the host and of the compartments' state.

`init` writes aide.conf for the live generation (qnix.compile.aide) into `<state root>/integrity`
(mode 0700), has AIDE check it (`--config-check`), builds the database (`--init`) and installs it
as the baseline by a rename. `check` has AIDE compare the files with that baseline and write what
it sees now into a second database (`--update`, its output sent to a scratch file of the
integrity folder), then lists each file added, removed or changed between the two databases.
`--config` uses another aide.conf instead (the one a NixOS host has in /etc), whose database URLs
must be plain `file:` paths.

Why the databases and not AIDE's report: the names of files in a compartment's state are chosen
by the compartment, and AIDE's reports do not carry them faithfully (0.18's JSON report turns
ESC into `'`, its plain report leaves `\\` and raw bytes unescaped), while its database writes
every name URL-encoded, which reads back exactly. The names are shown escaped (`printable`),
never raw, so a name cannot write terminal control sequences or pose as another line. AIDE's
exit code (bit 1 added, 2 removed, 4 changed) must agree with the two databases, or qnix refuses
the result. AIDE's own report goes to /dev/null, so nothing a compartment named reaches its
output either.

Both commands record an "integrity" audit event with what they found.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from qnix.audit import events
from qnix.compile.aide import DATABASE, DEFAULT_HOST_PATHS, NEW_DATABASE, aide_config, file_url
from qnix.errors import QnixError
from qnix.runner import Result, require_tool, run
from qnix.runtime import live
from qnix.runtime.files import atomic_write
from qnix.runtime.paths import RuntimePaths
from qnix.spec.model import Workstation

INTEGRITY_FOLDER = "integrity"
CONFIG_NAME = "aide.conf"
SCAN_NAME = "aide.db.scan"
# AIDE's report is not read (see above); this keeps it off qnix's output.
DISCARD = "/dev/null"
# Hashing a large tree on a slow disk takes long; the tool must be let finish.
AIDE_TIMEOUT = 3600.0
# AIDE's exit code on --check and --update: these bits say what it found; more is an error.
ADDED_BIT, REMOVED_BIT, CHANGED_BIT = 1, 2, 4
# How many names of each kind an audit event keeps (a rebuilt /etc changes thousands).
EVENT_NAMES = 100
# A database URL qnix can follow: a plain absolute path, no @@{variable} in it.
_DATABASE_LINE = re.compile(
    r"^[ \t]*(database_in|database_out)[ \t]*=[ \t]*file:(/[^\s@]*)[ \t]*$", re.MULTILINE
)
_GZIP_MAGIC = b"\x1f\x8b"

# One database entry: its attribute values, by the name of the attribute.
Entry = Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class AideFiles:
    """The configuration AIDE reads and the databases it reads and writes."""

    config: Path
    database: Path
    new_database: Path
    scan: Path


@dataclass(frozen=True, slots=True)
class Baseline:
    files: AideFiles
    entries: int
    database_sha256: str


@dataclass(frozen=True, slots=True)
class Findings:
    """What `check` found; names exactly as on disk (see `printable` before showing them)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    entries: int
    database_sha256: str

    @property
    def clean(self) -> bool:
        return not (self.added or self.removed or self.changed)


def integrity_folder(paths: RuntimePaths) -> Path:
    return paths.state_root / INTEGRITY_FOLDER


def own_files(paths: RuntimePaths) -> AideFiles:
    """Where `init` writes its configuration and database."""
    folder = integrity_folder(paths)
    return AideFiles(
        config=folder / CONFIG_NAME,
        database=folder / DATABASE,
        new_database=folder / NEW_DATABASE,
        scan=folder / SCAN_NAME,
    )


def files_of_config(paths: RuntimePaths, config: Path) -> AideFiles:
    """The databases another aide.conf names; the scan of `check` still goes to qnix's folder."""
    try:
        text = config.read_text(errors="replace")
    except OSError as exc:
        raise QnixError(f"cannot read {config}: {exc.strerror}") from exc
    found: dict[str, str] = {}
    for key, url_path in _DATABASE_LINE.findall(text):
        found.setdefault(key, url_path)  # AIDE uses the first of each
    missing = [key for key in ("database_in", "database_out") if key not in found]
    if missing:
        raise QnixError(
            f"{config} names no {' and no '.join(missing)} as a file: URL",
            hint="give database_in=file:/path and database_out=file:/path, without @@{variables}",
        )
    return AideFiles(
        config=config.absolute(),
        database=Path(found["database_in"]),
        new_database=Path(found["database_out"]),
        scan=integrity_folder(paths) / SCAN_NAME,
    )


def printable(name: str) -> str:
    """A file name, safe to print: printable characters as themselves, `\\` as `\\\\`, any
    other character as `\\xhh`/`\\uhhhh`/`\\Uhhhhhhhh`, an undecodable byte as `\\xhh`.
    Distinct names stay distinct."""
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a raw byte, carried by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def read_database(path: Path) -> dict[str, Entry]:
    """An AIDE database (plain or gzip) as file name -> attribute values. Names are
    URL-encoded in the file and come back as the exact bytes on disk (a str through
    surrogateescape); a line that does not fit the `@@db_spec` header is refused."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QnixError(f"cannot read the AIDE database {path}: {exc.strerror}") from exc
    if data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise QnixError(f"the AIDE database {path} is not valid gzip: {exc}") from exc
    fields: list[str] | None = None
    entries: dict[str, Entry] = {}
    ended = False
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line or line.startswith(b"#") or line == b"@@begin_db":
            continue
        if line == b"@@end_db":
            ended = True
            continue
        words = line.split()
        if words and words[0] == b"@@db_spec":
            fields = [word.decode("ascii", "replace") for word in words[1:]]
            if not fields or fields[0] != "name":
                raise QnixError(f"{path}:{number}: a db_spec that does not start with name")
            continue
        if fields is None or ended or not words or len(words) != len(fields):
            raise QnixError(f"{path}:{number}: not a line of an AIDE database")
        name = os.fsdecode(unquote_to_bytes(words[0]))
        entries[name] = dict(zip(fields[1:], words[1:], strict=True))
    if not ended:
        raise QnixError(f"the AIDE database {path} is cut short (no @@end_db)")
    return entries


def differences(
    baseline: Mapping[str, Entry], now: Mapping[str, Entry]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(added, removed, changed) names between two databases, each sorted."""
    added = sorted(name for name in now if name not in baseline)
    removed = sorted(name for name in baseline if name not in now)
    changed = sorted(name for name in now if name in baseline and now[name] != baseline[name])
    return tuple(added), tuple(removed), tuple(changed)


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _aide(files: AideFiles, *options: str) -> Result:
    """Run AIDE on `files.config`, its report discarded and only its errors logged."""
    argv = [
        require_tool("aide", "aide"),
        f"--config={files.config}",
        "--log-level=error",
        f"--before=report_url=file:{DISCARD}",
    ]
    return run([*argv, *options], timeout=AIDE_TIMEOUT, check=False)


def _failed(what: str, result: Result, hint: str) -> QnixError:
    detail = result.stderr.strip() or result.stdout.strip()
    return QnixError(
        f"aide {what} failed with exit code {result.returncode}"
        + (f"\n{detail}" if detail else ""),
        hint=hint,
    )


def config_text(
    paths: RuntimePaths, ws: Workstation, host_paths: Sequence[str] = DEFAULT_HOST_PATHS
) -> str:
    """The aide.conf of qnix's own that `init` writes for `ws` (`qnix install --spec` puts the
    same in place for the units' roots)."""
    try:
        return aide_config(
            ws,
            database_dir=str(own_files(paths).database.parent),
            generation_dir=str(paths.generation_dir),
            state_root=str(paths.state_root),
            host_paths=host_paths,
        )
    except ValueError as exc:
        raise QnixError(str(exc), hint="check --state-root and --host-path") from exc


def _write_config(paths: RuntimePaths, host_paths: Sequence[str]) -> AideFiles:
    ws = live.live_workstation(paths)
    if ws is None:
        raise QnixError(
            f"no live generation under {paths.run_root}",
            hint="bring the host up first: qnix apply SPEC",
        )
    files = own_files(paths)
    text = config_text(paths, ws, host_paths)
    _private_folder(files.config.parent)
    atomic_write(files.config, text.encode(), mode=0o600)
    return files


def init(
    paths: RuntimePaths,
    *,
    host_paths: Sequence[str] = DEFAULT_HOST_PATHS,
    config: Path | None = None,
) -> Baseline:
    """Record a new baseline: the configuration (written unless `config` is given), checked
    by AIDE, then a fresh database installed in place of the old one. qnix's own config is
    written and scanned under the runtime's lock, so the live generation holds still."""
    if config is not None:
        baseline = _build(files_of_config(paths, config))
    else:
        if live.live_workstation(paths) is None:
            raise QnixError(
                f"no live generation under {paths.run_root}",
                hint="bring the host up first: qnix apply SPEC",
            )
        with live.locked(paths):
            # The audit folder is never covered, but its appearing would change its parent.
            _private_folder(paths.audit_log.parent)
            baseline = _build(_write_config(paths, host_paths))
    events.record(
        paths,
        "integrity",
        action="init",
        result="ok",
        config=str(baseline.files.config),
        entries=baseline.entries,
        database_sha256=baseline.database_sha256,
    )
    return baseline


def _build(files: AideFiles) -> Baseline:
    checked = _aide(files, "--config-check")
    if checked.returncode != 0:
        raise _failed("--config-check", checked, hint=f"fix {files.config}")
    files.new_database.unlink(missing_ok=True)
    built = _aide(files, "--init")
    if built.returncode != 0:
        raise _failed("--init", built, hint="run it by hand: qnix --debug shows the command")
    entries = len(read_database(files.new_database))
    files.new_database.chmod(0o600)
    os.replace(files.new_database, files.database)
    return Baseline(files=files, entries=entries, database_sha256=_sha256(files.database))


def _scan(files: AideFiles) -> tuple[int, dict[str, Entry]]:
    """AIDE's exit code comparing with the baseline, and the database of the files now."""
    _private_folder(files.scan.parent)
    files.scan.unlink(missing_ok=True)
    try:
        url = file_url(str(files.scan))
    except ValueError as exc:
        raise QnixError(str(exc), hint="choose another --state-root") from exc
    try:
        # The first database_out AIDE reads wins: the scan, never the configured one.
        result = _aide(files, "--update", f"--before=database_out={url}")
        if not 0 <= result.returncode <= ADDED_BIT | REMOVED_BIT | CHANGED_BIT:
            raise _failed("--update", result, hint="run it by hand: qnix --debug shows the command")
        return result.returncode, read_database(files.scan)
    finally:
        files.scan.unlink(missing_ok=True)


def check(paths: RuntimePaths, *, config: Path | None = None) -> Findings:
    """Compare the files with the baseline."""
    files = own_files(paths) if config is None else files_of_config(paths, config)
    if not files.config.exists() or not files.database.exists():
        raise QnixError(
            f"no integrity baseline: {files.database} is missing",
            hint="record one first: qnix integrity init",
        )
    digest = _sha256(files.database)
    baseline = read_database(files.database)
    code, now = _scan(files)
    added, removed, changed = differences(baseline, now)
    said = (bool(code & ADDED_BIT), bool(code & REMOVED_BIT), bool(code & CHANGED_BIT))
    if said != (bool(added), bool(removed), bool(changed)):
        raise QnixError(
            f"aide's exit code {code} disagrees with its databases",
            hint="run aide --check by hand; qnix trusts neither when they disagree",
        )
    findings = Findings(
        added=added,
        removed=removed,
        changed=changed,
        entries=len(now),
        database_sha256=digest,
    )
    events.record(
        paths,
        "integrity",
        action="check",
        result="clean" if findings.clean else "changed",
        config=str(files.config),
        entries=findings.entries,
        database_sha256=digest,
        added=[printable(name) for name in added[:EVENT_NAMES]],
        removed=[printable(name) for name in removed[:EVENT_NAMES]],
        changed=[printable(name) for name in changed[:EVENT_NAMES]],
        added_count=len(added),
        removed_count=len(removed),
        changed_count=len(changed),
    )
    return findings
