"""One qnix instance per host network namespace.

Instances with other run roots (or namespace prefixes) still share names on the host: the
`inet qnix` table, the `qx*` links and the routing rules that name them, the routing tables from
ROUTE_TABLE_BASE, the host's IPv4 forwarding. A second instance's `down` or `gc` would remove
the first's, and its `apply` would replace the first's firewall. So the instance that loads the
table marks it as its own in the table's comment, `qnix run root /run/qnix` (with ` netns prefix
P` when the prefix is not the default), and every command that changes the host's network reads
the mark first and refuses when another run root owns the table.

The mark lives in the kernel object, so it is gone with the table (`qnix down`, a reboot) and
nothing stale can lock a host out. A table without a mark (loaded by hand, or by NixOS from the
generated flake) belongs to no instance: the next `apply` marks it.
"""

from __future__ import annotations

import hashlib
import os
import re
import string

from qnix.errors import QnixError
from qnix.runtime.net import HostNetwork
from qnix.runtime.paths import DEFAULT_NETNS_PREFIX, RuntimePaths

OWNER_PREFIX = "qnix run root "
# nft caps a comment at 128 characters and has no escapes inside its quotes.
MAX_COMMENT = 128
_PLAIN = frozenset(string.ascii_letters + string.digits + "/._-+,:@=")
_MARK_RE = re.compile(r"qnix run root (\S+)(?: netns prefix (\S+))?")


def owner_mark(paths: RuntimePaths) -> str:
    """The comment that marks the table as this instance's."""
    prefix = "" if paths.netns_prefix == DEFAULT_NETNS_PREFIX else paths.netns_prefix
    tail = f" netns prefix {prefix}" if prefix else ""
    root = str(paths.run_root)
    if not set(root) <= _PLAIN or len(OWNER_PREFIX + root + tail) > MAX_COMMENT:
        root = "sha256:" + hashlib.sha256(root.encode()).hexdigest()
    return OWNER_PREFIX + root + tail


def _same_run_root(paths: RuntimePaths, owner_root: str) -> bool:
    own = owner_mark(paths).removeprefix(OWNER_PREFIX).split(" ", 1)[0]
    if owner_root == own:
        return True
    try:  # the same folder by another name (/var/run/qnix and /run/qnix)
        return os.path.isabs(owner_root) and os.path.samefile(owner_root, paths.run_root)
    except OSError:
        return False


def marked_by(paths: RuntimePaths, comment: str | None) -> bool:
    """Whether a table's comment is this instance's mark."""
    mark = _MARK_RE.fullmatch(comment or "")
    return mark is not None and _same_run_root(paths, mark.group(1))


def require_host_network(paths: RuntimePaths, net: HostNetwork) -> None:
    """Refuse when the host's network belongs to another qnix instance: call it before
    changing anything there."""
    mark = _MARK_RE.fullmatch(net.table_comment() or "")
    if mark is None or _same_run_root(paths, mark.group(1)):
        return
    owner_root, owner_prefix = mark.group(1), mark.group(2)
    if owner_root.startswith("sha256:"):
        named = f"the one whose run root has the SHA-256 digest {owner_root[7:]}"
        down = "`qnix down --run-root RUN_ROOT` with that instance's run root"
    else:
        named = f"the one with run root {owner_root}"
        env = f"QNIX_NETNS_PREFIX={owner_prefix} " if owner_prefix else ""
        down = f"`{env}qnix down --run-root {owner_root}`"
    raise QnixError(
        f"the host's network belongs to another qnix instance, {named}: this one "
        f"(run root {paths.run_root}) would replace its firewall and remove its links and "
        "routing rules",
        hint=f"one host has one qnix instance: bring that one down first ({down}), "
        "or use its run root",
    )
