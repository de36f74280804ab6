"""rsyslog configuration that forwards qnix's audit log to the spec's remote syslog server.

`rsyslog_config(ws, audit_log_path)` is RainerScript for the host's rsyslogd (on NixOS it goes
into `services.rsyslogd.extraConfig`; the build also writes it as `rsyslog/qnix.conf`):

* imfile follows the audit log. Its state file (the read position, in rsyslog's work
  directory) is written after every line and after every batch handed on
  (`PersistStateInterval="1"`, `persistStateAfterSubmission="on"`), so a restart carries on
  where the last run stopped: nothing sent twice after an orderly stop, nothing skipped; a first
  start sends the whole log.
* Lines go to a ruleset of their own (not to the host's other log rules) whose queue is Direct:
  each line goes straight to one action per receiver, each with a disk queue of its own
  (synced, its index written after every message), retried without end. One receiver that is
  down or frozen holds up only its own queue; a restart of rsyslogd loses nothing (messages
  sent but not yet marked done are sent again: a receiver may see an entry twice;
  `qnix audit verify` skips exact repeats).
* `relp` (omrelp): the receiver acknowledges every message and what it did not acknowledge is
  sent again, so a receiver that freezes or dies loses nothing. With TLS both sides show
  certificates: the receiver's must chain to `ca_file` and carry its name as given in `hosts`.
* `tcp`/`udp` (omfwd): TCP counts a message delivered once the kernel took it, so what a
  frozen receiver had in its socket buffers when it died is lost; UDP cannot tell at all.
* Each line leaves as an RFC 5424 message, the same shape `qnix audit export --format rfc5424`
  writes: `<109>1 TIMESTAMP HOSTNAME qnix - audit - {entry JSON}` — facility 13 (log audit),
  severity 5 (notice); TIMESTAMP is when rsyslog read the line (the entry's own time is in the
  JSON). The JSON is the log's line unchanged, so the server's copy is itself a verifiable
  chain (`qnix audit verify --format rfc5424 --log FILE`). qnix keeps lines under 7.5 KiB so
  they fit rsyslog's default 8 KiB message size.
* TCP uses octet-counted framing (RFC 6587, what RFC 5425 asks for over TLS). With `tls = true`
  the connection is TLS (gtls, StreamDriverMode 1) and the server's certificate must chain to
  `ca_file` and name the configured host (auth mode x509/name); give a DNS name, not an
  address, as the host for TLS. UDP (tls = false only) sends one datagram a message.

`receiver_config(receiver, folder)` is the other end: imrelp with TLS, one file per sending
host, each message in its file before it is acknowledged.

Every string goes through `_quoted`, the one RainerScript string writer: it refuses anything but
printable ASCII and escapes backslash, double quote and dollar (a `$` in a double-quoted
RainerScript string is otherwise a syntax error).

Pure: no file is read or written here.
"""

from __future__ import annotations

from qnix.audit.rfc5424 import APP_NAME, MSGID, PRI
from qnix.compile.nix.compartments import STATE_ROOT
from qnix.spec.model import LogReceiver, RemoteSyslog, Workstation

# Where the runtime keeps the audit log on a host built from the flake (qnix.runtime.paths).
AUDIT_LOG = f"{STATE_ROOT}/audit/events.jsonl"

TEMPLATE = "qnix_audit_rfc5424"
RULESET = "qnix_audit_forward"
QUEUE_FILE = "qnix_audit_forward"
QUEUE_MAX_DISK = "1g"
RETRY_INTERVAL_SECONDS = 10

RECEIVE_RULESET = "qnix_audit_receive"
RECEIVED_LINE = "qnix_received_line"
RECEIVED_FILE = "qnix_received_file"


def _quoted(value: str) -> str:
    """A double-quoted RainerScript string constant holding exactly `value`."""
    if not value or any(not 0x20 <= ord(char) < 0x7F for char in value):
        raise ValueError(f"not a printable ASCII string for rsyslog: {value!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _parameters(pairs: list[tuple[str, str]], indent: str) -> str:
    return "\n".join(f"{indent}{name}={_quoted(value)}" for name, value in pairs)


def _queue_file(remote: RemoteSyslog, index: int) -> str:
    return QUEUE_FILE if len(remote.hosts) == 1 else f"{QUEUE_FILE}_{index + 1}"


def _action(remote: RemoteSyslog, host: str, index: int) -> list[tuple[str, str]]:
    if remote.protocol == "relp":
        pairs = [
            ("type", "omrelp"),
            ("target", host),
            ("port", str(remote.port)),
            ("template", TEMPLATE),
        ]
        if remote.tls:
            pairs += [
                ("tls", "on"),
                ("tls.caCert", remote.ca_file),
                ("tls.myCert", remote.cert_file),
                ("tls.myPrivKey", remote.key_file),
                ("tls.authMode", "name"),
                ("tls.permittedPeer", host),
            ]
    else:
        pairs = [
            ("type", "omfwd"),
            ("target", host),
            ("port", str(remote.port)),
            ("protocol", str(remote.protocol)),
            ("template", TEMPLATE),
        ]
        if remote.protocol == "tcp":
            pairs.append(("TCP_Framing", "octet-counted"))
        if remote.tls:
            pairs += [
                ("StreamDriver", "gtls"),
                ("StreamDriverMode", "1"),
                ("StreamDriverAuthMode", "x509/name"),
                ("StreamDriverPermittedPeers", host),
                ("StreamDriver.CAFile", remote.ca_file),
            ]
    # Each receiver's action has a disk queue of its own, each message synced: one receiver
    # that is down or frozen holds up only its own queue, and what imfile has read survives a
    # crash of rsyslogd, not only an orderly stop.
    return [
        *pairs,
        ("queue.type", "Disk"),
        ("queue.filename", _queue_file(remote, index)),
        ("queue.syncQueueFiles", "on"),
        # The queue's index is written after every message too: without it, a crash leaves
        # an index that names files already gone, and rsyslog drops what they held.
        ("queue.checkpointInterval", "1"),
        ("queue.maxDiskSpace", QUEUE_MAX_DISK),
        ("queue.saveOnShutdown", "on"),
        ("action.resumeRetryCount", "-1"),
        ("action.resumeInterval", str(RETRY_INTERVAL_SECONDS)),
    ]


# imfile hands each line straight to the actions' queues (no in-memory queue between).
RULESET_QUEUE = [("queue.type", "Direct")]


def rsyslog_config(ws: Workstation, audit_log_path: str) -> str:
    """The configuration text, or "" when the spec has no `audit.remote_syslog`."""
    remote = ws.audit.remote_syslog
    if remote is None:
        return ""
    if not audit_log_path.startswith("/"):
        raise ValueError(f"the audit log path must be absolute: {audit_log_path!r}")
    transport = f"{remote.protocol}, TLS" if remote.tls else str(remote.protocol)
    header = (
        f"# qnix: forward the audit log to {' and '.join(remote.hosts)} port {remote.port} "
        f"({transport}) as RFC 5424. Generated from the spec."
    )
    modules = ['module(load="imfile" mode="inotify")']
    if remote.protocol == "relp":
        modules.append('module(load="omrelp")')
    input_pairs = [
        ("type", "imfile"),
        ("File", audit_log_path),
        ("Tag", APP_NAME),
        ("Ruleset", RULESET),
        ("PersistStateInterval", "1"),
        ("persistStateAfterSubmission", "on"),
        ("freshStartTail", "off"),
    ]
    actions: list[str] = []
    for index, host in enumerate(remote.hosts):
        actions += ["  action(", _parameters(_action(remote, host, index), "    "), "  )"]
    return "\n".join(
        [
            header,
            *modules,
            "",
            f'template(name={_quoted(TEMPLATE)} type="list") {{',
            f"  constant(value={_quoted(f'<{PRI}>1 ')})",
            '  property(name="timereported" dateFormat="rfc3339")',
            '  constant(value=" ")',
            '  property(name="hostname")',
            f"  constant(value={_quoted(f' {APP_NAME} - {MSGID} - ')})",
            '  property(name="msg")',
            "}",
            "",
            "ruleset(",
            _parameters([("name", RULESET), *RULESET_QUEUE], "  "),
            ") {",
            *actions,
            "}",
            "",
            "input(",
            _parameters(input_pairs, "  "),
            ")",
            "",
        ]
    )


def receiver_config(receiver: LogReceiver, directory: str) -> str:
    """The configuration of a host that receives audit logs: imrelp with TLS, each peer's
    certificate checked against `peers`; each message written, unchanged, to
    `<directory>/<sending host>.log` before imrelp acknowledges it."""
    if not directory.startswith("/") or "%" in directory:
        raise ValueError(f"not an absolute path without %: {directory!r}")
    folder = _quoted(directory)[1:-1]
    peers = ", ".join(_quoted(peer) for peer in receiver.peers)
    address = [] if receiver.address is None else [("address", receiver.address)]
    input_pairs = [
        ("type", "imrelp"),
        *address,
        ("port", str(receiver.port)),
        ("ruleset", RECEIVE_RULESET),
        ("tls", "on"),
        ("tls.caCert", receiver.ca_file),
        ("tls.myCert", receiver.cert_file),
        ("tls.myPrivKey", receiver.key_file),
        ("tls.authMode", "name"),
    ]
    file_pairs = [
        ("type", "omfile"),
        ("dynaFile", RECEIVED_FILE),
        ("template", RECEIVED_LINE),
        ("dirCreateMode", "0700"),
        ("fileCreateMode", "0600"),
        ("flushOnTXEnd", "on"),
        ("sync", "on"),
    ]
    return "\n".join(
        [
            f"# qnix: receive audit logs over RELP with TLS on port {receiver.port}, one file "
            f"per sending host in {directory}. Generated from the spec.",
            'module(load="imrelp")',
            "",
            f'template(name={_quoted(RECEIVED_LINE)} type="string" string="%rawmsg%\\n")',
            # The HOSTNAME the sender claims names its file; path characters are replaced.
            f'template(name={_quoted(RECEIVED_FILE)} type="string"'
            f' string="{folder}/%hostname:::secpath-replace%.log")',
            "",
            # Direct: the line is in its file before imrelp acknowledges it.
            "ruleset(",
            _parameters([("name", RECEIVE_RULESET), ("queue.type", "Direct")], "  "),
            ") {",
            "  action(",
            _parameters(file_pairs, "    "),
            "  )",
            "}",
            "",
            "input(",
            _parameters(input_pairs, "  "),
            f"  tls.permittedPeer=[{peers}]",
            ")",
            "",
        ]
    )
