#!/usr/bin/env bash
# The live half of `make demo`: the office compartments brought up on this host and shown
# isolated, then everything qnix put on the host taken down again (the state is kept).
# Usage: examples/live-demo.sh [QNIX]     (as root)
set -euo pipefail
qnix=${1:-qnix}
spec=examples/smb-office.toml
# The example secrets are encrypted to this throw-away key; a real host keeps its own key in
# /etc/qnix/host.agekey. Never encrypt anything real to the demo key.
export QNIX_AGE_IDENTITY=${QNIX_AGE_IDENTITY:-$PWD/examples/keys/demo-only.agekey}

trap '"$qnix" down' EXIT
"$qnix" apply "$spec"
"$qnix" ls

echo "== a command in two compartments"
"$qnix" run work -- sh -c 'echo "in $(hostname) as $(id -un), home $HOME"'
"$qnix" run personal -- sh -c 'echo "in $(hostname): $(ls /proc | grep -c "^[0-9]") processes visible, all its own"'

echo "== work cannot reach banking (a container, started for this, with a server listening)"
banking=$("$qnix" ls --json | python3 -c \
  'import json, sys; print(next(c["address"] for c in json.load(sys.stdin) if c["name"] == "banking"))')
"$qnix" run banking -- sh -c 'python3 -m http.server 8443 >/dev/null 2>&1 &'
# The control: inside banking its server answers (once it has started).
"$qnix" run banking -- python3 -c "import socket, time
for _ in range(100):
    try:
        socket.create_connection(('$banking', 8443), timeout=3); break
    except ConnectionRefusedError:
        time.sleep(0.1)
else:
    raise SystemExit('the server in banking did not start')"
echo "ok: banking's own server answers on $banking:8443"
probe="import socket; socket.create_connection(('$banking', 8443), timeout=3)"
code=0
"$qnix" run work -- python3 -c "$probe" 2>/dev/null || code=$?
case $code in
  0) echo "FAILED: work reached banking at $banking" >&2; exit 1 ;;
  1) echo "ok: work cannot open a connection to banking ($banking:8443)" ;;
  *) echo "could not probe (exit code $code): is python3 under /usr on this host?" >&2; exit 1 ;;
esac

echo "== GUI: a window in work and one in banking, each with its label's colour"
python3 examples/desktop-demo.py "$qnix"

echo "== the vault has no network but loopback"
"$qnix" run vault -- sh -c 'echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")"'

echo "== a disposable, gone when its command ends"
"$qnix" dispose --template offline-dvm -- sh -c 'echo "in $(hostname), home on $(df --output=fstype ~ | tail -1)"'
echo "== a preloaded disposable (default-dvm keeps one waiting), another started behind it"
"$qnix" dispose -- sh -c 'echo "in $(hostname), started before it was asked for"'
"$qnix" ls

echo "== the host proves its isolation, probed from inside each running compartment"
"$qnix" selftest
