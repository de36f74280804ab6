"""A spec's policy.d folder with includes (Qubes' `!include`, `!include-dir`,
`!include-service`): the build carries every file the policy reads, so the generation's
policy decides exactly as the folder it came from."""

from __future__ import annotations

from pathlib import Path

from qnix.compile.artifacts import compile_spec
from qnix.compile.inputs import load
from qnix.policy.evaluate import evaluate, system_from_workstation
from qnix.policy.load import load_policy_dir, load_spec_policy

SPEC = """\
[host]
hostname = "inc"

[compartments.work]

[compartments.vault]
network = "none"

[policy]
dir = "policy.d"
rules = ["qnix.Filecopy * vault @anyvm deny"]
"""
FILES = {
    "30-office.policy": (
        "# the office's own lines, and what they include\n"
        "!include include/admin\n"
        "!include-dir more\n"
        "!include-service qnix.Gpg * services/gpg\n"
        "qnix.Filecopy * work vault deny\n"
    ),
    "include/admin": "qnix.Clipboard * work vault allow\n",
    "more/10-moves.policy": "qnix.Filemove * work vault ask default_target=vault\n",
    "more/README": "not a policy file: --include-dir reads *.policy only\n",
    "services/gpg": "work vault allow\n",
}
REQUESTS = ["qnix.Gpg", "qnix.Filemove", "qnix.Clipboard", "qnix.Filecopy", "qnix.Other"]


def test_included_files_are_built_and_decide_as_the_folder_does(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text(SPEC)
    for name, text in FILES.items():
        path = tmp_path / "policy.d" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    loaded = load(tmp_path / "spec.toml")
    built = compile_spec(loaded)
    policy_files = sorted(name for name in built.files if name.startswith("policy/"))
    assert policy_files == [
        "policy/00-spec.policy",
        "policy/30-office.policy",
        "policy/include/admin",
        "policy/more/10-moves.policy",
        "policy/services/gpg",
    ]
    out = tmp_path / "out"
    for name in policy_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(built.files[name])

    system = system_from_workstation(loaded.workstation)
    source_policy = load_spec_policy(loaded)
    built_policy = load_policy_dir(out / "policy")
    assert source_policy.errors == built_policy.errors == ()
    decisions = {}
    for service in REQUESTS:
        for policy in (source_policy, built_policy):
            decision = evaluate(
                policy,
                system,
                untrusted_service=service,
                untrusted_argument="",
                source="work",
                untrusted_target="vault",
            ).as_json()
            assert decisions.setdefault(service, decision) == decision
    assert {service: (d["action"], d["rule"]) for service, d in decisions.items()} == {
        "qnix.Gpg": ("allow", "services/gpg:1"),
        "qnix.Filemove": ("ask", "more/10-moves.policy:1"),
        "qnix.Clipboard": ("allow", "include/admin:1"),
        "qnix.Filecopy": ("deny", "30-office.policy:5"),
        "qnix.Other": ("deny", None),
    }
