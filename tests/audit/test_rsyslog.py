"""Forwarding the audit log with rsyslog: the generated configuration, checked by rsyslogd
itself, and run for real between two rsyslogd inside a network namespace the test makes."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qnix.audit import events
from qnix.audit.rfc5424 import parse_message
from qnix.audit.verify import verify_lines
from qnix.compile.inputs import load
from qnix.compile.rsyslog import AUDIT_LOG, receiver_config, rsyslog_config
from qnix.runtime.paths import RuntimePaths
from qnix.spec.model import LogReceiver, Workstation
from tests.conftest import EXAMPLES, need

PORT = 10514
LOG = "/var/lib/qnix/audit/events.jsonl"


def workstation(**remote: object) -> Workstation:
    """Forwarding as `remote` says, over TCP unless it names a protocol."""
    return Workstation.model_validate(
        {"host": {"hostname": "ws"}, "audit": {"remote_syslog": {"protocol": "tcp", **remote}}}
    )


# ---- the text ---------------------------------------------------------------------------


def test_tls_forwarding_config_is_exactly_this() -> None:
    assert rsyslog_config(workstation(host="logs.example.com"), LOG) == (
        "# qnix: forward the audit log to logs.example.com port 6514 (tcp, TLS) as RFC 5424. "
        "Generated from the spec.\n"
        'module(load="imfile" mode="inotify")\n'
        "\n"
        'template(name="qnix_audit_rfc5424" type="list") {\n'
        '  constant(value="<109>1 ")\n'
        '  property(name="timereported" dateFormat="rfc3339")\n'
        '  constant(value=" ")\n'
        '  property(name="hostname")\n'
        '  constant(value=" qnix - audit - ")\n'
        '  property(name="msg")\n'
        "}\n"
        "\n"
        "ruleset(\n"
        '  name="qnix_audit_forward"\n'
        '  queue.type="Direct"\n'
        ") {\n"
        "  action(\n"
        '    type="omfwd"\n'
        '    target="logs.example.com"\n'
        '    port="6514"\n'
        '    protocol="tcp"\n'
        '    template="qnix_audit_rfc5424"\n'
        '    TCP_Framing="octet-counted"\n'
        '    StreamDriver="gtls"\n'
        '    StreamDriverMode="1"\n'
        '    StreamDriverAuthMode="x509/name"\n'
        '    StreamDriverPermittedPeers="logs.example.com"\n'
        '    StreamDriver.CAFile="/etc/ssl/certs/ca-certificates.crt"\n'
        '    queue.type="Disk"\n'
        '    queue.filename="qnix_audit_forward"\n'
        '    queue.syncQueueFiles="on"\n'
        '    queue.checkpointInterval="1"\n'
        '    queue.maxDiskSpace="1g"\n'
        '    queue.saveOnShutdown="on"\n'
        '    action.resumeRetryCount="-1"\n'
        '    action.resumeInterval="10"\n'
        "  )\n"
        "}\n"
        "\n"
        "input(\n"
        '  type="imfile"\n'
        '  File="/var/lib/qnix/audit/events.jsonl"\n'
        '  Tag="qnix"\n'
        '  Ruleset="qnix_audit_forward"\n'
        '  PersistStateInterval="1"\n'
        '  persistStateAfterSubmission="on"\n'
        '  freshStartTail="off"\n'
        ")\n"
    )


def test_plain_tcp_and_udp_leave_out_what_they_do_not_use() -> None:
    tcp = rsyslog_config(workstation(host="192.0.2.7", port=514, tls=False), LOG)
    assert '    target="192.0.2.7"\n    port="514"\n    protocol="tcp"\n' in tcp
    assert 'TCP_Framing="octet-counted"' in tcp and "StreamDriver" not in tcp
    assert "(tcp) as RFC 5424" in tcp
    udp = rsyslog_config(workstation(host="2001:db8::1", protocol="udp", tls=False), LOG)
    assert '    target="2001:db8::1"\n    port="6514"\n    protocol="udp"\n' in udp
    assert "TCP_Framing" not in udp and "StreamDriver" not in udp


def test_relp_to_a_pair_gives_each_receiver_an_action_and_a_disk_queue_of_its_own() -> None:
    ws = workstation(hosts=["logs-a.example.com", "logs-b.example.com"], protocol="relp")
    text = rsyslog_config(ws, LOG)
    assert text.startswith(
        "# qnix: forward the audit log to logs-a.example.com and logs-b.example.com port 2514 "
        "(relp, TLS) as RFC 5424. Generated from the spec.\n"
        'module(load="imfile" mode="inotify")\n'
        'module(load="omrelp")\n'
    )
    actions = text[text.index("  action(\n") : text.index("}\n\ninput(")]
    assert actions == "".join(
        "  action(\n"
        '    type="omrelp"\n'
        f'    target="logs-{side}.example.com"\n'
        '    port="2514"\n'
        '    template="qnix_audit_rfc5424"\n'
        '    tls="on"\n'
        '    tls.caCert="/etc/ssl/certs/ca-certificates.crt"\n'
        '    tls.myCert="/etc/qnix/tls/host.crt"\n'
        '    tls.myPrivKey="/etc/qnix/tls/host.key"\n'
        '    tls.authMode="name"\n'
        f'    tls.permittedPeer="logs-{side}.example.com"\n'
        '    queue.type="Disk"\n'
        f'    queue.filename="qnix_audit_forward_{number}"\n'
        '    queue.syncQueueFiles="on"\n'
        '    queue.checkpointInterval="1"\n'
        '    queue.maxDiskSpace="1g"\n'
        '    queue.saveOnShutdown="on"\n'
        '    action.resumeRetryCount="-1"\n'
        '    action.resumeInterval="10"\n'
        "  )\n"
        for number, side in ((1, "a"), (2, "b"))
    )


def test_the_receiver_config_is_exactly_this() -> None:
    receiver = LogReceiver(peers=("*.example.com", "ws-1.example.net"), address="192.0.2.9")
    assert receiver_config(receiver, "/var/log/qnix-remote") == (
        "# qnix: receive audit logs over RELP with TLS on port 2514, one file per sending host "
        "in /var/log/qnix-remote. Generated from the spec.\n"
        'module(load="imrelp")\n'
        "\n"
        'template(name="qnix_received_line" type="string" string="%rawmsg%\\n")\n'
        'template(name="qnix_received_file" type="string"'
        ' string="/var/log/qnix-remote/%hostname:::secpath-replace%.log")\n'
        "\n"
        "ruleset(\n"
        '  name="qnix_audit_receive"\n'
        '  queue.type="Direct"\n'
        ") {\n"
        "  action(\n"
        '    type="omfile"\n'
        '    dynaFile="qnix_received_file"\n'
        '    template="qnix_received_line"\n'
        '    dirCreateMode="0700"\n'
        '    fileCreateMode="0600"\n'
        '    flushOnTXEnd="on"\n'
        '    sync="on"\n'
        "  )\n"
        "}\n"
        "\n"
        "input(\n"
        '  type="imrelp"\n'
        '  address="192.0.2.9"\n'
        '  port="2514"\n'
        '  ruleset="qnix_audit_receive"\n'
        '  tls="on"\n'
        '  tls.caCert="/etc/ssl/certs/ca-certificates.crt"\n'
        '  tls.myCert="/etc/qnix/tls/host.crt"\n'
        '  tls.myPrivKey="/etc/qnix/tls/host.key"\n'
        '  tls.authMode="name"\n'
        '  tls.permittedPeer=["*.example.com", "ws-1.example.net"]\n'
        ")\n"
    )
    with pytest.raises(ValueError, match="absolute path without %"):
        receiver_config(receiver, "/var/log/%hostname%")


def test_no_remote_syslog_means_no_configuration() -> None:
    assert rsyslog_config(Workstation.model_validate({"host": {"hostname": "ws"}}), LOG) == ""


@pytest.mark.parametrize("path", ["relative/events.jsonl", "/new\nline", "/tab\there", "/é", ""])
def test_a_path_rsyslog_could_misread_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"absolute|printable ASCII"):
        rsyslog_config(workstation(host="logs.example.com"), path)


def test_a_quote_dollar_or_backslash_is_escaped() -> None:
    text = rsyslog_config(workstation(host="logs.example.com"), '/srv/"$HOME\\x/events.jsonl')
    assert '  File="/srv/\\"\\$HOME\\\\x/events.jsonl"\n' in text


# ---- rsyslogd --------------------------------------------------------------------------


class Namespace:
    """A network namespace of the test's own with loopback up; rsyslogd daemons in it."""

    def __init__(self, base: Path) -> None:
        self.ip = need("ip")
        self.rsyslogd = need("rsyslogd")
        self.name = "qxa" + secrets.token_hex(4)
        self.base = base
        self.daemons: list[subprocess.Popen[bytes]] = []
        subprocess.run([self.ip, "netns", "add", self.name], check=True)
        subprocess.run([self.ip, "-n", self.name, "link", "set", "lo", "up"], check=True)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.ip, "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def check_config(self, config: Path) -> subprocess.CompletedProcess[str]:
        return self.run(self.rsyslogd, "-N1", "-f", str(config))

    def start(self, role: str, config: Path) -> subprocess.Popen[bytes]:
        checked = self.check_config(config)
        assert checked.returncode == 0, checked.stderr
        output = (self.base / f"{role}.out").open("ab")
        daemon = subprocess.Popen(
            [
                *(self.ip, "netns", "exec", self.name),
                *(self.rsyslogd, "-n", "-f", str(config), "-i", str(self.base / f"{role}.pid")),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        self.daemons.append(daemon)
        return daemon

    def listening(self, port: int) -> bool:
        listed = self.run(need("ss"), "-Htln", f"sport = :{port}")
        return f"127.0.0.1:{port}" in listed.stdout

    def stop(self, daemon: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        daemon.send_signal(sig)
        daemon.wait(timeout=20)

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=20)
        subprocess.run([self.ip, "netns", "delete", self.name], check=True)


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    made = Namespace(tmp_path)
    try:
        yield made
    finally:
        made.close()
    assert (
        made.name
        not in subprocess.run(
            [made.ip, "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )


def tcp_receiver_config(base: Path, received: Path) -> Path:
    work = base / "receiver"
    work.mkdir()
    config = base / "receiver.conf"
    config.write_text(
        f'global(workDirectory="{work}" net.enableDNS="off")\n'
        'module(load="imtcp")\n'
        'template(name="raw" type="string" string="%rawmsg%\\n")\n'
        'ruleset(name="received") {\n'
        f'  action(type="omfile" file="{received}" template="raw")\n'
        "}\n"
        f'input(type="imtcp" address="127.0.0.1" port="{PORT}" ruleset="received")\n'
    )
    return config


def forwarder_config(base: Path, ws: Workstation, log: Path) -> Path:
    work = base / "forwarder"
    work.mkdir(exist_ok=True)
    config = base / "forwarder.conf"
    config.write_text(
        f'global(workDirectory="{work}" net.enableDNS="off")\n' + rsyslog_config(ws, str(log))
    )
    return config


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def received_lines(received: Path) -> list[str]:
    return received.read_text().splitlines() if received.exists() else []


HOSTILE = ['a"b\\c', "line\nbreak\r\n", "\x00\x1b[2J\x7f", "ünïcødé \u2028 \udc80", "$HOME `x`"]


def test_events_reach_a_syslog_server_as_rfc5424_with_the_json_intact(
    tmp_path: Path, namespace: Namespace
) -> None:
    log = tmp_path / "audit" / "events.jsonl"
    received = tmp_path / "received.log"
    namespace.start("receiver", tcp_receiver_config(tmp_path, received))
    wait_for(lambda: namespace.listening(PORT), "the receiver to listen")

    # Entries written before the forwarder ever ran are sent too.
    for index in range(3):
        events.append(log, "start", {"compartment": f"c{index}", "result": "ok"})
    ws = workstation(host="127.0.0.1", port=PORT, tls=False)
    forwarder = namespace.start("forwarder", forwarder_config(tmp_path, ws, log))
    events.append(log, "copy", {"compartment": "work", "file": HOSTILE[0], "argv": HOSTILE})
    for index in range(4):
        events.append(log, "policy", {"source": "work", "target": f"t{index}", "action": "deny"})
    wait_for(lambda: len(received_lines(received)) >= 8, "8 messages")

    # An orderly restart: what was written meanwhile arrives once, nothing twice.
    namespace.stop(forwarder)
    for index in range(3):
        events.append(log, "stop", {"compartment": f"c{index}", "result": "ok"})
    forwarder = namespace.start("forwarder", forwarder_config(tmp_path, ws, log))
    wait_for(lambda: len(received_lines(received)) >= 11, "11 messages")

    # A crash of the forwarder loses nothing either.
    namespace.stop(forwarder, signal.SIGKILL)
    events.append(log, "dispose", {"template": "dvm", "result": 0})
    namespace.start("forwarder", forwarder_config(tmp_path, ws, log))
    wait_for(lambda: events.decode(log_lines(log)[-1]).seq == last_received_seq(received), "12")
    time.sleep(1)  # anything sent twice would have arrived by now

    log_bytes = log_lines(log)
    messages = [parse_message(text) for text in received_lines(received)]
    hostnames = {message.hostname for message in messages}
    assert len(hostnames) == 1 and "-" not in hostnames
    for message in messages:
        assert (message.pri, message.app, message.procid, message.msgid) == (
            109,
            "qnix",
            "-",
            "audit",
        )
        assert message.structured_data == "-"
    unique: list[bytes] = []
    for message in messages:
        line = message.msg.encode() + b"\n"
        if line not in unique:
            unique.append(line)
    # Orderly stops send nothing twice; after the SIGKILL at most the messages rsyslog had not
    # marked done are repeated, and they are exact copies.
    assert [m.msg.encode() + b"\n" for m in messages[:11]] == log_bytes[:11]
    assert unique == log_bytes
    assert events.decode(unique[3]).fields["argv"] == HOSTILE
    result = verify_lines(unique, None, check_head=False)
    assert (result.ok, result.entries) == (True, 12)


def log_lines(log: Path) -> list[bytes]:
    return events.split_lines(log.read_bytes())


def last_received_seq(received: Path) -> int:
    lines = received_lines(received)
    return events.decode(parse_message(lines[-1]).msg.encode() + b"\n").seq if lines else 0


def test_rsyslogd_accepts_every_generated_variant(tmp_path: Path, namespace: Namespace) -> None:
    """TLS (what the examples ask for, needing rsyslog's gtls driver), plain TCP and UDP."""
    need("rsyslogd")
    variants = {
        "tls": workstation(host="logs.example.com"),
        "tcp": workstation(host="192.0.2.7", port=514, tls=False),
        "udp": workstation(host="2001:db8::1", protocol="udp", tls=False),
        **{path.stem: load(path).workstation for path in sorted(EXAMPLES.glob("*.toml"))},
    }
    checked = {}
    for name, ws in variants.items():
        text = rsyslog_config(ws, LOG)
        if not text:
            continue
        config = tmp_path / f"{name}.conf"
        config.write_text(f'global(workDirectory="{tmp_path}")\n{text}')
        result = namespace.check_config(config)
        checked[name] = (result.returncode, "error" in result.stderr.lower())
    assert checked == {
        "tls": (0, False),
        "tcp": (0, False),
        "udp": (0, False),
        "executive-arm": (0, False),
        "smb-office": (0, False),
    }
    # rsyslogd does reject what it does not know: the check means something.
    broken = tmp_path / "broken.conf"
    broken.write_text(
        rsyslog_config(variants["tls"], LOG).replace('StreamDriverMode="1"', 'StreamDriverMod="1"')
    )
    rejected = namespace.check_config(broken)
    assert rejected.returncode != 0 and "StreamDriverMod" in rejected.stderr


def test_the_default_log_is_where_the_runtime_writes_it() -> None:
    assert AUDIT_LOG == str(RuntimePaths().audit_log) == LOG
