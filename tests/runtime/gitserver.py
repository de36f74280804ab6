"""A fleet repository for `qnix pull` tests: an admin's working copy, SSH signing keys made with
ssh-keygen, commits signed (or not) by the real git, and the bare repository served by
`git daemon` on 127.0.0.1 (stopped by `close`)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import need


def ssh_key(folder: Path, name: str) -> tuple[Path, str]:
    """A new ed25519 key: its private file and its allowed_signers line."""
    key = folder / name
    subprocess.run(
        [need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
        check=True,
    )
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    return key, f"{name}@fleet.test {kind} {blob}\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GitServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.served = base / "served"
        self.bare = self.served / "fleet.git"
        self.work = base / "work"
        self.keys = base / "keys"
        self.keys.mkdir(parents=True)
        self.git = need("git")
        self.run("init", "--quiet", "--bare", str(self.bare), cwd=base)
        self.run("init", "--quiet", "-b", "main", str(self.work), cwd=base)
        self.port = free_port()
        self.daemon = subprocess.Popen(
            [
                self.git,
                "daemon",
                f"--base-path={self.served}",
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                f"--port={self.port}",
                str(self.served),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.daemon.poll() is None, "git daemon exited"
            assert time.monotonic() < deadline, "git daemon does not listen"
            time.sleep(0.05)
        self.url = f"git://127.0.0.1:{self.port}/fleet.git"

    def run(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(
            [self.git, *args],
            cwd=cwd or self.work,
            check=True,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.base)},
        ).stdout

    def commit(self, files: dict[str, str], message: str, key: Path | None) -> str:
        """Write `files` into the working copy and commit them, signed with `key` (None: not
        signed); the new commit."""
        for name, text in files.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        self.run("add", "--all")
        identity = ["-c", "user.name=Admin", "-c", "user.email=admin@fleet.test"]
        signing = (
            ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"] if key is not None else []
        )
        self.run(*identity, *signing, "commit", "--quiet", *(["-S"] if key else []), "-m", message)
        return self.head()

    def head(self) -> str:
        return self.run("rev-parse", "HEAD").strip()

    def publish(self, force: bool = False) -> None:
        self.run("push", "--quiet", *(["--force"] if force else []), str(self.bare), "HEAD:main")

    def reset(self, commit: str) -> None:
        """The working copy and the served branch back at `commit` (a force-push)."""
        self.run("reset", "--quiet", "--hard", commit)
        self.publish(force=True)

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(timeout=10)
