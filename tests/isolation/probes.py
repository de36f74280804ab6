"""Programs the isolation tests run inside a compartment, as Python source for `python -c`.

Each probe prints one JSON document on stdout. An attempt's outcome is "ok" or the name of the
errno it failed with (EPERM, ENOENT, ...). Probes use the standard library only (ctypes for raw
system calls), so the interpreter's own prefix is all they need inside. Parameters are embedded
with json.dumps, never by formatting untrusted text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

PRELUDE = r"""
import ctypes, errno, fcntl, json, os, socket, struct, sys, termios
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def name_of(number):
    return errno.errorcode.get(number, str(number))

def sc(number, *args):
    # Every integer as a full 64-bit register: a variadic C call would pass a plain int as 32 bits.
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = libc.syscall(ctypes.c_long(number), *converted)
    if result == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result

def attempt(action):
    try:
        action()
    except OSError as exc:
        return name_of(exc.errno)
    return "ok"

def report(value):
    sys.stdout.write(json.dumps(value))
    sys.stdout.flush()
"""


def _program(body: str, **params: object) -> str:
    assignments = "".join(
        f"{key} = json.loads({json.dumps(json.dumps(value))})\n" for key, value in params.items()
    )
    return PRELUDE + assignments + body


# ---- seccomp layer ------------------------------------------------------------------------------

# Each attempt does what an attacker would, with arguments chosen so that where it reaches the
# kernel it can do no harm to the host: kexec with too many segments, reboot with a wrong magic,
# swapon on a file that does not exist, a clock that cannot be set, iopl level 4. Mount-like
# attempts only touch the sandbox's own mount namespace, acct its own pid namespace.
# `NR` maps syscall names to the native numbers (resolved by the test with libseccomp).
SYSCALL_ATTEMPTS_BODY = r"""
AT_FDCWD = -100
CLONE = 1  # OPEN_TREE_CLONE
results = {}

def run(name, action):
    results[name] = attempt(action)

run("kexec_load", lambda: sc(NR["kexec_load"], 0, 17, 0, 0))
run("kexec_file_load", lambda: sc(NR["kexec_file_load"], -1, -1, 0, 0, 0x80000000))
run("init_module", lambda: sc(NR["init_module"], 0, 0, ctypes.c_char_p(b"")))
run("finit_module", lambda: sc(NR["finit_module"], -1, ctypes.c_char_p(b""), 0))
def delete_module():
    sc(NR["delete_module"], ctypes.c_char_p(b"qnix_probe_absent"), os.O_NONBLOCK)
run("delete_module", delete_module)

def bpf_map():
    # BPF_MAP_CREATE of a one-slot array: a real kernel object, harmless.
    attr = ctypes.create_string_buffer(struct.pack("=IIII", 2, 4, 4, 1), 72)
    sc(NR["bpf"], 0, attr, 72)
run("bpf", bpf_map)

def perf_self():
    # A software clock counting this process in user space only (allowed at paranoid <= 2).
    attr = ctypes.create_string_buffer(struct.pack("=IIQQQQQ", 1, 64, 0, 0, 0, 0, 1 | 32 | 64), 64)
    sc(NR["perf_event_open"], attr, 0, -1, -1, 0)
run("perf_event_open", perf_self)

run("userfaultfd", lambda: sc(NR["userfaultfd"], 1 | os.O_CLOEXEC))  # UFFD_USER_MODE_ONLY
run("keyctl", lambda: sc(NR["keyctl"], 0, -3, 0))  # KEYCTL_GET_KEYRING_ID of the session keyring

def add_key():
    kind, description, payload = (ctypes.c_char_p(v) for v in (b"user", b"qnix-probe", b"x"))
    sc(NR["add_key"], kind, description, payload, 1, -2)  # into the process keyring
run("add_key", add_key)

def request_key():
    attempt(add_key)
    sc(NR["request_key"], ctypes.c_char_p(b"user"), ctypes.c_char_p(b"qnix-probe"), None, 0)
run("request_key", request_key)

handle = ctypes.create_string_buffer(struct.pack("=Ii", 128, 0), 8 + 128)
mount_id = ctypes.c_int()
def to_handle():
    sc(NR["name_to_handle_at"], AT_FDCWD, ctypes.c_char_p(b"/"), handle, ctypes.byref(mount_id), 0)
run("name_to_handle_at", to_handle)

def by_handle():
    # "shocker": open a file by its handle, around every mount the sandbox has.
    root = os.open("/", os.O_RDONLY)
    sc(NR["open_by_handle_at"], root, handle, os.O_RDONLY)
run("open_by_handle_at", by_handle)

def mount():
    source, target, kind = (ctypes.c_char_p(v) for v in (b"none", b"/tmp", b"tmpfs"))
    sc(NR["mount"], source, target, kind, 0, None)
run("mount", mount)
run("umount2", lambda: sc(NR["umount2"], ctypes.c_char_p(b"/var/tmp"), 2))  # MNT_DETACH
absent = ctypes.c_char_p(b"/qnix-absent")

def pivot_root():
    # In a child with a mount namespace of its own where it can make one, so the probe keeps
    # its root: the new root is the sandbox's /tmp.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc.unshare(0x00020000)  # CLONE_NEWNS; refused without capabilities, which is fine
        os.chdir("/tmp")
        code = 0
        try:
            sc(NR["pivot_root"], ctypes.c_char_p(b"."), ctypes.c_char_p(b"."))
        except OSError as exc:
            code = exc.errno
        os.write(write_end, bytes([code]))
        os._exit(0)
    os.close(write_end)
    code = os.read(read_end, 1)[0]
    os.waitpid(pid, 0)
    if code:
        raise OSError(code, "pivot_root")
run("pivot_root", pivot_root)
run("open_tree", lambda: sc(NR["open_tree"], AT_FDCWD, ctypes.c_char_p(b"/"), 0))

def move_mount():
    try:
        tree = sc(NR["open_tree"], AT_FDCWD, ctypes.c_char_p(b"/tmp"), CLONE)
    except OSError:
        tree = -1
    empty, target = ctypes.c_char_p(b""), ctypes.c_char_p(b"/run")
    sc(NR["move_mount"], tree, empty, AT_FDCWD, target, 4)  # MOVE_MOUNT_F_EMPTY_PATH
run("move_mount", move_mount)

run("fsopen", lambda: sc(NR["fsopen"], ctypes.c_char_p(b"tmpfs"), 0))

def fsmount():
    try:
        context = sc(NR["fsopen"], ctypes.c_char_p(b"tmpfs"), 0)
        sc(NR["fsconfig"], context, 6, None, None, 0)  # FSCONFIG_CMD_CREATE
    except OSError:
        context = -1
    sc(NR["fsmount"], context, 0, 0)
run("fsmount", fsmount)

run("fspick", lambda: sc(NR["fspick"], AT_FDCWD, ctypes.c_char_p(b"/tmp"), 0))

def mount_setattr():
    attr = ctypes.create_string_buffer(struct.pack("=QQQQ", 0x8, 0, 0, 0), 32)  # NOEXEC
    sc(NR["mount_setattr"], AT_FDCWD, ctypes.c_char_p(b"/tmp"), 0, attr, 32)
run("mount_setattr", mount_setattr)

run("swapon", lambda: sc(NR["swapon"], absent, 0))
run("swapoff", lambda: sc(NR["swapoff"], absent))
run("reboot", lambda: sc(NR["reboot"], 0xFEE1DEAD, 0, 0, None))  # second magic wrong: EINVAL
def acct():
    # Process accounting belongs to the pid namespace: this one is the sandbox's own.
    with open("/tmp/qnix-acct", "w"):
        pass
    sc(NR["acct"], ctypes.c_char_p(b"/tmp/qnix-acct"))
    sc(NR["acct"], None)  # and off again
run("acct", acct)
run("quotactl", lambda: sc(NR["quotactl"], (0x800001 << 8), None, 0, None))  # Q_SYNC, all
run("syslog", lambda: sc(NR["syslog"], 10, None, 0))  # SYSLOG_ACTION_SIZE_BUFFER
run("vhangup", lambda: sc(NR["vhangup"]))  # no controlling terminal after --new-session
run("iopl", lambda: sc(NR["iopl"], 4))
run("ioperm", lambda: sc(NR["ioperm"], 0x10000, 1, 1))

def settimeofday():
    tv = (ctypes.c_long * 2)(0, 2_000_000)  # invalid microseconds: refused before any change
    sc(NR["settimeofday"], tv, None)
run("settimeofday", settimeofday)
run("clock_settime", lambda: sc(NR["clock_settime"], 1, (ctypes.c_long * 2)(0, 0)))  # MONOTONIC
run("adjtimex", lambda: sc(NR["adjtimex"], ctypes.create_string_buffer(256)))  # modes 0: read
run("clock_adjtime", lambda: sc(NR["clock_adjtime"], 0, ctypes.create_string_buffer(256)))

def no_aslr():
    sc(NR["personality"], 0x0040000)  # ADDR_NO_RANDOMIZE
    sc(NR["personality"], 0)
run("personality", no_aslr)

run("io_uring_setup", lambda: sc(NR["io_uring_setup"], 1, ctypes.create_string_buffer(120)))

master, slave = os.openpty()
try:
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
except OSError:
    pass
run("TIOCSTI", lambda: fcntl.ioctl(slave, termios.TIOCSTI, b"x"))
run("TIOCLINUX", lambda: fcntl.ioctl(slave, termios.TIOCLINUX, b"\x0c"))

report(results)
"""


def syscall_attempts(numbers: Mapping[str, int]) -> str:
    return _program(SYSCALL_ATTEMPTS_BODY, NR=dict(numbers))


# ia32 `int 0x80` from 64-bit code: the classic way around a filter written for one ABI only.
IA32_BODY = r"""
import mmap
def int80(number, ebx, ecx, edx):
    code = (b"\x53" + b"\xb8" + struct.pack("<I", number) + b"\xbb" + struct.pack("<I", ebx)
            + b"\xb9" + struct.pack("<I", ecx) + b"\xba" + struct.pack("<I", edx)
            + b"\xcd\x80" + b"\x5b\xc3")  # push rbx; mov eax/ebx/ecx/edx; int 0x80; pop rbx; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    return function()
sys.stdout.write("started\n")
sys.stdout.flush()
# ia32 keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): a call the native filter refuses.
result = int80(288, 0, 0xFFFFFFFD, 0)
report({"keyctl": result})
"""


def ia32_keyctl() -> str:
    return _program(IA32_BODY)


# ---- processes ----------------------------------------------------------------------------------


def find_process(argv0_name: str, argument: str) -> str:
    """Pids whose command line is exactly <...>/argv0_name argument (so neither the probe nor a
    bubblewrap carrying the probe's source counts)."""
    return _program(
        r"""
found = []
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                args = handle.read().split(b"\0")
        except OSError:
            continue
        if len(args) >= 2 and args[0].endswith(NAME.encode()) and args[1] == ARGUMENT.encode():
            found.append(int(entry))
report({"found": found})
""",
        NAME=argv0_name,
        ARGUMENT=argument,
    )


def signal_process(pid: int) -> str:
    return _program('report({"kill": attempt(lambda: os.kill(PID, 15))})', PID=pid)


def ptrace_process(pid: int) -> str:
    return _program(
        r"""
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
def attach():
    if libc.ptrace(PTRACE_ATTACH, PID, None, None) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")
    os.waitpid(PID, 0x40000000)  # __WALL: wait for the stop before detaching
    libc.ptrace(PTRACE_DETACH, PID, None, None)
report({"attach": attempt(attach)})
""",
        PID=pid,
    )


def debug_own_child() -> str:
    """What a debugger does to a process of its own user: attach to it with ptrace, and read
    and write its memory with process_vm_readv and process_vm_writev. The child holds a mark
    its parent has wiped from its own copy: a read is "ok" only if it returns the mark."""
    return _program(
        r"""
import signal
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]
for call in (libc.process_vm_readv, libc.process_vm_writev):
    call.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                     ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
    call.restype = ctypes.c_ssize_t
MARK = b"child-memory"
mark = ctypes.create_string_buffer(MARK, 16)
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
ctypes.memset(mark, 0, 16)  # the child's copy still holds MARK

def attach():
    if libc.ptrace(PTRACE_ATTACH, child, None, None) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")
    os.waitpid(child, 0x40000000)  # __WALL: wait for the stop before detaching
    libc.ptrace(PTRACE_DETACH, child, None, None)

def transfer(call, local):
    here = IoVec(ctypes.cast(local, ctypes.c_void_p), 16)
    there = IoVec(ctypes.cast(mark, ctypes.c_void_p), 16)
    if call(child, ctypes.byref(here), 1, ctypes.byref(there), 1, 0) != 16:
        raise OSError(ctypes.get_errno(), "process_vm")

def read():
    into = ctypes.create_string_buffer(16)
    transfer(libc.process_vm_readv, into)
    if into.value != MARK:
        raise OSError(errno.EIO, "read something else")

results = {
    "ptrace": attempt(attach),
    "process_vm_readv": attempt(read),
    "process_vm_writev": attempt(
        lambda: transfer(libc.process_vm_writev, ctypes.create_string_buffer(b"written", 16))
    ),
}
os.kill(child, 9)
os.waitpid(child, 0)
report(results)
"""
    )


# ---- files ---------------------------------------------------------------------------------------


def read_files(paths: Sequence[str]) -> str:
    """For each path: "ok:<content>" (first 200 bytes) or the errno name."""
    return _program(
        r"""
out = {}
for path in PATHS:
    try:
        with open(path, "rb") as handle:
            out[path] = "ok:" + handle.read(200).decode(errors="replace")
    except OSError as exc:
        out[path] = name_of(exc.errno)
report(out)
""",
        PATHS=list(paths),
    )


def write_file(path: str, content: str) -> str:
    return _program(
        r"""
def write():
    with open(PATH, "w") as handle:
        handle.write(CONTENT)
report({"write": attempt(write)})
""",
        PATH=path,
        CONTENT=content,
    )


def make_device(path: str) -> str:
    # A character device 1:3 (/dev/null): had the sandbox this power, it could as well make one
    # for the host's disk.
    return _program(
        'report({"mknod": attempt(lambda: os.mknod(PATH, 0o20600, os.makedev(1, 3)))})',
        PATH=path,
    )


def inherited_fd(fd: int) -> str:
    return _program(
        r"""
def read():
    os.lseek(FD, 0, 0)
    return os.read(FD, 200).decode()
try:
    content = "ok:" + read()
except OSError as exc:
    content = name_of(exc.errno)
fds = sorted(int(entry) for entry in os.listdir("/proc/self/fd"))
report({"read": content, "fds": fds})
""",
        FD=fd,
    )


def environment(key: str) -> str:
    return _program("report({'value': os.environ.get(KEY)})", KEY=key)


def kernel_symbols() -> str:
    return _program(
        r"""
with open("/proc/kallsyms") as handle:
    addresses = [line.split()[0] for _, line in zip(range(50), handle)]
report({"nonzero": sum(1 for a in addresses if int(a, 16) != 0), "seen": len(addresses)})
"""
    )


# ---- names, namespaces, capabilities -------------------------------------------------------------


def set_hostname(name: str) -> str:
    return _program(
        'report({"sethostname": attempt(lambda: socket.sethostname(NAME)), '
        '"now": socket.gethostname()})',
        NAME=name,
    )


def hostname() -> str:
    return _program('report({"hostname": os.uname().nodename})')


def own_cgroup() -> str:
    return _program('report({"lines": open("/proc/self/cgroup").read().splitlines()})')


def nested_user_namespace() -> str:
    return _program(
        r"""
def unshare():
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
report({"unshare": attempt(unshare)})
"""
    )


def chroot() -> str:
    return _program('report({"chroot": attempt(lambda: os.chroot("/tmp"))})')


def packet_socket() -> str:
    return _program(
        'report({"socket": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, '
        "socket.htons(3)))})"  # ETH_P_ALL: every frame on every interface of the namespace
    )


def connect(targets: Mapping[str, object]) -> str:
    """targets: label -> a unix socket path ("@name": abstract) or [host, port]; each outcome is
    "ok:<first data received>" or the errno name."""
    return _program(
        r"""
out = {}
for label, target in TARGETS.items():
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = "\0" + target[1:] if target.startswith("@") else target
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = tuple(target)
    sock.settimeout(5)
    try:
        sock.connect(address)
        out[label] = "ok:" + sock.recv(100).decode()
    except OSError as exc:
        out[label] = name_of(exc.errno) if exc.errno else type(exc).__name__
    finally:
        sock.close()
report(out)
""",
        TARGETS=dict(targets),
    )


def sysv_shared_memory(key: int) -> str:
    return _program(
        r"""
libc.shmat.restype = ctypes.c_void_p
def read():
    shmid = libc.shmget(KEY, 0, 0)
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    address = libc.shmat(shmid, None, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "shmat")
    return ctypes.string_at(address, 32).rstrip(b"\0").decode()
try:
    out = "ok:" + read()
except OSError as exc:
    out = name_of(exc.errno)
report({"read": out})
""",
        KEY=key,
    )


def inject_terminal(text: str) -> str:
    """TIOCSTI on stdin: push `text` into the input of the terminal the sandbox was started from."""
    return _program(
        r"""
def inject():
    for char in TEXT:
        fcntl.ioctl(0, termios.TIOCSTI, char.encode())
report({"inject": attempt(inject)})
""",
        TEXT=text,
    )


# ---- resources -----------------------------------------------------------------------------------


def allocate(megabytes: int) -> str:
    return _program(
        r"""
sys.stdout.write("started\n")
sys.stdout.flush()
block = b"\x01" * (MEGABYTES << 20)  # written, not just reserved: every page is charged
report({"allocated": len(block) >> 20})
""",
        MEGABYTES=megabytes,
    )


def fork_many(count: int) -> str:
    return _program(
        r"""
read_end, write_end = os.pipe()
children, error = [], None
for _ in range(COUNT):
    try:
        pid = os.fork()
    except OSError as exc:
        error = name_of(exc.errno)
        break
    if pid == 0:
        os.close(write_end)
        os.read(read_end, 1)  # wait until the parent has counted
        os._exit(0)
    children.append(pid)
os.close(write_end)
for pid in children:
    os.waitpid(pid, 0)
report({"forked": len(children), "error": error})
""",
        COUNT=count,
    )


def write_cgroup_file(path: str, value: str) -> str:
    return _program(
        r"""
def write():
    with open(PATH, "w") as handle:
        handle.write(VALUE)
report({"write": attempt(write)})
""",
        PATH=path,
        VALUE=value,
    )
