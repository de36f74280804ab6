#!/usr/bin/env bash
# `make fleet-demo`: the example fleet checked, then its two Debian desks (desk-04, desk-05)
# following it with `qnix pull` from a git daemon on 127.0.0.1: a signed change lands on both,
# an unsigned one is refused. Each desk is a stand-in: a network namespace plays its host,
# with its own state and run roots, so nothing of this machine's own network is touched.
# Everything is removed at the end. Usage: examples/fleet-demo.sh [QNIX]     (as root)
set -euo pipefail
qnix=${1:-qnix}
qnix=$(readlink -f "$(command -v "$qnix")")
example=$PWD/examples/fleet
desks=(desk-04 desk-05)

"$qnix" fleet check "$example"

work=$(mktemp -d /tmp/qnix-fleet-demo.XXXXXX)
chmod 711 "$work"  # compartment users pass through it to their homes
daemon=
cleanup() {
  for desk in "${desks[@]}"; do
    [ -d "$work/$desk" ] && env_of "$desk" "$qnix" down >/dev/null || true
    ip netns delete "qxd${desk#desk-}host" 2>/dev/null || true
  done
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
env_of() {  # run a command as desk $1 sees it
  local desk=$1; shift
  QNIX_AGE_IDENTITY=$work/$desk/host.agekey QNIX_STATE_ROOT=$work/$desk/state QNIX_RUN_ROOT=$work/$desk/run \
    QNIX_NETNS_PREFIX="qxd${desk#desk-}-" QNIX_HOST_NETNS="qxd${desk#desk-}host" "$@"
}
git_() { git -c user.name=Admin -c user.email=admin@acme.example -C "$work/repo" "$@"; }

echo "== the admin's signing key, the repository, a git daemon on 127.0.0.1"
ssh-keygen -q -t ed25519 -N '' -C admin@acme.example -f "$work/admin"
# The example's allowed_signers names a key whose private half is not in the repository:
# this demo trusts its own throw-away admin key instead.
cp -r "$example" "$work/repo"
echo "admin@acme.example $(cut -d' ' -f1,2 "$work/admin.pub")" > "$work/repo/allowed_signers"
git init -q -b main "$work/repo"
git_ add --all
git_ -c gpg.format=ssh -c user.signingkey="$work/admin" commit -q -S -m "the acme fleet"
git init -q --bare "$work/served/fleet.git"
git_ push -q "$work/served/fleet.git" main
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
git daemon --base-path="$work/served" --export-all --reuseaddr --listen=127.0.0.1 --port="$port" \
  "$work/served" 2>/dev/null &
daemon=$!
url=git://127.0.0.1:$port/fleet.git
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

echo "== each desk pins the admins' keys once and pulls"
for desk in "${desks[@]}"; do
  ip netns add "qxd${desk#desk-}host"
  ip -n "qxd${desk#desk-}host" link set lo up
  mkdir -p "$work/$desk"
  age-keygen -o "$work/$desk/host.agekey" 2>/dev/null  # the desk's own key (docs/secrets.md)
  env_of "$desk" "$qnix" pull --init "$url" --host "$desk" --signers "$work/repo/allowed_signers"
  env_of "$desk" "$qnix" pull | tail -n 1
  env_of "$desk" "$qnix" ls
done

echo "== a signed change (the office compartments get 384 MiB) lands on both"
sed -i 's/^memory_mb = 256$/memory_mb = 384/' "$work/repo/fleet.toml"
git_ -c gpg.format=ssh -c user.signingkey="$work/admin" commit -q -S -a -m "office: 384 MiB"
git_ push -q "$work/served/fleet.git" main
for desk in "${desks[@]}"; do
  env_of "$desk" "$qnix" pull | tail -n 1
  env_of "$desk" "$qnix" drift
done

echo "== an unsigned change is refused; nothing is applied"
sed -i 's/^memory_mb = 384$/memory_mb = 4096/' "$work/repo/fleet.toml"
git_ commit -q -a -m "not signed"
git_ push -q "$work/served/fleet.git" main
for desk in "${desks[@]}"; do
  if env_of "$desk" "$qnix" pull; then echo "FAILED: $desk took an unsigned change" >&2; exit 1; fi
  env_of "$desk" "$qnix" audit show | tail -n 1
done
echo "== done: everything made here is removed"
