"""`qnix policy check|lint`: explain one policy decision; list every error of a policy.d folder.

Exit codes of `check` tell the decision without parsing output: 0 allow, 1 deny, 3 ask
(2 stays click's usage error and qnix's invalid spec).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qnix.cli.options import runtime_options, runtime_paths
from qnix.errors import QnixError

if TYPE_CHECKING:
    from qnix.policy.evaluate import Decision
    from qnix.spec.load import LoadedSpec

EXIT_CODES = {"allow": 0, "deny": 1, "ask": 3}


@click.group()
def policy() -> None:
    """Qubes 4.1+ policy.d: explain a decision, find errors."""


def _load_spec(ctx: click.Context, spec: Path) -> LoadedSpec:
    """The spec, or its errors printed and the spec's exit code (a traceback with --debug)."""
    from qnix.compile.inputs import load

    try:
        return load(spec)
    except QnixError as exc:
        if ctx.meta.get("qnix.debug"):
            raise
        click.echo(exc.render(), err=True)
        ctx.exit(exc.exit_code)
    raise AssertionError("unreachable: ctx.exit raises")


def _describe(decision: Decision) -> list[str]:
    lines = [f"{decision.action}: {decision.reason}"]
    if decision.rule is not None:
        lines.append(f"  rule:    {decision.rule}")
    if decision.action == "allow":
        lines.append(f"  target:  {decision.target}")
        lines.append(f"  user:    {decision.user or '(the target default)'}")
    if decision.action == "ask":
        lines.append(f"  choices: {', '.join(decision.targets_for_ask)}")
        lines.append(f"  default: {decision.default_target or '(none)'}")
        lines.append(f"  user:    {decision.user or '(the target default)'}")
    return lines


@policy.command()
@click.argument("call", metavar="SERVICE[+ARG]")
@click.argument("source")
@click.argument("target")
@click.option(
    "--policy-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The policy.d folder (default: the spec's policy.dir).",
)
@click.option(
    "--spec",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Spec for compartments, tags, disposable templates and inline rules.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@click.pass_context
def check(
    ctx: click.Context,
    call: str,
    source: str,
    target: str,
    policy_dir: Path | None,
    spec: Path | None,
    as_json: bool,
) -> None:
    """Explain how the policy decides SERVICE[+ARG] from SOURCE to TARGET.

    The host is @adminvm (or dom0). Without --spec no compartment is known, so every TARGET
    name stands for @default. Exit code: 0 allow, 1 deny, 3 ask.
    """
    from qnix.policy.evaluate import HOST_ALIASES, System, evaluate, system_from_workstation
    from qnix.policy.load import load_policy_dir, load_spec_policy

    if spec is None and policy_dir is None:
        raise click.UsageError("give --policy-dir, --spec, or both")
    if spec is not None:
        loaded = _load_spec(ctx, spec)
        system = system_from_workstation(loaded.workstation)
        decided_by = load_spec_policy(loaded, policy_dir=policy_dir)
        if source not in HOST_ALIASES and source not in system.compartments:
            close = difflib.get_close_matches(source, list(system.compartments), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise click.BadParameter(
                f"{source!r} is no compartment of {spec}{hint}", param_hint="SOURCE"
            )
    else:
        assert policy_dir is not None
        system = System()
        decided_by = load_policy_dir(policy_dir)
    service, plus, argument = call.partition("+")
    decision = evaluate(
        decided_by,
        system,
        untrusted_service=service,
        untrusted_argument=plus + argument,
        source=source,
        untrusted_target=target,
    )
    if as_json:
        click.echo(json.dumps(decision.as_json()))
    else:
        for line in _describe(decision):
            click.echo(line)
    ctx.exit(EXIT_CODES[decision.action])


@policy.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.pass_context
def lint(ctx: click.Context, directory: Path) -> None:
    """List every error in the policy.d folder DIRECTORY as FILE:LINE: message (exit code 1)."""
    from qnix.policy.load import load_policy_dir

    found = load_policy_dir(directory)
    for error in found.errors:
        click.echo(error.render())
    count = len(found.errors)
    if count:
        click.echo(
            f"{directory}: {count} error{'s' if count != 1 else ''}; "
            "while the policy has any, every request is denied"
        )
        ctx.exit(1)
    click.echo(f"{directory}: ok, {len(found.rules)} rules")


@policy.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON list, for scripts.")
@runtime_options
def asks(as_json: bool, state_root: Path | None, run_root: Path | None) -> None:
    """The questions of `ask` lines that calls from compartments wait on (Qubes' dom0
    confirmation dialog): answer each with `qnix policy answer ID TARGET|no`."""
    from qnix.broker.decide import pending_questions

    waiting = pending_questions(runtime_paths(state_root, run_root))
    if as_json:
        click.echo(json.dumps(waiting, indent=2))
        return
    if not waiting:
        click.echo("no questions waiting")
    for question in waiting:
        offered = question.get("targets")
        targets = ", ".join(str(t) for t in offered) if isinstance(offered, list) else ""
        click.echo(
            f"{question['id']}: {question['source']} asks for {question['service']} "
            f"({question['rule']}); targets: {targets}; default: {question['default']}"
        )


@policy.command()
@click.argument("ask_id", metavar="ID")
@click.argument("choice", metavar="TARGET|no")
@runtime_options
def answer(ask_id: str, choice: str, state_root: Path | None, run_root: Path | None) -> None:
    """Answer waiting question ID: allow the call to TARGET (one of those offered), or no."""
    from qnix.broker.decide import answer_question

    question = answer_question(runtime_paths(state_root, run_root), ask_id, choice)
    verdict = "denied" if choice == "no" else f"allowed to {choice}"
    click.echo(f"{ask_id}: {question['source']} {question['service']}: {verdict}")
