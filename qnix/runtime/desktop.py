"""The desktop's files on a host that is not NixOS (docs/gui.md "Colours and menus"): a menu
entry per spec app in the XDG applications folder, and the label colours' window rules where
sway includes them (and a Hyprland config can source them). `qnix apply` brings them to the
spec and `qnix down` removes them; each file is named with the instance's namespace prefix, so
qnix removes only what it wrote, and two instances never touch each other's. On NixOS the
flake's desktop module installs the same files, and nothing is written here.
"""

from __future__ import annotations

from pathlib import Path

from qnix.compile.desktop import (
    desktop_entries,
    gui_compartments,
    hyprland_rules,
    hyprland_rules_name,
    sway_fragment,
    sway_fragment_name,
)
from qnix.runtime.files import atomic_write, glob_escape
from qnix.runtime.paths import DEFAULT_DESKTOP_ROOT, RuntimePaths
from qnix.spec.model import Workstation

# NixOS marks itself with this file; its desktop files come from the flake.
NIXOS_MARK = Path("/etc/NIXOS")


def managed_by_nixos(paths: RuntimePaths) -> bool:
    return paths.desktop_root == DEFAULT_DESKTOP_ROOT and NIXOS_MARK.exists()


def wanted_files(paths: RuntimePaths, ws: Workstation | None) -> dict[Path, str]:
    """The desktop's files `ws` wants (None: none), by path."""
    if ws is None:
        return {}
    prefix = paths.netns_prefix
    wanted = {
        paths.applications_dir / name: text for name, text in desktop_entries(ws, prefix).items()
    }
    if gui_compartments(ws):
        wanted[paths.sway_config_dir / sway_fragment_name(prefix)] = sway_fragment(ws)
        wanted[paths.hyprland_rules_dir / hyprland_rules_name(prefix)] = hyprland_rules(ws)
    return wanted


def written_files(paths: RuntimePaths) -> list[Path]:
    """The desktop's files this instance has written (and not yet removed)."""
    prefix = paths.netns_prefix
    candidates = [
        *paths.applications_dir.glob(f"{glob_escape(prefix)}*.desktop"),
        paths.sway_config_dir / sway_fragment_name(prefix),
        paths.hyprland_rules_dir / hyprland_rules_name(prefix),
    ]
    return sorted(p for p in candidates if p.is_file() and not p.is_symlink())


def sync(paths: RuntimePaths, ws: Workstation | None) -> list[str]:
    """The desktop's files brought to `ws` (None: all removed); what changed."""
    if managed_by_nixos(paths):
        return []
    wanted = wanted_files(paths, ws)
    changes = []
    for path in written_files(paths):
        if path not in wanted:
            path.unlink()
            changes.append(f"removed {path}")
    for path, text in sorted(wanted.items()):
        try:
            if path.read_text() == text:
                continue
        except FileNotFoundError:
            pass
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(path, text.encode(), 0o644)
        changes.append(f"wrote {path}")
    return changes
