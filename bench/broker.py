"""How fast the broker decides and copies, beside the plain equivalents in one run.

1. Policy: a generated policy.d of 1,000 lines (services, tags, names, @anyvm, ask lines with
   targets to collect, a deny at the end), over a system of 50 compartments. Timed: loading
   the folder (parsing every line), and pure evaluation of a mix of requests (first lines,
   late lines, no match, asks) as decisions per second, plus the worst case (a request no
   line matches: every line is looked at).
2. Copy: a 1 GiB file through `qnix copy work:big personal` between two live compartments
   (the whole CLI: policy decision, pack in work piped into unpack in personal, sha256 of
   every byte, audit), beside a plain `cp` of the same file between the same two folders on
   the host, each timed once after one warm-up of each; the ratio is qnix / cp.

qnix runs on a stand-in host (bench/runtime.py's StandInHost: temporary roots, a network
namespace of its own playing the host), removed at the end. Run it as root:
`python bench/broker.py`.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import QNIX, StandInHost  # bench/runtime.py, beside this file

from qnix.policy.evaluate import Domain, System, evaluate
from qnix.policy.load import load_policy_dir

POLICY_LINES = 1000
COMPARTMENTS = 50
REQUESTS = 20_000
COPY_BYTES = 1 << 30
LOAD_RUNS = 7

SPEC = """\
[host]
hostname = "bench"
subnet = "10.214.0.0/16"

[compartments.work]
memory_mb = 512
autostart = true

[compartments.personal]
memory_mb = 512
autostart = true

[policy]
rules = ["qnix.Filecopy * work personal allow"]
"""


def generated_policy(lines: int, compartments: list[str]) -> str:
    rng = random.Random(7)
    out = ["# generated for the benchmark"]
    for number in range(lines - 1):
        service = f"qnix.Svc{number % 97}"
        argument = rng.choice(["*", "+", f"+arg{number % 5}"])
        source = rng.choice([*compartments[:10], "@anyvm", f"@tag:t{number % 7}"])
        target = rng.choice([*compartments[:10], "@anyvm", f"@tag:t{number % 5}", "@dispvm"])
        action = rng.choice(["allow", "deny", "ask", "ask default_target=c1"])
        if target == "@dispvm" and action.startswith("ask"):
            action = "allow"
        out.append(f"{service} {argument} {source} {target} {action}")
    out.append("* * @anyvm @anyvm deny")
    return "\n".join(out) + "\n"


def policy_figures() -> dict[str, float]:
    names = [f"c{n}" for n in range(COMPARTMENTS)]
    system = System(
        {
            name: Domain(tags=frozenset({f"t{n % 7}", f"t{n % 5}"}), default_dispvm="dvm")
            for n, name in enumerate(names)
        }
        | {"dvm": Domain(type="DispVM", template_for_dispvms=True)}
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "30-bench.policy").write_text(generated_policy(POLICY_LINES, names))
        samples = []
        for _ in range(LOAD_RUNS):
            start = time.perf_counter()
            policy = load_policy_dir(Path(folder))
            samples.append((time.perf_counter() - start) * 1000)
    assert not policy.errors and len(policy.rules) == POLICY_LINES
    rng = random.Random(11)
    requests = [
        (f"qnix.Svc{rng.randrange(110)}", rng.choice(["", "+arg1"]), rng.choice(names))
        for _ in range(REQUESTS)
    ]
    targets = [rng.choice([*names, "@dispvm", "@default"]) for _ in range(REQUESTS)]
    start = time.perf_counter()
    for (service, argument, source), target in zip(requests, targets, strict=True):
        evaluate(
            policy,
            system,
            untrusted_service=service,
            untrusted_argument=argument,
            source=source,
            untrusted_target=target,
        )
    mixed = REQUESTS / (time.perf_counter() - start)
    worst_count = 2000
    start = time.perf_counter()
    for _ in range(worst_count):
        evaluate(
            policy,
            system,
            untrusted_service="qnix.Nowhere",
            untrusted_argument="",
            source="c42",
            untrusted_target="c43",
        )
    worst = worst_count / (time.perf_counter() - start)
    return {"load_ms": statistics.median(samples), "mixed_per_s": mixed, "worst_per_s": worst}


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return elapsed


def copy_figures(host: StandInHost) -> dict[str, float]:
    spec = host.base / "spec.toml"
    spec.write_text(SPEC)
    host.qnix("apply", str(spec))
    state = host.base / "state" / "compartments"
    work, personal = state / "work" / "home", state / "personal" / "home"
    owner = work.stat()
    big = work / "big"
    block = os.urandom(1 << 20)
    with big.open("wb") as out:
        for _ in range(COPY_BYTES >> 20):
            out.write(block)
    os.chown(big, owner.st_uid, owner.st_gid)
    incoming = personal / "QubesIncoming" / "work"
    figures = {}
    for attempt in range(2):  # a warm-up of each, then the timed run
        shutil.rmtree(incoming, ignore_errors=True)
        (personal / "big.cp").unlink(missing_ok=True)
        qnix_s = timed([QNIX, "copy", "work:big", "personal"], host.env)
        cp_s = timed(["cp", str(big), str(personal / "big.cp")])
        if attempt == 1:
            figures = {"qnix_s": qnix_s, "cp_s": cp_s}
    if (incoming / "big").stat().st_size != COPY_BYTES:
        raise RuntimeError("the copy did not arrive whole")
    return figures


def main() -> int:
    if os.geteuid() != 0:
        print("run this as root: qnix needs it", file=sys.stderr)
        return 1
    policy = policy_figures()
    host = StandInHost()
    try:
        copy = copy_figures(host)
    finally:
        problems = host.close()
    for problem in problems:
        print(f"cleanup: {problem}", file=sys.stderr)
    print(f"policy of {POLICY_LINES} lines, {COMPARTMENTS} compartments, on {os.cpu_count()} CPUs")
    print(f"  load (parse every line), median of {LOAD_RUNS}:  {policy['load_ms']:8.1f} ms")
    print(f"  decisions/s, {REQUESTS} mixed requests:    {policy['mixed_per_s']:8.0f}")
    print(f"  decisions/s, no line matches (worst): {policy['worst_per_s']:8.0f}")
    gib = COPY_BYTES / (1 << 30)
    qnix_rate = COPY_BYTES / copy["qnix_s"] / (1 << 20)
    cp_rate = COPY_BYTES / copy["cp_s"] / (1 << 20)
    print(f"copy of {gib:g} GiB between two compartments' folders (second of two runs each)")
    print(f"  qnix copy work:big personal:  {copy['qnix_s']:6.2f} s  {qnix_rate:7.0f} MiB/s")
    print(f"  cp on the host:               {copy['cp_s']:6.2f} s  {cp_rate:7.0f} MiB/s")
    print(f"  ratio qnix / cp (time):       {copy['qnix_s'] / copy['cp_s']:6.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
