"""Read a Qubes 4.1+ policy.d folder, include directives and all, into a `Policy`.

As in Qubes: only `*.policy` files not starting with `.` count; their names must use only
`[0-9a-z_.-]`; they are read in the byte order of their names (the C locale). Directives:

* `!include FILE` reads FILE as policy lines;
* `!include-dir DIR` reads DIR's `*.policy` files like the folder's own;
* `!include-service SERVICE ARGUMENT FILE` reads FILE in the service format (`SOURCE TARGET
  ACTION[,PARAM...]`, `$` for `@`) as lines for SERVICE with ARGUMENT only.

Paths are relative to the policy folder (never to the including file), and must stay inside it:
qnix builds the folder into the system, so a path to elsewhere on one machine would be a
different policy on the next. Include cycles, nesting deeper than MAX_INCLUDE_DEPTH and more
than MAX_FILES_READ files are errors. Nothing here raises: every problem becomes a
`PolicyError` with file:line, and a policy with one denies every request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, Protocol

from qnix.policy.parse import (
    INLINE_POLICY_FILE,
    Policy,
    PolicyError,
    PolicySyntaxError,
    Rule,
    parse_line,
    rule_from_fields,
    service_argument_problem,
    split_lines,
)

if TYPE_CHECKING:
    from qnix.spec.load import LoadedSpec

POLICY_SUFFIX = ".policy"
FILE_NAME_RE = re.compile(r"[0-9a-z_.-]+")
MAX_INCLUDE_DEPTH = 16
MAX_FILES_READ = 1000
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 16 << 20
ROOT = PurePosixPath(".")

Kind = Literal["file", "dir", "missing", "other"]


class Unreadable(Exception):
    """A path that cannot be read as policy; the message says why."""


class PolicyTree(Protocol):
    """Where policy files come from. Paths are relative to the policy folder."""

    def kind(self, path: PurePosixPath) -> Kind: ...

    def names(self, path: PurePosixPath) -> list[str]: ...

    def read(self, path: PurePosixPath, limit: int) -> str: ...

    def identity(self, path: PurePosixPath) -> str:
        """The same string for two paths that reach one file (through symbolic links)."""
        ...


class FolderTree:
    """A folder on disk. Symbolic links are followed, but never out of the folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = root.resolve()

    def _real(self, path: PurePosixPath) -> Path:
        try:
            real = (self.root / path).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
            raise Unreadable(f"cannot resolve {str(path)!r}: {exc}") from None
        if real != self.real_root and self.real_root not in real.parents:
            raise Unreadable(f"{str(path)!r} leads out of the policy folder")
        return real

    def kind(self, path: PurePosixPath) -> Kind:
        real = self._real(path)
        if real.is_file():
            return "file"
        if real.is_dir():
            return "dir"
        return "missing" if not real.exists() else "other"

    def names(self, path: PurePosixPath) -> list[str]:
        try:
            return [entry.name for entry in self._real(path).iterdir()]
        except OSError as exc:
            raise Unreadable(f"cannot list {str(path)!r}: {exc.strerror}") from None

    def read(self, path: PurePosixPath, limit: int) -> str:
        try:
            with self._real(path).open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise Unreadable(f"cannot read {str(path)!r}: {exc.strerror}") from None
        return _decode(path, data, limit)

    def identity(self, path: PurePosixPath) -> str:
        return str(self._real(path))


class MemoryTree:
    """Files held in memory, by relative path (`30-office.policy`, `include/admin-ro`)."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.files = {str(PurePosixPath(name)): text for name, text in files.items()}

    def kind(self, path: PurePosixPath) -> Kind:
        key = str(path)
        if key in self.files:
            return "file"
        if path == ROOT or any(name.startswith(key + "/") for name in self.files):
            return "dir"
        return "missing"

    def names(self, path: PurePosixPath) -> list[str]:
        prefix = "" if path == ROOT else f"{path}/"
        return sorted(
            {name[len(prefix) :].split("/", 1)[0] for name in self.files if name.startswith(prefix)}
        )

    def read(self, path: PurePosixPath, limit: int) -> str:
        return _decode(path, self.files[str(path)].encode("utf-8", "surrogateescape"), limit)

    def identity(self, path: PurePosixPath) -> str:
        return str(path)


def _decode(path: PurePosixPath, data: bytes, limit: int) -> str:
    if len(data) > limit:
        raise Unreadable(f"{str(path)!r} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"{str(path)!r} is not UTF-8 text (byte {exc.start})") from None


def _c_order(name: str) -> bytes:
    """Sort key of the C locale: the bytes of the name (undecodable ones included)."""
    return name.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """A name from a folder as it can be shown: control characters escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Loader:
    def __init__(self, tree: PolicyTree, *, reserved: str | None) -> None:
        self.tree = tree
        self.reserved = reserved
        self.rules: list[Rule] = []
        self.errors: list[PolicyError] = []
        self.stack: list[tuple[str, str]] = []  # (identity, shown path) of files being read
        self.files_read = 0
        self.bytes_read = 0

    def error(self, file: str, line: int, message: str) -> None:
        self.errors.append(PolicyError(file, line, message))

    # ---- folders and files

    def load_dir(self, path: PurePosixPath, at: tuple[str, int] | None) -> None:
        """A folder's `*.policy` files in C order; `at` is the `!include-dir` line, if any."""
        where, line = at if at is not None else (printable(str(path)), 0)
        try:
            names = self.tree.names(path)
        except Unreadable as exc:
            self.error(where, line, str(exc))
            return
        chosen: list[str] = []
        for name in sorted(names, key=_c_order):
            if not name.endswith(POLICY_SUFFIX) or name.startswith("."):
                continue  # editors' backups and swap files, as Qubes ignores them
            try:
                if self.tree.kind(path / name) != "file":
                    continue
            except Unreadable as exc:
                self.error(*((printable(name), 0) if at is None else (where, line)), str(exc))
                continue
            if not FILE_NAME_RE.fullmatch(name):
                message = "file name has characters other than 0-9, a-z, '_', '.' and '-'"
                if at is None:
                    self.error(printable(name), 0, message)
                else:
                    self.error(where, line, f"{str(path / name)!r}: {message}")
                continue
            if at is None and path == ROOT and name == self.reserved:
                self.error(name, 0, "this name is taken by the spec's inline rules; rename it")
                continue
            chosen.append(name)
        for name in chosen:
            self.load_file(path / name, at, service=None)

    def load_file(
        self,
        path: PurePosixPath,
        at: tuple[str, int] | None,
        *,
        service: tuple[str, str] | None,
    ) -> None:
        shown = printable(str(path))
        where, line = at if at is not None else (shown, 0)
        try:
            identity = self.tree.identity(path)
            if self.tree.kind(path) != "file":
                self.error(where, line, f"{str(path)!r} is not a file")
                return
        except Unreadable as exc:
            self.error(where, line, str(exc))
            return
        chain = [s for _, s in self.stack]
        if any(identity == seen for seen, _ in self.stack):
            self.error(where, line, "include cycle: " + " -> ".join([*chain, shown]))
            return
        if len(self.stack) > MAX_INCLUDE_DEPTH:
            self.error(where, line, f"includes are nested deeper than {MAX_INCLUDE_DEPTH}")
            return
        if self.files_read >= MAX_FILES_READ:
            self.error(where, line, f"more than {MAX_FILES_READ} policy files read")
            return
        try:
            text = self.tree.read(path, MAX_FILE_BYTES)
        except Unreadable as exc:
            self.error(where, line, str(exc))
            return
        self.files_read += 1
        self.bytes_read += len(text.encode("utf-8"))
        if self.bytes_read > MAX_TOTAL_BYTES:
            self.error(where, line, f"policy files read add up to over {MAX_TOTAL_BYTES} bytes")
            return
        self.stack.append((identity, shown))
        try:
            if service is None:
                self.parse_policy_file(text, shown)
            else:
                self.parse_service_file(text, shown, service)
        finally:
            self.stack.pop()

    # ---- lines

    def parse_policy_file(self, text: str, file: str) -> None:
        for number, raw in enumerate(split_lines(text), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("!"):
                self.directive(line.split(), file, number)
                continue
            try:
                rule = parse_line(line, file=file, line=number)
            except PolicySyntaxError as exc:
                self.error(exc.file, exc.line, exc.message)
                continue
            if rule is not None:
                self.rules.append(rule)

    def parse_service_file(self, text: str, file: str, service: tuple[str, str]) -> None:
        """The format of Qubes 4.0 per-service files, which `!include-service` reads."""
        for number, raw in enumerate(split_lines(text), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # Qubes' own substitutions for this format: `$anyvm`, `allow,target=x`.
            line = line.replace("$include:", "!include ").replace("$", "@").replace(",", " ")
            fields = line.split()
            if line.startswith("!"):
                if fields[0] == "!include" and len(fields) == 2:
                    included = self.include_path(fields[1], file, number)
                    if included is not None:
                        self.load_file(included, (file, number), service=service)
                else:
                    self.error(file, number, "a service file allows only !include FILE")
                continue
            if len(fields) < 3:
                self.error(file, number, "expected: source target action [key=value ...]")
                continue
            source, target, action, *params = fields
            try:
                rule = rule_from_fields(
                    *service, source, target, action, params, file=file, line=number
                )
            except PolicySyntaxError as exc:
                self.error(exc.file, exc.line, exc.message)
                continue
            self.rules.append(rule)

    def directive(self, fields: list[str], file: str, line: int) -> None:
        name, *args = fields
        if name in ("!include", "!include-dir"):
            if len(args) != 1:
                self.error(file, line, f"{name} takes one path")
                return
            path = self.include_path(args[0], file, line)
            if path is None:
                return
            if name == "!include":
                self.load_file(path, (file, line), service=None)
                return
            try:
                kind = self.tree.kind(path)
            except Unreadable as exc:
                self.error(file, line, str(exc))
                return
            if kind != "dir":
                self.error(file, line, f"{str(path)!r} is not a folder")
                return
            self.load_dir(path, (file, line))
        elif name == "!include-service":
            if len(args) != 3:
                self.error(file, line, "!include-service takes SERVICE ARGUMENT FILE")
                return
            service, argument, raw_path = args
            problem = service_argument_problem(service, argument)
            if problem:
                self.error(file, line, problem)
                return
            path = self.include_path(raw_path, file, line)
            if path is not None:
                self.load_file(path, (file, line), service=(service, argument))
        elif name == "!compat-4.0":
            self.error(file, line, "!compat-4.0 reads Qubes 4.0 policy files; qnix has none")
        else:
            self.error(
                file,
                line,
                f"unknown directive {name!r}; use !include, !include-dir or !include-service",
            )

    def include_path(self, raw: str, file: str, line: int) -> PurePosixPath | None:
        path = PurePosixPath(raw)
        if path.is_absolute() or ".." in path.parts or "\x00" in raw:
            self.error(
                file,
                line,
                f"{raw!r}: include paths are relative to the policy folder and "
                "stay inside it, such as include/office",
            )
            return None
        return path


def _load(tree: PolicyTree, inline_rules: Sequence[str] | None) -> Policy:
    loader = _Loader(tree, reserved=INLINE_POLICY_FILE if inline_rules is not None else None)
    for number, text in enumerate(inline_rules or (), start=1):
        try:
            rule = parse_line(text, file=INLINE_POLICY_FILE, line=number)
        except PolicySyntaxError as exc:
            loader.error(exc.file, exc.line, exc.message)
            continue
        if rule is not None:
            loader.rules.append(rule)
    loader.load_dir(ROOT, None)
    return Policy(tuple(loader.rules), tuple(loader.errors))


def load_policy_dir(path: Path, *, inline_rules: Sequence[str] | None = None) -> Policy:
    """The policy of a policy.d folder; any error is recorded, never raised.

    `inline_rules` are a spec's own lines: they come first, as the file `00-spec.policy`
    that the build writes, and that name is then not available to a file of the folder.
    """
    if not path.is_dir():
        return Policy((), (PolicyError(str(path), 0, "is not a folder"),))
    return _load(FolderTree(path), inline_rules)


class _RecordingTree:
    """A tree that keeps a copy of every file the loader reads from it."""

    def __init__(self, inner: PolicyTree) -> None:
        self.inner = inner
        self.read_files: dict[str, str] = {}

    def kind(self, path: PurePosixPath) -> Kind:
        return self.inner.kind(path)

    def names(self, path: PurePosixPath) -> list[str]:
        return self.inner.names(path)

    def read(self, path: PurePosixPath, limit: int) -> str:
        text = self.inner.read(path, limit)
        self.read_files[str(path)] = text
        return text

    def identity(self, path: PurePosixPath) -> str:
        return self.inner.identity(path)


def read_policy_tree(
    path: Path, *, inline_rules: Sequence[str] | None = None
) -> tuple[dict[str, str], Policy]:
    """Every file the policy of folder `path` reads — its `*.policy` files and whatever they
    include — by relative path, and the policy. `load_policy_files` of those files gives the
    same policy: what a build copies, so that includes still resolve in the generation."""
    if not path.is_dir():
        return {}, Policy((), (PolicyError(str(path), 0, "is not a folder"),))
    recording = _RecordingTree(FolderTree(path))
    return recording.read_files, _load(recording, inline_rules)


def load_policy_files(
    files: Mapping[str, str], *, inline_rules: Sequence[str] | None = None
) -> Policy:
    """The same as `load_policy_dir`, for files held in memory by relative path."""
    return _load(MemoryTree(files), inline_rules)


def load_spec_policy(loaded: LoadedSpec, *, policy_dir: Path | None = None) -> Policy:
    """A spec's policy: its inline rules, then its policy.d folder (or `policy_dir`)."""
    inline = loaded.workstation.policy.rules
    folder = policy_dir
    if folder is None and loaded.workstation.policy.dir is not None:
        folder = loaded.base_dir / loaded.workstation.policy.dir
    if folder is None:
        return load_policy_files({}, inline_rules=inline)
    return load_policy_dir(folder, inline_rules=inline)
