# The tools `make demo` and `make test` need on NixOS (Debian gets them from apt-get).
{ pkgs ? import <nixpkgs> { } }:
pkgs.mkShell {
  packages = with pkgs; [
    python311
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
    rsyslog
    aide
    btrfs-progs
    qemu
    pkgsStatic.busybox
    firejail  # make bench: the nearest peer
  ];
}
