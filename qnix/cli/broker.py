"""`qnix copy`, `qnix move`, `qnix clip`, `qnix open-in-dvm`: the broker, started by the admin.

Each asks the live policy first (qnix.broker.decide); an `ask` line is put to this terminal
(`--timeout` seconds, then denied), or answered by `--yes` / `--no` for scripts. A deny or any
failure exits 1 with the reason; nothing arrives. So does a compartment that does not finish
its part within QNIX_TRANSFER_TIMEOUT seconds (qnix.broker.programs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from qnix.cli.options import RUN_ROOT, STATE_ROOT, runtime_paths

if TYPE_CHECKING:
    from qnix.broker.decide import Asker

_F = TypeVar("_F", bound=Callable[..., Any])


def _common(command: _F) -> _F:
    """--yes/--no/--timeout for asks, and the runtime roots."""
    for decorator in reversed(
        (
            click.option("--yes", "answer", flag_value="yes", help="Answer every ask: allow."),
            click.option("--no", "answer", flag_value="no", help="Answer every ask: deny."),
            click.option(
                "--timeout",
                type=click.FloatRange(min=1),
                default=60.0,
                show_default=True,
                help="Seconds to wait for an answer on this terminal before denying.",
            ),
            STATE_ROOT,
            RUN_ROOT,
        )
    ):
        command = decorator(command)
    return command


def _asker(answer: str | None, timeout: float) -> Asker:
    from qnix.broker.decide import TerminalAsker, agree, refuse

    if answer == "yes":
        return agree
    if answer == "no":
        return refuse
    return TerminalAsker(timeout)


def _split_sources(specs: tuple[str, ...]) -> tuple[str, list[str]]:
    """SRC:PATH arguments: one source compartment, its paths."""
    sources, files = set(), []
    for spec in specs:
        source, colon, path = spec.partition(":")
        if not colon or not source or not path:
            raise click.BadParameter(f"{spec!r} is not SRC:PATH", param_hint="SRC:PATH")
        sources.add(source)
        files.append(path)
    if len(sources) != 1:
        raise click.BadParameter(
            f"all paths must come from one compartment, not {', '.join(sorted(sources))}",
            param_hint="SRC:PATH",
        )
    return sources.pop(), files


def _limit_options(command: _F) -> _F:
    from qnix.inside import qfile

    for decorator in reversed(
        (
            click.option(
                "--max-bytes",
                type=click.IntRange(min=0),
                default=qfile.DEFAULT_MAX_BYTES,
                show_default=True,
                help="Refuse a transfer of more file bytes than this.",
            ),
            click.option(
                "--max-entries",
                type=click.IntRange(min=1),
                default=qfile.DEFAULT_MAX_ENTRIES,
                show_default=True,
                help="Refuse a transfer of more files, folders and symlinks than this.",
            ),
            click.option(
                "--max-depth",
                type=click.IntRange(min=1),
                default=qfile.DEFAULT_MAX_DEPTH,
                show_default=True,
                help="Refuse a transfer with folders nested deeper than this.",
            ),
        )
    ):
        command = decorator(command)
    return command


def counted(number: int, noun: str) -> str:
    """`1 file`, `2 files`, `0 files`."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _transfer(move: bool, specs: tuple[str, ...], target: str, **options: Any) -> None:
    from qnix.broker.transfer import transfer
    from qnix.inside import qfile

    source, files = _split_sources(specs)
    done = transfer(
        runtime_paths(options["state_root"], options["run_root"]),
        source=source,
        untrusted_paths=files,
        target=target,
        move=move,
        asker=_asker(options["answer"], options["timeout"]),
        limits=qfile.Limits(options["max_depth"], options["max_entries"], options["max_bytes"]),
    )
    summary = done.summary
    verb = "moved" if move else "copied"
    counts = ", ".join(
        counted(number, noun)
        for number, noun in (
            (summary.files, "file"),
            (summary.folders, "folder"),
            (summary.symlinks, "symlink"),
        )
    )
    click.echo(
        f"{verb} {counts} ({counted(summary.bytes, 'byte')}) from {source} to "
        f"{done.target}:~/QubesIncoming/{source}/"
    )


@click.command(name="copy")
@click.argument("specs", metavar="SRC:PATH...", nargs=-1, required=True)
@click.argument("target", metavar="DST")
@_limit_options
@_common
def copy(specs: tuple[str, ...], target: str, **options: Any) -> None:
    """Copy files and folders of compartment SRC into DST's ~/QubesIncoming/SRC/, as the
    policy (qnix.Filecopy) decides. PATH is inside SRC, relative to its home."""
    _transfer(False, specs, target, **options)


@click.command(name="move")
@click.argument("specs", metavar="SRC:PATH...", nargs=-1, required=True)
@click.argument("target", metavar="DST")
@_limit_options
@_common
def move(specs: tuple[str, ...], target: str, **options: Any) -> None:
    """Like copy (policy: qnix.Filemove); the sources are removed in SRC only after DST
    reported that everything arrived."""
    _transfer(True, specs, target, **options)


@click.group()
def clip() -> None:
    """The host's global clipboard: copy from one compartment, paste once into another."""


@clip.command(name="copy")
@click.argument("source", metavar="SRC")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    default=64 * 1024,
    show_default=True,
    help="Refuse a clipboard larger than this.",
)
@_common
def clip_copy(source: str, max_bytes: int, **options: Any) -> None:
    """Take SRC's clipboard into the host's clipboard (replacing what it held)."""
    from qnix.broker import clipboard

    taken = clipboard.copy(
        runtime_paths(options["state_root"], options["run_root"]), source, max_bytes=max_bytes
    )
    click.echo(f"copied {counted(taken.size, 'byte')} ({taken.kind}) from {source}")


@clip.command(name="paste")
@click.argument("target", metavar="DST")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    default=64 * 1024,
    show_default=True,
    help="Refuse to deliver a clipboard larger than this.",
)
@_common
def clip_paste(target: str, max_bytes: int, **options: Any) -> None:
    """Deliver the host's clipboard to DST once, as the policy (qnix.Clipboard +text or
    +binary, from the clipboard's owner to DST) decides; then it is empty."""
    from qnix.broker import clipboard

    taken, destination = clipboard.paste(
        runtime_paths(options["state_root"], options["run_root"]),
        target,
        asker=_asker(options["answer"], options["timeout"]),
        max_bytes=max_bytes,
    )
    click.echo(
        f"pasted {counted(taken.size, 'byte')} ({taken.kind}) from {taken.owner} into {destination}"
    )


@clip.command(name="show")
@click.option("--state-root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--run-root", type=click.Path(path_type=Path, file_okay=False))
def clip_show(state_root: Path | None, run_root: Path | None) -> None:
    """Who the clipboard's content came from, and its size (never the content)."""
    from qnix.broker import clipboard

    held = clipboard.read(runtime_paths(state_root, run_root))
    if held is None:
        click.echo("the clipboard is empty")
        return
    click.echo(
        f"{held.size} bytes ({held.kind}) from {held.owner}, copied {held.copied_at}, "
        f"sha256 {held.sha256}"
    )


@clip.command(name="clear")
@click.option("--state-root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--run-root", type=click.Path(path_type=Path, file_okay=False))
def clip_clear(state_root: Path | None, run_root: Path | None) -> None:
    """Empty the host's clipboard."""
    from qnix.broker import clipboard

    held = clipboard.clear(runtime_paths(state_root, run_root))
    click.echo("cleared the clipboard" if held else "the clipboard was empty")


@click.command(name="open-in-dvm")
@click.argument("source", metavar="SRC")
@click.argument("file", metavar="FILE")
@click.option(
    "--with",
    "opener",
    metavar="CMD",
    help="The program that opens FILE in the disposable, split as a shell would (default "
    "xdg-open); FILE's path is its last argument. It must wait until the user is done.",
)
@click.option(
    "--dispvm",
    "target",
    default="@dispvm",
    show_default=True,
    help="The target to ask the policy for: @dispvm or @dispvm:TEMPLATE.",
)
@click.option("--view-only", is_flag=True, help="Never bring edits back.")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Refuse a file (or edited file) larger than this (default 8 GiB).",
)
@_common
def open_in_dvm(
    source: str,
    file: str,
    opener: str | None,
    target: str,
    view_only: bool,
    max_bytes: int | None,
    **options: Any,
) -> None:
    """Open FILE of compartment SRC in a new disposable (policy: qnix.OpenInDisposable). When
    the opener exits, edits replace FILE in SRC if the policy allows qnix.OpenInDisposable
    +edit; then the disposable is gone. Exits with the opener's exit code."""
    import shlex

    from qnix.broker.dvm import open_in_disposable
    from qnix.inside import qfile

    try:
        argv = shlex.split(opener) if opener is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--with") from None
    if argv is not None and not argv:
        raise click.BadParameter("name a program", param_hint="--with")
    opened = open_in_disposable(
        runtime_paths(options["state_root"], options["run_root"]),
        source=source,
        untrusted_file=file,
        target=target,
        opener=argv,
        view_only=view_only,
        asker=_asker(options["answer"], options["timeout"]),
        max_bytes=qfile.DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
    )
    if opened.returned:
        outcome = f"the edits replaced {file} in {source}"
    elif opened.changed:
        outcome = opened.note
    else:
        outcome = opened.note or "no edits"
    click.echo(f"{opened.disposable} ({opened.template}): {outcome}", err=True)
    sys.stdout.flush()
    click.get_current_context().exit(opened.opener_code)
