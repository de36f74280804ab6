"""A GTK4 window for the filter's tests and bench: run with the system's python3 (python3-gi,
gir1.2-gtk-4.0) and GSK_RENDERER=cairo (no GPU).

    python3 gtk_window.py APP_ID TITLE [--stay]

It maps a 256x256 window and, once its first frame is painted and the compositor has answered
a round trip after it (so the frame's commit has been taken), prints `frame`; then it exits, or
with --stay runs until it is ended.
"""

from __future__ import annotations

import sys

import gi

gi.require_version("Gdk", "4.0")
gi.require_version("Gtk", "4.0")
from gi.repository import GLib, Gtk  # noqa: E402


def main(argv: list[str]) -> int:
    app_id, title = argv[0], argv[1]
    stay = "--stay" in argv[2:]
    # Without a GApplication, GTK names the toplevel after the program.
    GLib.set_prgname(app_id)
    Gtk.init()
    loop = GLib.MainLoop()
    window = Gtk.Window(title=title)
    window.set_default_size(256, 256)
    window.set_child(Gtk.Label(label=title))
    window.present()
    clock = window.get_frame_clock()
    assert clock is not None

    def painted(_clock: object) -> None:
        clock.disconnect(handler)
        window.get_display().sync()
        print("frame", flush=True)
        if not stay:
            loop.quit()

    handler = clock.connect("after-paint", painted)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
