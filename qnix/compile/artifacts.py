"""A validated spec to Artifacts: every file of the flake as bytes, plus manifest.json.

Pure and deterministic: the same spec (in any order of its compartments and keys) gives
byte-identical Artifacts. The generation is named by the hash of its manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import MappingProxyType

from qnix import __version__
from qnix.compile import nft, openings
from qnix.compile.nix.flake import render_nix_files
from qnix.compile.nix.modules import secret_file
from qnix.compile.overlay import overlay_files
from qnix.compile.policy import policy_files
from qnix.compile.rsyslog import AUDIT_LOG, rsyslog_config
from qnix.spec.load import LoadedSpec
from qnix.spec.model import Workstation

# The host's rsyslog drop-in that forwards the audit log (when the spec names a server).
RSYSLOG_CONF = "rsyslog/qnix.conf"

MANIFEST = "manifest.json"
SPEC_COPY = "spec.json"
RULESET = "nftables/qnix.nft"


@dataclass(frozen=True, slots=True)
class Artifacts:
    files: Mapping[str, bytes]

    @property
    def manifest(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.files[MANIFEST])
        return parsed

    @property
    def generation(self) -> str:
        return str(self.manifest["generation"])


def checked_artifacts(files: Mapping[str, bytes]) -> Artifacts:
    """Artifacts read back from a folder, if they are whole: every file the manifest lists
    with its hash, no other, and the generation named by them; ValueError names the first
    difference."""
    try:
        manifest = json.loads(files[MANIFEST])
        hashes = manifest["files"]
        generation = manifest["generation"]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{MANIFEST} is missing or unreadable") from None
    if not isinstance(hashes, dict):
        raise ValueError(f"{MANIFEST} lists no files")
    for path in sorted(set(files) - {MANIFEST} | set(hashes)):
        if path not in files:
            raise ValueError(f"{path} is missing")
        if path not in hashes:
            raise ValueError(f"{path} is not in {MANIFEST}")
        if sha256(files[path]) != hashes[path]:
            raise ValueError(f"{path} differs from its hash in {MANIFEST}")
    if generation != sha256(json.dumps(hashes, sort_keys=True).encode()):
        raise ValueError(f"the generation in {MANIFEST} is not the hash of its files")
    return Artifacts(MappingProxyType(dict(sorted(files.items()))))


def listed_files(manifest: bytes) -> tuple[str, ...]:
    """The files a manifest lists, each a plain relative path (never absolute, never `.` or
    `..`), so that they can be read from any folder that holds a generation; ValueError
    otherwise."""
    try:
        hashes = json.loads(manifest)["files"]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{MANIFEST} is missing or unreadable") from None
    if not isinstance(hashes, dict):
        raise ValueError(f"{MANIFEST} lists no files")
    for path in hashes:
        parts = PurePosixPath(path).parts
        if path != str(PurePosixPath(path)) or not parts or parts[0] == "/" or ".." in parts:
            raise ValueError(f"{MANIFEST} lists {path!r}, not a path inside the generation")
    return tuple(sorted(hashes))


def canonical_spec(ws: Workstation) -> bytes:
    """The validated spec as canonical JSON: what the build (and its hash) depends on."""
    return (json.dumps(ws.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_spec(loaded: LoadedSpec) -> Artifacts:
    ws = loaded.workstation
    texts: dict[str, str] = {}
    # The policy's qnix.Net openings go into the one table both outputs share.
    opened = openings.for_spec(loaded).openings
    texts.update(render_nix_files(ws, nft.render_table_body(ws, opened)))
    texts[RULESET] = nft.render_ruleset(ws, opened)
    texts.update(policy_files(ws.policy.rules, loaded.policy_files))
    texts.update(overlay_files(ws))
    forwarding = rsyslog_config(ws, AUDIT_LOG)
    if forwarding:
        texts[RSYSLOG_CONF] = forwarding
    files = {path: text.encode() for path, text in texts.items()}
    # The age ciphertexts, unchanged: the flake's secrets module and the runtime decrypt them.
    files.update({secret_file(name): data for name, data in loaded.secret_files})
    spec = canonical_spec(ws)
    files[SPEC_COPY] = spec
    hashes = {path: sha256(data) for path, data in sorted(files.items())}
    manifest: dict[str, object] = {
        "qnix_version": __version__,
        "hostname": ws.host.hostname,
        "spec_sha256": sha256(spec),
        "files": hashes,
        # The generation is named by everything it contains.
        "generation": sha256(json.dumps(hashes, sort_keys=True).encode()),
    }
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return Artifacts(MappingProxyType(dict(sorted(files.items()))))
