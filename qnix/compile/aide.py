"""AIDE's configuration from the spec: which files the integrity baseline covers, and how.

Covered: the host folders (/etc by default), the live generation, the state folder of every
persistent compartment (`<state root>/compartments/<name>`: its home and its persistent paths) and
the spec's `audit.aide_paths`. Never covered: the audit log (it grows with every event), AIDE's
own database folder (it changes with every `init`) and the run folders of running compartments
(`<run root>/compartments`, beside the generation).

Two rule groups. Host files and the generation should never change between two baselines, so
everything AIDE can see is compared, inode and times included. A compartment's state is rewritten
by its programs (a save through a temporary file gives a new inode and new times for the same
bytes), so there only content, type, size, permissions, owner and extra attributes count.

Every path becomes a selection line through `selection_regex`, which passes on only letters,
digits, `/`, `_` and `-` and writes every other byte as a one-byte class `[\\x{hh}]`. A path from
the spec can therefore never start a directive (`@@...`, `name=value`, `!...`) or a new line, and
a regular-expression character in it matches only itself: the line selects that path and what
lies below it, nothing else. Why a class and not a bare `\\x{hh}`: AIDE files each rule under the
folder its regex starts with, read up to the first regex operator with backslashes dropped, so
`/a\\x{2e}b/c` would be filed under a folder `/ax{2e}b` that never exists and the rule would never
be consulted; `[` ends that folder name where the path stops being plain. The end is `\\z`, not
`$`, which would also match before a trailing newline (a sibling named `name` + newline).
The file URLs of the database are qnix's own folders, checked to hold plain characters only.

Pure: no file is read or written here.
"""

from __future__ import annotations

import os
import posixpath
import re
import string
from collections.abc import Sequence

from qnix.spec.model import Workstation

DEFAULT_HOST_PATHS = ("/etc",)
DATABASE = "aide.db"
NEW_DATABASE = "aide.db.new"
# The state layout the runtime (qnix.runtime.paths) and the NixOS module share.
COMPARTMENTS_FOLDER = "compartments"
SNAPSHOTS_FOLDER = "snapshots"  # beside each home: qnix.runtime.state
AUDIT_FOLDER = "audit"
# Beside the generation in the run root: one folder per running compartment.
RUN_FOLDERS = "compartments"

STATIC_GROUP = "QnixStatic"
STATE_GROUP = "QnixState"
# X: the extra attributes compiled into this AIDE (ACLs, xattrs, SELinux, ...), whatever they are.
STATIC_ATTRIBUTES = "p+ftype+i+l+n+u+g+s+m+c+sha256+sha512+X"
STATE_ATTRIBUTES = "p+ftype+l+u+g+s+sha256+sha512+X"

# Bytes a selection line carries as themselves; everything else is escaped.
_PLAIN = frozenset((string.ascii_letters + string.digits + "/_-").encode())
# What the path of a database URL may hold (qnix's own folders, never spec text).
_URL_PATH = re.compile(r"/[A-Za-z0-9/_.+-]*")


def _normal_absolute(path: str) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise ValueError(f"not an absolute path: {path!r}")
    if path != "/" and posixpath.normpath(path) != path:
        raise ValueError(f"not a normalised path (no '.', '..', '//' or trailing '/'): {path!r}")
    return path


def escape_path(path: str) -> str:
    """`path` as a regular expression matching exactly its bytes: letters, digits, `/`, `_`
    and `-` as themselves, every other byte (UTF-8, or the raw byte of an undecodable name)
    as `[\\x{hh}]`."""
    try:
        raw = os.fsencode(_normal_absolute(path))
    except UnicodeEncodeError as exc:  # a lone surrogate that stands for no byte
        raise ValueError(f"not a file name: {path!r}") from exc
    return "".join(chr(byte) if byte in _PLAIN else f"[\\x{{{byte:02x}}}]" for byte in raw)


def selection_regex(path: str) -> str:
    """The regex of a rule that covers `path` and everything below it: `/srv/a` matches
    `/srv/a` and `/srv/a/b`, never `/srv/ab`."""
    return "/" if path == "/" else escape_path(path) + "(/|\\z)"


def file_url(path: str) -> str:
    """`file:<path>` for a folder qnix chose; refuses characters AIDE would read otherwise."""
    if not _URL_PATH.fullmatch(path) or "//" in path or ".." in path:
        raise ValueError(
            f"AIDE cannot be pointed at {path!r}: use a path of letters, digits and /_.+- only"
        )
    return "file:" + path


def covered_paths(
    ws: Workstation,
    *,
    generation_dir: str,
    state_root: str,
    host_paths: Sequence[str] = DEFAULT_HOST_PATHS,
) -> list[tuple[str, str]]:
    """(path, group) for every folder the baseline covers, in the order of the config."""
    covered = [(path, STATIC_GROUP) for path in host_paths]
    covered.append((generation_dir, STATIC_GROUP))
    for compartment in ws.compartments.values():
        if compartment.persistence == "persistent":
            state = posixpath.join(state_root, COMPARTMENTS_FOLDER, compartment.name)
            covered.append((state, STATE_GROUP))
    covered += [(path, STATIC_GROUP) for path in ws.audit.aide_paths]
    return covered


def excluded_paths(*, database_dir: str, generation_dir: str, state_root: str) -> list[str]:
    """The audit log, AIDE's database, and the run folders of running compartments (their
    keepers' state and agent sockets, beside the generation in the run root) should a path
    of the spec enclose them."""
    run_folders = posixpath.join(posixpath.dirname(generation_dir), RUN_FOLDERS)
    return [posixpath.join(state_root, AUDIT_FOLDER), database_dir, run_folders]


def aide_config(
    ws: Workstation,
    *,
    database_dir: str,
    generation_dir: str,
    state_root: str,
    host_paths: Sequence[str] = DEFAULT_HOST_PATHS,
) -> str:
    """The text of aide.conf for `ws`. No report_url: AIDE reports to stdout (the journal, for
    the NixOS timer), and `qnix integrity` names its own report file on the command line."""
    lines = [
        f"# AIDE configuration generated by qnix for host {ws.host.hostname}; do not edit.",
        f"database_in={file_url(posixpath.join(database_dir, DATABASE))}",
        f"database_out={file_url(posixpath.join(database_dir, NEW_DATABASE))}",
        f"database_new={file_url(posixpath.join(database_dir, NEW_DATABASE))}",
        "gzip_dbout=false",
        "report_level=changed_attributes",
        "",
        "# Files that never change between two baselines: everything is compared.",
        f"{STATIC_GROUP} = {STATIC_ATTRIBUTES}",
        "# Compartment state: what the programs inside rewrite keeps its bytes, not its inode.",
        f"{STATE_GROUP} = {STATE_ATTRIBUTES}",
        "",
        "# Volatile: the audit log, the database (new at each init), running compartments,",
        "# state snapshots.",
    ]
    excluded = excluded_paths(
        database_dir=database_dir, generation_dir=generation_dir, state_root=state_root
    )
    lines += ["!" + selection_regex(path) for path in excluded]
    # Snapshots come with every stop and go with retention; the audit log records the hash
    # (or btrfs UUID) of each, and age authenticates its content.
    compartments = escape_path(posixpath.join(state_root, COMPARTMENTS_FOLDER))
    lines.append(f"!{compartments}/[^/]+/{SNAPSHOTS_FOLDER}(/|\\z)")
    lines += ["", "# Covered: host folders, the live generation, compartment state, aide_paths."]
    lines += [
        f"{selection_regex(path)} {group}"
        for path, group in covered_paths(
            ws, generation_dir=generation_dir, state_root=state_root, host_paths=host_paths
        )
    ]
    return "\n".join(lines) + "\n"
