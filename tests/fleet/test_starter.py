"""`qnix fleet init`: a starter repository that `qnix fleet check` and `build` take; its
workflow valid against the GitHub workflow schema (check-jsonschema); its pre-receive hook, in a
real bare repository, refusing an unsigned push, a push signed by an unknown key, a signers
change signed only by the new key and a force-push, each next to the signed push that lands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qnix.errors import QnixError
from qnix.fleet.starter import PRE_RECEIVE, WORKFLOW, signer_line, starter_files
from tests.conftest import DATA, need
from tests.runtime.gitserver import ssh_key

QNIX = str(Path(sys.executable).with_name("qnix"))
# Installed with the test extras, beside this Python (pyproject.toml).
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
WORKFLOW_SCHEMA = DATA / "github-workflow.schema.json"
ZERO = "0" * 40


def qnix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QNIX, *args], capture_output=True, text=True, check=False)


class Fleet:
    """The admins' working copy of a starter repository and a bare repository with the hook."""

    def __init__(self, base: Path, signer: str) -> None:
        self.base = base
        self.work = base / "work"
        self.bare = base / "server.git"
        made = qnix("fleet", "init", str(self.work), "--name", "acme", "--signer", signer.strip())
        assert made.returncode == 0, made.stderr
        self.git("init", "--quiet", "-b", "main", str(self.work))
        self.git("init", "--quiet", "--bare", str(self.bare))
        shutil.copy2(self.work / PRE_RECEIVE, self.bare / "hooks/pre-receive")
        # Pinned for the first push, as qnix pull --init pins it.
        shutil.copy(self.work / "allowed_signers", self.bare / "hooks/allowed_signers")

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [need("git"), *args],
            cwd=self.work if self.work.joinpath(".git").exists() else self.base,
            capture_output=True,
            text=True,
            check=False,
            env={
                "PATH": os.environ["PATH"],
                "HOME": str(self.base),
                "GIT_CONFIG_NOSYSTEM": "1",
            },
        )
        assert not check or done.returncode == 0, done.stderr
        return done

    def commit(self, message: str, key: Path | None, files: dict[str, str] | None = None) -> str:
        for name, text in (files or {"notes.txt": message + "\n"}).items():
            (self.work / name).write_text(text)
        self.git("add", "--all")
        signing = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"] if key else []
        self.git(
            "-c",
            "user.name=Admin",
            "-c",
            "user.email=admin@acme.test",
            *signing,
            "commit",
            "--quiet",
            *(["-S"] if key else ["--no-gpg-sign"]),
            "-m",
            message,
        )
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()

    def push(self) -> subprocess.CompletedProcess[str]:
        return self.git("push", "--quiet", str(self.bare), "HEAD:main", check=False)

    def served(self) -> str:
        done = self.git(
            "--git-dir", str(self.bare), "rev-parse", "--verify", "-q", "main", check=False
        )
        return done.stdout.strip()

    def reset_to_served(self) -> None:
        self.git("reset", "--quiet", "--hard", self.served())


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    folder = tmp_path / "keys"
    folder.mkdir()
    return {name: ssh_key(folder, name) for name in ("admin", "stranger", "newadmin")}


@pytest.fixture
def fleet(tmp_path: Path, keys: dict[str, tuple[Path, str]]) -> Fleet:
    found = Fleet(tmp_path, keys["admin"][1])
    first = found.commit("the starter repository", keys["admin"][0], files={})
    landed = found.push()
    assert landed.returncode == 0, landed.stderr
    assert found.served() == first
    return found


def test_the_starter_repository_is_checked_and_built_by_qnix(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    line = "admin@acme.test ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx0b2tlbi1mb3ItdGVzdHMtb25seQ"
    made = qnix("fleet", "init", str(folder), "--name", "acme", "--signer", line)
    assert made.returncode == 0, made.stderr
    assert made.stdout == f"{folder}: fleet acme, 6 files\n"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        ".gitea/workflows/qnix.yml",
        "README.md",
        "allowed_signers",
        "fleet.toml",
        "hooks/pre-receive",
        "policy.d/30-fleet.policy",
    ]
    assert (folder / "allowed_signers").read_text() == line + "\n"
    assert (folder / "hooks/pre-receive").stat().st_mode & 0o777 == 0o755
    checked = qnix("fleet", "check", str(folder))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == f"{folder}/fleet.toml: ok — fleet acme, 1 hosts"
    built = qnix("fleet", "build", str(folder), "-o", str(tmp_path / "out"), "--remote", "git://x")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "out/hosts/desk-01/flake.nix").is_file()


def test_without_a_signer_the_check_asks_for_one(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    assert qnix("fleet", "init", str(folder)).returncode == 0
    assert (folder / "allowed_signers").read_text() == ""
    checked = qnix("fleet", "check", str(folder))
    assert checked.returncode == 2
    assert "allowed_signers beside it lists no key" in checked.stderr


def test_init_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    folder = tmp_path / "fleet"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep\n")
    refused = qnix("fleet", "init", str(folder))
    assert refused.returncode != 0
    assert f"{folder} is not empty" in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]
    # The control: an empty folder is taken.
    (folder / "mine.txt").unlink()
    assert qnix("fleet", "init", str(folder)).returncode == 0


def test_a_signer_that_is_not_one_allowed_signers_line_is_refused() -> None:
    good = "a@b ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx0 a comment"
    assert signer_line(good) == good
    for bad in (
        "a@b ssh-ed25519 AAAA\nevil ssh-ed25519 BBBB",
        "ssh-ed25519 AAAA",
        "a@b rot13 AAAA",
    ):
        with pytest.raises(QnixError, match="not an allowed_signers line"):
            starter_files("acme", (bad,))
    with pytest.raises(QnixError, match="not a fleet name"):
        starter_files('acme"\n[hosts.evil]', ())


def test_the_workflow_is_valid_against_the_github_workflow_schema(tmp_path: Path) -> None:
    workflow = tmp_path / "qnix.yml"
    workflow.write_bytes(starter_files("acme", ())[WORKFLOW])
    assert CHECK_JSONSCHEMA.is_file(), "pip install -e '.[test]' installs check-jsonschema"
    command = [str(CHECK_JSONSCHEMA), "--schemafile", str(WORKFLOW_SCHEMA)]
    done = subprocess.run([*command, str(workflow)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout
    # The control: the same schema refuses a job with a key the syntax does not have.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        workflow.read_text().replace("    runs-on: ubuntu-latest\n", "    runs-one: x\n")
    )
    done = subprocess.run([*command, str(broken)], capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stdout + done.stderr


def test_an_unsigned_push_is_refused_and_the_signed_one_lands(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    before = fleet.served()
    unsigned = fleet.commit("unsigned", None)
    refused = fleet.push()
    assert refused.returncode != 0
    assert f"qnix: refused: {unsigned} is not signed by a key" in refused.stderr
    assert fleet.served() == before
    fleet.reset_to_served()
    signed = fleet.commit("signed", keys["admin"][0])
    landed = fleet.push()
    assert landed.returncode == 0, landed.stderr
    assert fleet.served() == signed


def test_a_push_signed_by_an_unknown_key_is_refused(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    before = fleet.served()
    strange = fleet.commit("by a stranger", keys["stranger"][0])
    refused = fleet.push()
    assert refused.returncode != 0
    assert f"{strange} is not signed by a key of its parent's allowed_signers" in refused.stderr
    assert fleet.served() == before
    fleet.reset_to_served()
    signed = fleet.commit("by the admin", keys["admin"][0])
    assert fleet.push().returncode == 0
    assert fleet.served() == signed


def test_an_unsigned_commit_under_a_signed_one_refuses_the_whole_push(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    before = fleet.served()
    unsigned = fleet.commit("unsigned", None)
    fleet.commit("signed on top", keys["admin"][0])
    refused = fleet.push()
    assert refused.returncode != 0
    assert f"{unsigned} is not signed" in refused.stderr
    assert fleet.served() == before


def test_a_new_key_signs_only_once_a_trusted_one_signed_it_in(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    admin_key, admin_line = keys["admin"]
    new_key, new_line = keys["newadmin"]
    before = fleet.served()
    # Signed only by the key it adds: refused.
    fleet.commit("add myself", new_key, files={"allowed_signers": admin_line + new_line})
    refused = fleet.push()
    assert refused.returncode != 0
    assert fleet.served() == before
    # Signed in by the admin, then the new key's commit on top: both land in one push.
    fleet.reset_to_served()
    fleet.commit("add newadmin", admin_key, files={"allowed_signers": admin_line + new_line})
    by_new = fleet.commit("by newadmin", new_key)
    landed = fleet.push()
    assert landed.returncode == 0, landed.stderr
    assert fleet.served() == by_new


def test_deleting_the_branch_is_refused(fleet: Fleet) -> None:
    before = fleet.served()
    refused = fleet.git("push", "--quiet", str(fleet.bare), ":main", check=False)
    assert refused.returncode != 0
    assert "refs/heads/main: deleting a ref is not taken" in refused.stderr
    assert fleet.served() == before


def test_a_force_push_is_refused_even_when_every_commit_is_signed(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    admin_key = keys["admin"][0]
    base = fleet.served()
    fleet.commit("a change", admin_key)
    assert fleet.push().returncode == 0
    served = fleet.served()
    # History rewritten: a signed commit beside the served one.
    fleet.git("reset", "--quiet", "--hard", base)
    rewritten = fleet.commit("the change, rewritten", admin_key)
    refused = fleet.git("push", "--quiet", "--force", str(fleet.bare), "HEAD:main", check=False)
    assert refused.returncode != 0
    assert (
        f"qnix: refused: refs/heads/main: {rewritten} is not a fast-forward of {served}"
        " (a force-push)"
    ) in refused.stderr
    assert fleet.served() == served
    # The branch rewound to a commit it had: no new commit to verify, refused all the same.
    rewound = fleet.git("push", "--quiet", "--force", str(fleet.bare), f"{base}:main", check=False)
    assert rewound.returncode != 0
    assert f"refs/heads/main: {base} is not a fast-forward of {served}" in rewound.stderr
    assert fleet.served() == served
    # The control: a signed commit on top of the served one lands.
    fleet.reset_to_served()
    on_top = fleet.commit("on top", admin_key)
    landed = fleet.push()
    assert landed.returncode == 0, landed.stderr
    assert fleet.served() == on_top


def test_a_first_push_needs_the_pinned_signers_beside_the_hook(
    tmp_path: Path, keys: dict[str, tuple[Path, str]]
) -> None:
    found = Fleet(tmp_path, keys["admin"][1])
    (found.bare / "hooks/allowed_signers").unlink()
    first = found.commit("the starter repository", keys["admin"][0], files={})
    refused = found.push()
    assert refused.returncode != 0
    assert f"{first} is a first commit and" in refused.stderr
    assert found.served() == ""
    # The control: with the pinned file, the same push lands.
    shutil.copy(found.work / "allowed_signers", found.bare / "hooks/allowed_signers")
    assert found.push().returncode == 0
    assert found.served() == first


def test_the_range_mode_the_workflow_runs_applies_the_same_rule(
    fleet: Fleet, keys: dict[str, tuple[Path, str]]
) -> None:
    hook = str(fleet.work / PRE_RECEIVE)
    start = fleet.served()
    signed = fleet.commit("signed", keys["admin"][0])
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(fleet.base),
        "QNIX_ROOT_SIGNERS": "allowed_signers",
    }

    def check(old: str, new: str) -> subprocess.CompletedProcess[str]:
        command = [need("sh"), hook, "--range", old, new]
        return subprocess.run(command, cwd=fleet.work, env=env, capture_output=True, text=True)

    assert check(start, signed).returncode == 0
    assert check(ZERO, signed).returncode == 0
    unsigned = fleet.commit("unsigned", None)
    refused = check(start, unsigned)
    assert refused.returncode == 1
    assert f"{unsigned} is not signed" in refused.stderr
