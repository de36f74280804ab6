"""`qnix selftest`: the live host proves its isolation from inside its running compartments.
Exit code 0 no violation, 1 some."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qnix.cli.options import runtime_options, runtime_paths


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@runtime_options
@click.pass_context
def selftest(
    ctx: click.Context, as_json: bool, state_root: Path | None, run_root: Path | None
) -> None:
    """Probe each running compartment from inside, as its user: capabilities, no_new_privs,
    seccomp, user, pid namespace, read-only /usr, secrets, loopback only without a network;
    and every pair of networked ones against the policy's openings. Exit code 1 on any
    violation."""
    from rich.console import Console
    from rich.table import Table

    from qnix.runtime import selftest as selftest_module

    report = selftest_module.selftest(runtime_paths(state_root, run_root))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        ctx.exit(1 if report.violations else 0)
    console = Console(width=120)
    checks = Table(title="inside each running compartment", title_justify="left")
    for column in ("compartment", "check", "expected", "actual", ""):
        checks.add_column(column)
    for check in report.checks:
        checks.add_row(
            check.compartment,
            check.check,
            check.expected,
            check.actual,
            "VIOLATION" if check.violated else "ok",
        )
    console.print(checks)
    matrix = Table(title="connections between networked compartments", title_justify="left")
    for column in ("source", "target", "port", "policy", "result"):
        matrix.add_column(column)
    for connection in report.connections:
        matrix.add_row(
            connection.source,
            connection.target,
            f"{connection.proto}/{connection.port}",
            f"allow ({connection.rule})" if connection.allowed else "deny",
            connection.verdict,
        )
    console.print(matrix)
    where = "set by qnix (NixOS)" if report.sysctls_enforced else "the host's own, not qnix's"
    sysctls = Table(title=f"host kernel parameters: {where}", title_justify="left")
    for column in ("key", "profile", "host", ""):
        sysctls.add_column(column)
    for sysctl in report.sysctls:
        differs = sysctl.expected != sysctl.actual
        mark = ("VIOLATION" if sysctl.violated else "warning") if differs else "ok"
        sysctls.add_row(sysctl.key, sysctl.expected, sysctl.actual or "-", mark)
    console.print(sysctls)
    for violation in report.violations:
        click.echo(f"violation: {violation}")
    count = len(report.violations)
    click.echo(
        f"{count} violation{'s' if count != 1 else ''}" if count else "selftest: no violation"
    )
    ctx.exit(1 if count else 0)
