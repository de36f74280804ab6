"""The services a compartment can call, and what each runs in its target (qrexec's
/etc/qubes-rpc). A fixed table: a service that is not here is refused, whatever the policy says.

Each handler is a program of qnix/inside/, which the keeper binds read-only at
/opt/qnix-agent/ in every compartment, run with the target's own interpreter; the caller's
stdin, stdout and stderr are its stdio. Nothing the caller sends reaches the command line:
the argument (already checked against the policy's charset) is in the environment only.
"""

from __future__ import annotations

from dataclasses import dataclass

INSIDE_DIR = "/opt/qnix-agent"  # qnix.runtime.keeper.INSIDE_DIR


@dataclass(frozen=True, slots=True)
class Service:
    """A program run in the target: `command` as is, or a file of qnix/inside/ with arguments."""

    description: str
    program: str | None = None  # a file of qnix/inside/, run with the target's Python
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()

    def argv(self, interpreter: str) -> list[str]:
        if self.program is None:
            return list(self.command)
        return [interpreter, "-I", "-S", f"{INSIDE_DIR}/{self.program}", *self.args]


SERVICES: dict[str, Service] = {
    # Split GPG (Qubes' qubes.Gpg): the vault's gpg, with options from an allow-list.
    "qnix.Gpg": Service(
        "sign, verify, encrypt or decrypt with the target's keys", "split.py", ("gpg-server",)
    ),
    # Split SSH (Qubes' qubes.SshAgent): the vault's ssh-agent, listing keys and signing only.
    "qnix.SshAgent": Service(
        "the target's ssh-agent (list keys, sign)", "split.py", ("ssh-agent-relay",)
    ),
    # Qubes' qubes.VMShell: a shell in the target reading commands from the caller's stdin.
    # Whoever may call it controls the target: allow it only from where that is meant.
    "qnix.VMShell": Service("a shell in the target, commands on stdin", command=("/bin/sh",)),
}


def service_argv(service: str, interpreter: str) -> list[str] | None:
    """The command a call of `service` runs in its target; None for an unknown service."""
    known = SERVICES.get(service)
    return None if known is None else known.argv(interpreter)
