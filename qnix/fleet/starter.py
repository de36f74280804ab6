"""`qnix fleet init`: the files of a new fleet repository.

    fleet.toml                   a small inventory: one role, one host
    policy.d/30-fleet.policy     the policy every host shares
    allowed_signers              the admins' keys (empty, or the --signer lines)
    .gitea/workflows/qnix.yml    a Gitea Actions workflow (GitHub Actions syntax): every new
                                 commit signed by a trusted key, then fleet check and build
    hooks/pre-receive            for a plain git server: refuses a push with any commit not
                                 signed by a key its parent's allowed_signers lists
    README.md                    what each file is for

The hook and the workflow apply the rule `qnix pull` applies: a commit is verified against the
allowed signers of the commit before it, so a change of the signers lands only when a key
trusted before it signed it.
"""

from __future__ import annotations

import json
import re

from qnix.errors import QnixError
from qnix.fleet.inventory import FLEET_FILE, SIGNERS_FILE
from qnix.spec.model import HOSTNAME_RE

WORKFLOW = ".gitea/workflows/qnix.yml"
PRE_RECEIVE = "hooks/pre-receive"
POLICY = "policy.d/30-fleet.policy"
README = "README.md"
EXECUTABLE = frozenset({PRE_RECEIVE})

# One allowed_signers line: a principal, a public key's type and its base64, a comment.
SIGNER_RE = re.compile(
    r"[A-Za-z0-9._@+-]+ (ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,3}( [ -~]*)?"
)


def toml_string(text: str) -> str:
    """A TOML basic string whose value is exactly `text`: JSON's escapes (\\", \\\\, \\n,
    \\uXXXX) are TOML's."""
    return json.dumps(text)


def signer_line(line: str) -> str:
    """`line` if it is one allowed_signers entry (PRINCIPAL KEYTYPE BASE64 [COMMENT]); the
    file is made of such lines, so nothing else may reach it."""
    if not SIGNER_RE.fullmatch(line):
        raise QnixError(
            f"not an allowed_signers line: {line!r}",
            'PRINCIPAL ssh-ed25519 AAAA... — e.g. "admin@acme $(cat ~/.ssh/id_ed25519.pub)"',
        )
    return line


def fleet_toml(name: str) -> str:
    if not re.fullmatch(HOSTNAME_RE, name):
        raise QnixError(
            f"{name!r} is not a fleet name", "lower-case letters, digits and '-', like a host name"
        )
    return f"""\
# The fleet's inventory (docs/fleet.md): a role is a fragment of a spec, a host takes roles
# in order, then its overrides.
#   qnix fleet check .                      every host's spec, checked
#   qnix fleet build . -o built --remote URL  the NixOS hosts' flake (colmena, comin)

[fleet]
name = {toml_string(name)}
policy_dir = "policy.d"

[roles.office.compartments.work]
label = "blue"
network = "uplink"
memory_mb = 1024
firewall = [{{ dns = true }}, {{ proto = "tcp", cidr = "0.0.0.0/0", ports = [443] }}]

[hosts.desk-01]
roles = ["office"]
# nixos = false                          # a Debian desk that follows the fleet with qnix pull
# age_key = "age1..."                    # the host's age recipient, for secrets
"""


POLICY_TEXT = """\
# Shared by every host of the fleet; each role's inline rules come first.
# service            argument source       target      action
qnix.Filecopy        *        @anyvm       @anyvm      ask
qnix.Clipboard       *        @anyvm       @anyvm      ask
"""

PRE_RECEIVE_TEXT = """\
#!/bin/sh
# qnix fleet: take only commits signed by a key the fleet trusts.
#
# Install on the git server: copy this file to the bare repository's hooks/pre-receive
# (executable). For the first push to an empty repository, put the admins' allowed_signers
# beside it, checked by other means (as `qnix pull --init` pins it).
#
# Each commit a push brings is verified with `git verify-commit` (SSH signatures) against the
# allowed_signers of its first parent: for the first new commit the branch's old tip, then the
# commit before. A change of the signers lands only when a key trusted before it signed it.
# A first commit (no parent) is verified against the allowed_signers beside this hook, or the
# file QNIX_ROOT_SIGNERS names. Deleting a ref is refused, and so is a force-push: a ref moved
# to a commit that does not have its old one in its history (qnix pull would refuse it too).
#
#   pre-receive                  as git runs it: "OLD NEW REF" lines on stdin
#   pre-receive --range OLD NEW  the same check of OLD..NEW (CI); OLD of zeros: all of NEW
set -eu

zero=0000000000000000000000000000000000000000
here=$(cd "$(dirname "$0")" && pwd)
root_signers=${QNIX_ROOT_SIGNERS:-$here/allowed_signers}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM

refuse() {
    echo "qnix: refused: $*" >&2
    exit 1
}

# verify COMMIT: signed by a key the allowed_signers of its first parent lists.
verify() {
    if parent=$(git rev-parse --verify --quiet "$1^1"); then
        git cat-file blob "$parent:allowed_signers" >"$work/signers" 2>/dev/null ||
            refuse "$1: its parent $parent has no allowed_signers"
    else
        [ -f "$root_signers" ] || refuse "$1 is a first commit and $root_signers is missing"
        cat "$root_signers" >"$work/signers"
    fi
    if ! git -c gpg.format=ssh -c gpg.ssh.allowedSignersFile="$work/signers" \\
        verify-commit "$1" >/dev/null 2>"$work/why"; then
        refuse "$1 is not signed by a key of its parent's allowed_signers" \\
            "($(tail -n 1 "$work/why"))"
    fi
}

# verify_all COMMITS...: each of them.
verify_all() {
    for commit in "$@"; do
        verify "$commit"
    done
}

if [ "${1:-}" = "--range" ]; then
    [ $# -eq 3 ] || refuse "usage: pre-receive --range OLD NEW"
    if [ "$2" = "$zero" ]; then
        commits=$(git rev-list --reverse --topo-order "$3")
    else
        commits=$(git rev-list --reverse --topo-order "$2..$3")
    fi
    # shellcheck disable=SC2086 # one commit id a word
    verify_all $commits
    exit 0
fi

while read -r old new ref; do
    [ "$new" != "$zero" ] || refuse "$ref: deleting a ref is not taken"
    # A rewritten or rewound branch, even one of signed commits only, is not taken: what the
    # desks deployed stays in the history they follow.
    if [ "$old" != "$zero" ] && ! git merge-base --is-ancestor "$old" "$new" 2>/dev/null; then
        refuse "$ref: $new is not a fast-forward of $old (a force-push)"
    fi
    # The commits of NEW the repository does not hold yet (the refs are not updated yet).
    commits=$(git rev-list --reverse --topo-order "$new" --not --all)
    # shellcheck disable=SC2086 # one commit id a word
    verify_all $commits
done
"""

WORKFLOW_TEXT = """\
# Every push and pull request: each new commit signed by a key the fleet trusts (the rule of
# hooks/pre-receive and qnix pull), then `qnix fleet check` and `qnix fleet build`.
# Repository variables: QNIX_PACKAGE, what pip installs qnix from (default: qnix);
# QNIX_FLEET_REMOTE, the URL the NixOS hosts pull the fleet from.
name: qnix

on:
  push:
  pull_request:

jobs:
  fleet:
    runs-on: ubuntu-latest
    steps:
      - name: Check out the whole history
        uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - name: Verify every new commit's signature
        env:
          OLD: ${{ github.event.pull_request.base.sha || github.event.before }}
          NEW: ${{ github.event.pull_request.head.sha || github.sha }}
          QNIX_ROOT_SIGNERS: allowed_signers
        run: sh hooks/pre-receive --range "$OLD" "$NEW"
      - name: Install qnix
        env:
          QNIX_PACKAGE: ${{ vars.QNIX_PACKAGE }}
        run: |
          python3 -m venv "$RUNNER_TEMP/qnix"
          "$RUNNER_TEMP/qnix/bin/pip" install "${QNIX_PACKAGE:-qnix}"
          echo "$RUNNER_TEMP/qnix/bin" >> "$GITHUB_PATH"
      - name: qnix fleet check
        run: qnix fleet check .
      - name: qnix fleet build
        env:
          REMOTE: ${{ vars.QNIX_FLEET_REMOTE }}
        run: >-
          qnix fleet build . -o "$RUNNER_TEMP/built"
          --remote "${REMOTE:?set the repository variable QNIX_FLEET_REMOTE}"
"""

README_TEXT = """\
# A qnix fleet

Every desk of the fleet, described in one repository that only the admins' signed commits
change (qnix: docs/fleet.md).

| file | what it is |
|---|---|
| `fleet.toml` | the inventory: roles (fragments of a spec) and hosts (`qnix fleet check .`) |
| `policy.d/` | the policy every host shares |
| `allowed_signers` | the admins' SSH keys that may sign changes (OpenSSH allowed_signers format) |
| `.gitea/workflows/qnix.yml` | Gitea Actions: signatures, `qnix fleet check`, `qnix fleet build` |
| `hooks/pre-receive` | for a plain git server: refuses a push with a commit no trusted key signed |

Sign every commit with an admin's SSH key:

```sh
git config gpg.format ssh
git config user.signingkey ~/.ssh/id_ed25519.pub
git config commit.gpgsign true
```

A commit is verified against the `allowed_signers` of the commit before it: a new admin's key
is added by a commit an existing admin signs.

On a plain git server, copy `hooks/pre-receive` into the bare repository's `hooks/` (mode
755), with this `allowed_signers` beside it for the first push. On Gitea, set the repository
variables `QNIX_FLEET_REMOTE` (the URL the NixOS desks pull from) and, if qnix is not installed
from PyPI, `QNIX_PACKAGE`.
"""


def starter_files(name: str, signers: tuple[str, ...]) -> dict[str, bytes]:
    """Every file of a new fleet repository, by relative path; EXECUTABLE names those that
    run."""
    lines = "".join(signer_line(line) + "\n" for line in signers)
    texts = {
        FLEET_FILE: fleet_toml(name),
        POLICY: POLICY_TEXT,
        SIGNERS_FILE: lines,
        WORKFLOW: WORKFLOW_TEXT,
        PRE_RECEIVE: PRE_RECEIVE_TEXT,
        README: README_TEXT,
    }
    return {path: text.encode() for path, text in sorted(texts.items())}
