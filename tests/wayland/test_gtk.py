"""A GTK4 window (the cairo renderer: no GPU) through a compartment's filter: it opens, and sway
knows it by the app id the filter gave it; the control, the same window on the raw socket,
keeps its own."""

from __future__ import annotations

from tests.wayland.desktop import Desktop


def test_a_gtk4_window_opens_through_the_filter(desktop: Desktop) -> None:
    raw = desktop.gtk_window(desktop.run, "org.example.Raw", "plain")
    window = desktop.window("org.example.Raw")
    assert (window["app_id"], window["name"]) == ("org.example.Raw", "plain")
    desktop.close_window(raw, "org.example.Raw")

    folder = desktop.filter("gtk")
    app = desktop.gtk_window(folder, "org.example.Gtk", "a gtk window")
    assert app.stdout is not None
    assert app.stdout.readline() == b"frame\n"  # its first frame came through
    window = desktop.window("qnix-gtk.")
    assert (window["app_id"], window["name"]) == ("qnix-gtk.org.example.Gtk", "[gtk] a gtk window")
    desktop.close_window(app, "qnix-gtk.org.example.Gtk")
    assert desktop.filters["gtk"].poll() is None
    assert desktop.filter_log("gtk") == ""
