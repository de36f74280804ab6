"""`qnix apply` on a host that is not NixOS writes the menu entries and the label colours'
window rules under the desktop root, a second apply changes nothing, and apply and down remove
what it wrote and no longer wants — and nothing else in those folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qnix.compile.desktop import hyprland_rules, sway_fragment
from qnix.compile.inputs import load
from tests.runtime.livehost import LiveHost

SPEC = """\
[host]
hostname = "lab"
subnet = "10.204.0.0/16"

[compartments.work]
label = "blue"
gui = true
apps = ["firefox"]
memory_mb = 128

[compartments.vault]
label = "black"
apps = ["keepassxc"]
memory_mb = 128
"""
WITHOUT_GUI = """\
[host]
hostname = "lab"
subnet = "10.204.0.0/16"

[compartments.vault]
label = "black"
apps = ["keepassxc"]
memory_mb = 128
"""


@pytest.fixture()
def host() -> Iterator[LiveHost]:
    live = LiveHost()
    try:
        yield live
    finally:
        live.close()


def files(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_apply_writes_the_desktop_files_and_down_removes_them(host: LiveHost) -> None:
    root = host.paths.desktop_root
    prefix = host.prefix
    # A file of someone else's in the same folder stays.
    theirs = root / "usr/local/share/applications/firefox.desktop"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("[Desktop Entry]\nName=Firefox\n")

    spec = host.spec(SPEC)
    out = host.ok("apply", str(spec))
    ws = load(spec).workstation
    applications = "usr/local/share/applications"
    assert files(root) == {
        f"etc/qnix/{prefix}labels.conf": hyprland_rules(ws),
        f"etc/sway/config.d/50-{prefix}labels.conf": sway_fragment(ws),
        f"{applications}/firefox.desktop": "[Desktop Entry]\nName=Firefox\n",
        f"{applications}/{prefix}vault-keepassxc.desktop": "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=[vault] keepassxc\n"
        "Exec=qnix run vault -- keepassxc\n"
        "Terminal=false\n",
        f"{applications}/{prefix}work-firefox.desktop": "[Desktop Entry]\n"
        "Type=Application\n"
        "Name=[work] firefox\n"
        "Exec=qnix run --gui work -- firefox\n"
        "Terminal=false\n",
    }
    assert f"wrote {root}/{applications}/{prefix}work-firefox.desktop" in out.splitlines()
    assert host.ok("apply", str(spec)).splitlines()[0] == "no changes"

    # work leaves the spec: its entry and the rules go, vault's entry stays.
    out = host.ok("apply", str(host.spec(WITHOUT_GUI)))
    assert f"removed {root}/etc/sway/config.d/50-{prefix}labels.conf" in out.splitlines()
    assert sorted(files(root)) == [
        f"{applications}/firefox.desktop",
        f"{applications}/{prefix}vault-keepassxc.desktop",
    ]

    host.ok("down")
    assert files(root) == {f"{applications}/firefox.desktop": "[Desktop Entry]\nName=Firefox\n"}
