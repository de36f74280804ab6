# The tools `make demo` and `make test` need on NixOS (Debian gets them from apt-get).
{ pkgs ? import <nixpkgs> { } }:
pkgs.mkShell {
  packages = with pkgs; [
    # GTK4's introspection for the GUI tests' GTK4 windows (Debian: python3-gi); the venv is
    # made from it too.
    (python311.withPackages (ps: [ ps.pygobject3 ]))
    gtk4
    gobject-introspection
    gnumake
    bubblewrap
    nftables # nft, and libnftables.so.1, which qnix loads from beside it
    nix
    age
    graphviz
    iproute2
    procps
    util-linux
    gnupg
    openssh
    git # qnix pull: fetch, verify-commit (SSH signatures)
    pass
    # imrelp/omrelp and the gtls driver (both on by default in nixpkgs; said here because the
    # forwarding tests need them).
    (rsyslog.override { withRelp = true; withGnutls = true; })
    openssl # the forwarding tests' certificates
    e2fsprogs # chattr
    aide
    btrfs-progs
    qemu
    pkgsStatic.busybox
    wayland # wayland.xml, for the GUI compartments' Wayland filter
    wayland-protocols
    sway # the filter's tests: sway headless, attacked with grim, wtype and wl-clipboard
    grim
    wtype
    wl-clipboard
    foot
    waypipe # VM compartments' GUI apps: its server in the guest, its client on the host
    nebula # remote access per compartment: nebula and nebula-cert
    firejail  # make bench: the nearest peer
  ];
}
