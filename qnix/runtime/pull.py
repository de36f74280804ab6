"""`qnix pull`: this host follows a fleet repository, taking only changes its admins signed,
and goes back to the last good generation when a change breaks it.

One pull:

1. fetch the branch into a bare repository under the state root (`STATE_ROOT/pull/repo.git`);
2. refuse a tip that is not a fast-forward of the last deployed commit (a force-push);
3. verify every new commit, oldest first, with `git verify-commit` against the allowed signers
   the host trusts: those pinned by `qnix pull --init`, then those of the last commit verified.
   A commit that changes `allowed_signers` must itself be signed by a key trusted before it,
   so a new key is trusted only once an old one has signed it in;
4. resolve this host's spec from the fleet file of the tip (qnix.fleet) and apply it;
5. check the host's health: `qnix drift` finds nothing (autostart compartments running
   included);
6. on success keep the tip as the deployed commit, with the signers it trusts and the
   generation it brought, in one file written atomically (`STATE_ROOT/pull/trust.json`); on
   a failure of 4 or 5 apply the deployed commit's spec again (the last good generation),
   check it the same way, and keep the trust file as it was.

Nothing fetched is used before it is verified: the files of a commit are read only once every
commit up to it has passed. A SIGKILL anywhere leaves the trust file old or new; the next
pull brings the host to the generation that file's commit (or a newer verified one) names.
Each outcome is an audit entry (`pull.rejected`, `pull.applied`, `pull.rolled-back`, with the
commit and the reason), `STATE_ROOT/pull/status.json` and a Prometheus text file
`STATE_ROOT/pull/metrics.prom` (docs/fleet.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qnix.audit import events
from qnix.compile.artifacts import MANIFEST
from qnix.errors import QnixError
from qnix.fleet.inventory import FLEET_FILE, SIGNERS_FILE, host_spec, read_fleet
from qnix.runner import Result, require_tool, run
from qnix.runtime import drift, reconcile
from qnix.runtime.files import atomic_write
from qnix.runtime.paths import RuntimePaths
from qnix.spec.model import HOSTNAME_RE

GIT_TIMEOUT = 300.0
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
BRANCH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")
FETCHED_REF = "refs/qnix/fetched"
DEPLOYED_REF = "refs/qnix/deployed"  # keeps the deployed commit's objects in the repository


@dataclass(frozen=True, slots=True)
class PullFiles:
    folder: Path

    @classmethod
    def of(cls, paths: RuntimePaths) -> PullFiles:
        return cls(paths.state_root / "pull")

    @property
    def config(self) -> Path:
        return self.folder / "config.json"

    @property
    def trust(self) -> Path:
        return self.folder / "trust.json"

    @property
    def repository(self) -> Path:
        return self.folder / "repo.git"

    @property
    def status(self) -> Path:
        return self.folder / "status.json"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.prom"

    @property
    def lock(self) -> Path:
        return self.folder / "lock"


@dataclass(frozen=True, slots=True)
class PullConfig:
    url: str
    host: str
    branch: str


@dataclass(frozen=True, slots=True)
class Trust:
    """What the host trusts: the signers, and the commit (and its generation) last deployed."""

    allowed_signers: str
    commit: str | None
    generation: str | None


@dataclass(frozen=True, slots=True)
class PullResult:
    outcome: str  # applied, rejected, rolled-back, up-to-date
    commit: str
    deployed: str | None
    reason: str = ""
    changes: tuple[str, ...] = ()


class Refused(Exception):
    """A fetched change the host does not take: its reason."""


def init(paths: RuntimePaths, url: str, host: str, branch: str, signers: Path) -> None:
    """Set the host up to follow `url`'s `branch` as fleet host `host`, trusting the keys of
    the allowed signers file `signers` (OpenSSH format) from now on."""
    files = PullFiles.of(paths)
    if not re.fullmatch(HOSTNAME_RE, host):
        raise QnixError(f"{host!r} is not a host name", hint="the host's name in fleet.toml")
    if not BRANCH_RE.fullmatch(branch) or ".." in branch:
        raise QnixError(f"{branch!r} is not a branch name", hint="such as main")
    if files.trust.exists():
        raise QnixError(
            f"this host already follows a fleet repository ({files.config})",
            hint=f"to start again, remove {files.folder} first",
        )
    try:
        text = signers.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QnixError(f"cannot read the allowed signers file {signers}: {exc}") from None
    if not any(line.strip() and not line.startswith("#") for line in text.splitlines()):
        raise QnixError(f"{signers} lists no key", hint="PRINCIPAL ssh-ed25519 AAAA... per line")
    files.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (files.repository / "HEAD").exists():
        _git(files, "init", "--quiet", "--bare", str(files.repository), bare=False)
    config = {"url": url, "host": host, "branch": branch}
    atomic_write(files.config, (json.dumps(config, indent=2) + "\n").encode(), 0o600)
    _write_trust(files, Trust(text, None, None))
    events.record(paths, "pull.init", url=url, host=host, branch=branch)


def read_config(files: PullFiles) -> PullConfig:
    data = _read_json(files.config)
    if data is None:
        raise QnixError(
            "this host follows no fleet repository",
            hint="set it up once: qnix pull --init URL --host NAME --signers FILE",
        )
    try:
        return PullConfig(str(data["url"]), str(data["host"]), str(data["branch"]))
    except KeyError as exc:
        raise QnixError(
            f"{files.config} has no {exc}", hint="qnix pull --init sets it up"
        ) from None


def read_trust(files: PullFiles) -> Trust:
    data = _read_json(files.trust)
    if data is None:
        raise QnixError(f"{files.trust} is missing", hint="qnix pull --init sets it up")
    try:
        return Trust(str(data["allowed_signers"]), data["commit"], data["generation"])
    except KeyError as exc:
        raise QnixError(f"{files.trust} has no {exc}", hint="qnix pull --init sets it up") from None


def pull(paths: RuntimePaths) -> PullResult:
    """One pull (module docstring); the result says what happened. A change refused or rolled
    back is not an error of the pull: its result and the audit log say so."""
    files = PullFiles.of(paths)
    config = read_config(files)
    with _pull_lock(files):
        for left in (*files.folder.glob(".tree-*"), *files.folder.glob(".verify-*")):
            shutil.rmtree(left, ignore_errors=True)  # of a pull killed while it used them
        trust = read_trust(files)
        state = _read_json(files.status) or {}
        # A pull killed halfway (or a hand-made change) can leave the host off the deployed
        # generation: back to it first, whatever is fetched next.
        off = _off_deployed(paths, trust)
        if off is not None:
            state = _report_back(paths, files, config, state, trust, trust.commit or "", off)
        try:
            tip = _fetch(files, config)
        except QnixError as exc:
            _report(files, config, state, PullResult("fetch-failed", "", trust.commit, exc.message))
            raise
        if tip == trust.commit:
            result = PullResult("up-to-date", tip, trust.commit)
            _report(files, config, state, result)
            return result
        try:
            signers = _verify(files, trust, tip)
        except Refused as exc:
            result = PullResult("rejected", tip, trust.commit, str(exc))
            events.record(
                paths, "pull.rejected", commit=tip, deployed=trust.commit, reason=str(exc)
            )
            _report(files, config, state, result)
            return result
        try:
            generation, changes = _deploy(paths, files, config, tip)
        except (QnixError, OSError, ValueError) as exc:  # anything: the deployed one is back
            reason = exc.message if isinstance(exc, QnixError) else f"{type(exc).__name__}: {exc}"
            _report_back(paths, files, config, state, trust, tip, reason)
            return PullResult("rolled-back", tip, trust.commit, reason)
        _git(files, "update-ref", DEPLOYED_REF, tip)
        _write_trust(files, Trust(signers, tip, generation))
        result = PullResult("applied", tip, tip, "", tuple(changes))
        events.record(paths, "pull.applied", commit=tip, generation=generation)
        _report(files, config, state, result)
        return result


def _off_deployed(paths: RuntimePaths, trust: Trust) -> str | None:
    """Why the host is not at the deployed generation, or None when it is."""
    if trust.commit is None:
        return None
    for folder in (paths.generation_dir, paths.installed_dir):
        try:
            manifest = json.loads((folder / MANIFEST).read_bytes())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("generation") != trust.generation:
            return f"the host is not at the deployed generation ({folder} differs)"
    found = drift.drift(paths)
    if found:
        return f"the host is not at the deployed generation: {found[0].render()}"
    return None


def _report_back(
    paths: RuntimePaths,
    files: PullFiles,
    config: PullConfig,
    state: Mapping[str, Any],
    trust: Trust,
    commit: str,
    reason: str,
) -> dict[str, Any]:
    """The deployed generation applied again, recorded; the status written."""
    result = PullResult("rolled-back", commit, trust.commit, reason)
    try:
        _roll_back(paths, files, config, trust)
    except QnixError as failed:
        events.record(
            paths,
            "pull.rolled-back",
            commit=commit,
            deployed=trust.commit,
            reason=reason,
            result=f"error: {failed.message}",
        )
        _report(files, config, state, result)
        raise
    events.record(paths, "pull.rolled-back", commit=commit, deployed=trust.commit, reason=reason)
    return _report(files, config, state, result)


# ---- git --------------------------------------------------------------------------------------


def _git(
    files: PullFiles, *args: str, bare: bool = True, env: Mapping[str, str] | None = None
) -> str:
    return _git_result(files, *args, bare=bare, env=env, check=True).stdout


def _git_result(
    files: PullFiles,
    *args: str,
    bare: bool = True,
    env: Mapping[str, str] | None = None,
    check: bool = False,
) -> Result:
    git = require_tool("git", "git")
    where = ["--git-dir", str(files.repository)] if bare else []
    # No configuration of the user's or the system's: only what is given here counts.
    clean = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(files.folder),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
        **(env or {}),
    }
    return run([git, *where, *args], timeout=GIT_TIMEOUT, env=clean, check=check)


def _fetch(files: PullFiles, config: PullConfig) -> str:
    """The branch's tip, fetched (forced: whether to take it is decided after)."""
    _git(
        files,
        "fetch",
        "--quiet",
        "--no-tags",
        "--",
        config.url,
        f"+refs/heads/{config.branch}:{FETCHED_REF}",
    )
    tip = _git(files, "rev-parse", "--verify", f"{FETCHED_REF}^{{commit}}").strip()
    if not COMMIT_RE.fullmatch(tip):
        raise QnixError(f"git rev-parse gave no commit: {tip!r}")
    return tip


def _verify(files: PullFiles, trust: Trust, tip: str) -> str:
    """Every commit new since the deployed one, oldest first, signed by a key trusted at that
    point; the allowed signers trusted after `tip`. Refused: the reason."""
    if trust.commit is not None:
        ancestor = _git_result(files, "merge-base", "--is-ancestor", trust.commit, tip)
        if ancestor.returncode != 0:
            raise Refused(f"{tip} is not a fast-forward of the deployed commit {trust.commit}")
    span = tip if trust.commit is None else f"{trust.commit}..{tip}"
    commits = _git(files, "rev-list", "--reverse", "--topo-order", span).split()
    signers = trust.allowed_signers
    with tempfile.TemporaryDirectory(dir=files.folder, prefix=".verify-") as scratch:
        signers_file = Path(scratch) / "allowed_signers"
        for commit in commits:
            signers_file.write_text(signers, encoding="utf-8")
            checked = _git_result(
                files,
                "-c",
                "gpg.format=ssh",
                "-c",
                f"gpg.ssh.allowedSignersFile={signers_file}",
                "verify-commit",
                commit,
            )
            if checked.returncode != 0:
                why = checked.stderr.strip().splitlines()
                raise Refused(
                    f"commit {commit} is not signed by an allowed signer"
                    + (f" ({why[-1]})" if why else " (no signature)")
                )
            listed = _file_at(files, commit, SIGNERS_FILE)
            if listed is None:
                raise Refused(f"commit {commit} removes {SIGNERS_FILE}")
            signers = listed  # signed by a key trusted before: its signers are trusted now
    return signers


def _file_at(files: PullFiles, commit: str, name: str) -> str | None:
    found = _git_result(files, "cat-file", "blob", f"{commit}:{name}")
    return found.stdout if found.returncode == 0 else None


@contextlib.contextmanager
def _checkout(files: PullFiles, commit: str) -> Iterator[Path]:
    """The files of `commit` in a fresh folder (a verified commit only)."""
    with tempfile.TemporaryDirectory(dir=files.folder, prefix=".tree-") as scratch:
        tree = Path(scratch) / "tree"
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        _git(files, "read-tree", commit, env=index)
        tree.mkdir()
        _git(files, "--work-tree", str(tree), "checkout-index", "--all", env=index)
        yield tree


# ---- applying and going back ------------------------------------------------------------------


def _deploy(
    paths: RuntimePaths, files: PullFiles, config: PullConfig, commit: str
) -> tuple[str, list[str]]:
    """The host brought to its spec at `commit` and found healthy: the generation."""
    with _checkout(files, commit) as tree:
        loaded = host_spec(read_fleet(tree / FLEET_FILE), config.host)
        result = reconcile.apply(paths, loaded)
    found = drift.drift(paths)
    if found:
        shown = "; ".join(difference.render() for difference in found[:3])
        raise QnixError(f"health check: {len(found)} difference(s) from the generation: {shown}")
    return result.generation, list(result.changes)


def _roll_back(paths: RuntimePaths, files: PullFiles, config: PullConfig, trust: Trust) -> None:
    """The deployed commit's generation applied again; with none deployed yet, qnix taken
    off the host (what it was before the first pull brought anything)."""
    if trust.commit is None:
        reconcile.down(paths)
        return
    generation, _ = _deploy(paths, files, config, trust.commit)
    if generation != trust.generation:
        raise QnixError(
            f"rolling back to {trust.commit} gave generation {generation}, "
            f"not the deployed {trust.generation}"
        )


# ---- state files ------------------------------------------------------------------------------


@contextlib.contextmanager
def _pull_lock(files: PullFiles) -> Iterator[None]:
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise QnixError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise QnixError(f"{path} is not a JSON object")
    return data


def _write_trust(files: PullFiles, trust: Trust) -> None:
    body = {
        "allowed_signers": trust.allowed_signers,
        "commit": trust.commit,
        "generation": trust.generation,
    }
    atomic_write(files.trust, (json.dumps(body, indent=2) + "\n").encode(), 0o600)


def _report(
    files: PullFiles, config: PullConfig, before: Mapping[str, Any], result: PullResult
) -> dict[str, Any]:
    """status.json and metrics.prom, after each pull."""
    counts = dict(before.get("counts") or {})
    counts[result.outcome] = int(counts.get(result.outcome, 0)) + 1
    status = {
        "host": config.host,
        "url": config.url,
        "branch": config.branch,
        "time": int(time.time()),
        "outcome": result.outcome,
        "commit": result.commit,
        "deployed": result.deployed,
        "reason": result.reason,
        "counts": counts,
    }
    atomic_write(files.status, (json.dumps(status, indent=2) + "\n").encode())
    atomic_write(files.metrics, metrics_text(status).encode())
    return status


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(status: Mapping[str, Any]) -> str:
    """Prometheus text format, the meanings of comin's metrics under qnix_pull_ names:
    deployment_info{commit_id,status} (done | failed) is 1 for the deployed commit;
    fetch_count{remote_name,status} (succeeded | failed) counts fetches; and last_* 0/1."""
    counts: Mapping[str, int] = status.get("counts") or {}
    outcome = status["outcome"]
    failed_fetches = int(counts.get("fetch-failed", 0))
    fetched = sum(int(n) for o, n in counts.items() if o != "fetch-failed")
    deployment_status = "failed" if outcome == "rolled-back" else "done"
    remote = _label(status["url"])
    lines = [
        "# HELP qnix_pull_deployment_info The deployed commit and how the last pull ended.",
        "# TYPE qnix_pull_deployment_info gauge",
        f'qnix_pull_deployment_info{{commit_id="{_label(status["deployed"] or "")}",'
        f'status="{deployment_status}"}} 1',
        "# HELP qnix_pull_fetch_count Fetches of the fleet repository, by result.",
        "# TYPE qnix_pull_fetch_count counter",
        f'qnix_pull_fetch_count{{remote_name="{remote}",status="succeeded"}} {fetched}',
        f'qnix_pull_fetch_count{{remote_name="{remote}",status="failed"}} {failed_fetches}',
        "# HELP qnix_pull_last_fetch_failed Whether the last fetch failed.",
        "# TYPE qnix_pull_last_fetch_failed gauge",
        f"qnix_pull_last_fetch_failed {int(outcome == 'fetch-failed')}",
        "# HELP qnix_pull_last_deployment_failed Whether the last change fetched was rolled back.",
        "# TYPE qnix_pull_last_deployment_failed gauge",
        f"qnix_pull_last_deployment_failed {int(outcome == 'rolled-back')}",
        "# HELP qnix_pull_last_rejected Whether the last change fetched was refused unverified.",
        "# TYPE qnix_pull_last_rejected gauge",
        f"qnix_pull_last_rejected {int(outcome == 'rejected')}",
        "# HELP qnix_pull_last_run_timestamp_seconds When the last pull ended.",
        "# TYPE qnix_pull_last_run_timestamp_seconds gauge",
        f"qnix_pull_last_run_timestamp_seconds {status['time']}",
    ]
    return "\n".join(lines) + "\n"
