"""Read a spec file into a validated `Workstation`, and the age secrets beside it.

Every problem is reported with the file, the key path (`compartments.work.firewall[2].ports`),
the offending value and a hint. A whole spec — its policy.d folder, the names its policy lines
use, its subnet — is checked by `qnix.compile.inputs.load`, which needs the policy as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydantic

from qnix.errors import Problem, QnixError, SpecError
from qnix.spec.document import parse_document
from qnix.spec.model import Workstation
from qnix.spec.validation import problems_from_validation
from qnix.spec.wording import show

AGE_HEADERS = (b"age-encryption.org/v1\n", b"-----BEGIN AGE ENCRYPTED FILE-----")
MAX_SPEC_BYTES = 16 * 1024 * 1024
MAX_SECRET_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LoadedSpec:
    """A validated workstation with where it came from: the build records both."""

    path: Path
    raw: bytes
    workstation: Workstation
    policy_files: tuple[tuple[str, str], ...]  # (file name, text) from the policy.d folder, sorted
    # (secret name, ciphertext) of each age secret, by name: the build carries them.
    secret_files: tuple[tuple[str, bytes], ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def read_workstation(path: Path) -> tuple[bytes, Workstation]:
    """A spec file's bytes and the workstation they declare; a SpecError names every problem
    of the file itself (its syntax, types and values)."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QnixError(f"cannot read spec {file}: {exc.strerror}", hint="check the path") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([Problem(file, "", f"spec is larger than {MAX_SPEC_BYTES} bytes")])
    data = parse_document(path, raw)
    try:
        workstation = Workstation.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(list(problems_from_validation(file, data, exc))) from None
    return raw, workstation


def read_secret_files(
    base: Path, file: str, workstation: Workstation, missing_ok: bool
) -> tuple[tuple[tuple[str, bytes], ...], list[Problem]]:
    """The ciphertext of every age secret, and what is wrong with any of them."""
    found: list[tuple[str, bytes]] = []
    problems = []
    for name, secret in workstation.secrets.items():
        if secret.file is None:  # a pass secret: its ciphertext is in the password store
            continue
        where = f"secrets.{name}.file"
        target = base / secret.file
        try:
            with target.open("rb") as handle:
                data = handle.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            missing = isinstance(exc, FileNotFoundError | IsADirectoryError)
            if missing and missing_ok:
                continue
            problems.append(
                Problem(
                    file,
                    where,
                    "file not found" if missing else f"cannot read: {exc.strerror}",
                    show(secret.file),
                    f"encrypt it with: qnix secret add {name} --spec {Path(file).name} "
                    "(or age -r RECIPIENT -o FILE)",
                )
            )
            continue
        if not data.startswith(AGE_HEADERS):
            problems.append(
                Problem(
                    file,
                    where,
                    "is not an age-encrypted file",
                    show(secret.file),
                    "a plaintext secret must never sit in the repo; encrypt it with age",
                )
            )
        elif len(data) > MAX_SECRET_BYTES:
            problems.append(
                Problem(file, where, f"is larger than {MAX_SECRET_BYTES} bytes", show(secret.file))
            )
        else:
            found.append((name, data))
    return tuple(found), problems
