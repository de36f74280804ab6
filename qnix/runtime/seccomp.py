"""The seccomp filter every namespace compartment runs under, compiled with libseccomp.

Default allow, with a list of refusals: the filter removes kernel interfaces a desktop
compartment never needs and that are a well-trodden way out of a sandbox or into the kernel
(KSPP and Docker's default profile are the references). A refused call fails with EPERM, the
answer programs already expect from an unprivileged process, so they degrade instead of crash.

Decisions, each checked by tests/isolation:

* Foreign ABIs are refused entirely: only the native architecture is in the filter, so a
  32-bit (ia32 `int 0x80`) or x32 call from an x86_64 compartment kills the process. Adding the
  compat architecture with the same rules would work too, but every rule would then have to be
  right twice; a desktop compartment has no 32-bit programs to run.
* ptrace is allowed: debuggers inside a compartment work, and processes outside it are out of
  reach anyway, because the pid namespace gives them no pid to name and the user namespace
  gives the compartment no capability over them.
* sethostname/setdomainname, chroot, unshare and setns are not listed: the uts namespace, the
  dropped capabilities and bubblewrap's --disable-userns already stop them, and keeping them out
  of the filter lets each of those layers be shown to work on its own.
* bubblewrap loads the filter just before it executes the compartment's first program, so
  bubblewrap's own setup (mount, pivot_root, ...) is not constrained by it.
"""

from __future__ import annotations

import errno
import functools
import os
import termios
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where the filter is built: its import runs ldconfig twice
    import pyseccomp

# Grouped by what they reach; every name must be known to libseccomp (a test checks it).
# Names that do not exist on the running architecture are accepted and have no effect.
DENIED_SYSCALLS: tuple[str, ...] = (
    # loading or replacing kernel code, rebooting
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    # large kernel attack surfaces a compartment has no use for
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # kernel keyrings are not namespaced: keys would be shared with the host
    "keyctl",
    "add_key",
    "request_key",
    # file handles open files by inode, around every mount ("shocker")
    "open_by_handle_at",
    "name_to_handle_at",
    # the mount table, old and new API
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # host administration
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "nfsservctl",
    "lookup_dcookie",
    "uselib",
    "_sysctl",
    # hardware access
    "iopl",
    "ioperm",
    "pciconfig_iobase",
    "pciconfig_read",
    "pciconfig_write",
    "vm86",
    "vm86old",
    # the clock is the host's
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
)

# ioctl requests refused on every file descriptor: both push input into a terminal, so a
# compartment sharing one could type commands into the shell that started it.
DENIED_IOCTLS: tuple[tuple[str, int], ...] = (
    ("TIOCSTI", termios.TIOCSTI),
    ("TIOCLINUX", termios.TIOCLINUX),
)

# personality() values a compartment may set (Docker's list): plain Linux, 32-bit uname,
# the 2.6 uname emulation, both, and 0xffffffff which only reads the current value. Everything
# else is refused, first of all ADDR_NO_RANDOMIZE, which turns address randomization off.
PERSONALITY_QUERY = 0xFFFFFFFF
SAFE_PERSONALITIES: tuple[int, ...] = (0x0, 0x8, 0x20000, 0x20008, PERSONALITY_QUERY)

_TOP_BIT = 1 << 31


def personality_allowed(persona: int) -> bool:
    """Whether the filter lets personality(persona) through; persona is the raw 64-bit register."""
    return persona in SAFE_PERSONALITIES


def _add_personality_rules(filt: pyseccomp.SyscallFilter, refusal: int) -> None:
    """Refuse every personality value outside SAFE_PERSONALITIES.

    libseccomp compares one argument once per rule and rules are OR-ed, so the allow-list is
    spelled as the refusals that together cover its complement:
    a value above 32 bits; a flag bit outside the safe ones while the top bit is clear; the top
    bit set while any other bit is clear (so of the values with the top bit only the query stays).
    """
    safe_bits = 0
    for value in SAFE_PERSONALITIES:
        if value != PERSONALITY_QUERY:
            safe_bits |= value
    import pyseccomp

    filt.add_rule(refusal, "personality", pyseccomp.Arg(0, pyseccomp.GT, 0xFFFFFFFF))
    for bit in range(31):
        flag = 1 << bit
        mask = _TOP_BIT | flag
        if not safe_bits & flag:
            filt.add_rule(refusal, "personality", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, mask, flag))
        filt.add_rule(refusal, "personality", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, mask, _TOP_BIT))


def _build() -> pyseccomp.SyscallFilter:
    import pyseccomp

    refusal = pyseccomp.ERRNO(errno.EPERM)
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # A call made through another architecture's ABI ends the process (the module docstring).
    filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for name in DENIED_SYSCALLS:
        filt.add_rule(refusal, name)
    for _name, request in DENIED_IOCTLS:
        # The request is an int in the kernel: compare the low 32 bits only, so garbage in the
        # upper half of the register cannot slip a refused request past the filter.
        filt.add_rule(refusal, "ioctl", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, 0xFFFFFFFF, request))
    _add_personality_rules(filt, refusal)
    return filt


def _export(kind: str) -> bytes:
    filt = _build()
    fd = os.memfd_create(f"qnix-seccomp-{kind}", os.MFD_CLOEXEC)
    with open(fd, "r+b") as handle:
        if kind == "bpf":
            filt.export_bpf(handle)
        else:
            filt.export_pfc(handle)
        handle.seek(0)
        return handle.read()


@functools.lru_cache(maxsize=1)
def compartment_filter_bpf() -> bytes:
    """The filter as a classic BPF program (struct sock_filter[]) for the native architecture,
    in the form bubblewrap's --seccomp reads."""
    return _export("bpf")


def compartment_filter_text() -> str:
    """libseccomp's readable pseudo-code of the same filter, for review and debugging."""
    return _export("pfc").decode()
