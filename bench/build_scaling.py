"""How `qnix build` scales with the number of compartments, beside the raw tools in one run.

For 10, 100 and 1,000 compartments it times, each as the median of several runs:
  * `qnix build SPEC -o DIR` (the whole CLI, a fresh process each time),
  * the interpreter's own start (`python -c pass`, the floor of any Python CLI),
  * `nft -c -f` on the ruleset that build wrote (the raw tool checking the same table),
  * `nix-instantiate --parse` on the largest module it wrote,
and prints the figures and the ratios. Run it with `make bench`.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

SIZES = (10, 100, 1000)
RUNS = 5
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")


def synthetic_spec(count: int) -> str:
    """A workstation with `count` compartments: a net chain, mixed levels, 2-3 rules each."""
    lines = [
        "[host]",
        'hostname = "bench"',
        "[compartments.sys-net]",
        'network = "uplink"',
        "provides_network = true",
        'firewall = [{ cidr = "0.0.0.0/0" }]',
    ]
    for index in range(count - 1):
        isolation = ("namespace", "container", "vm")[index % 3]
        network = ("sys-net", "none", "uplink")[index % 3]
        lines += [
            f"[compartments.c{index}]",
            f'label = "{LABELS[index % len(LABELS)]}"',
            f'isolation = "{isolation}"',
            f'network = "{network}"',
            f'packages = ["firefox", "pkg{index}"]',
            f'persistent_paths = ["/var/lib/app{index}"]',
        ]
        if network != "none":
            lines.append(
                "firewall = [{ dns = true }, "
                f'{{ proto = "tcp", cidr = "198.51.{index % 256}.0/24", ports = [443, 8443] }}, '
                f'{{ proto = "udp", host = "h{index}.example.com", ports = ["5000-5100"] }}]'
            )
    return "\n".join(lines) + "\n"


def median_seconds(argv: Sequence[str], runs: int = RUNS) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    qnix = str(Path(sys.executable).with_name("qnix"))
    nft = shutil.which("nft") or "/usr/sbin/nft"
    nix = shutil.which("nix-instantiate") or "nix-instantiate"
    python_start = median_seconds([sys.executable, "-c", "pass"], runs=9)
    print(f"interpreter start (python -c pass): {python_start * 1000:8.1f} ms")
    print()
    header = (
        f"{'compartments':>12} {'qnix build':>12} {'per comp.':>10} "
        f"{'nft -c -f':>10} {'nix --parse':>12} {'build/nft':>10} {'build/python':>13}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            spec = Path(tmp) / f"bench-{size}.toml"
            spec.write_text(synthetic_spec(size))
            out = Path(tmp) / f"out-{size}"
            build = median_seconds([qnix, "build", str(spec), "-o", str(out)])
            check = median_seconds([nft, "-c", "-f", str(out / "nftables/qnix.nft")])
            largest = max((out / "modules").glob("*.nix"), key=lambda p: p.stat().st_size)
            parse = median_seconds([nix, "--parse", str(largest)])
            print(
                f"{size:>12} {build * 1000:>9.0f} ms {build / size * 1000:>7.2f} ms "
                f"{check * 1000:>7.0f} ms {parse * 1000:>9.0f} ms "
                f"{build / check:>9.1f}x {build / python_start:>12.1f}x"
            )


if __name__ == "__main__":
    main()
