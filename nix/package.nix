# The qnix package: the Python application of pyproject.toml, its dependencies from nixpkgs, and
# the tools it runs on its PATH. `nix build .#qnix` (flake.nix) or `pkgs.callPackage`.
{
  lib,
  python3Packages,
  fetchPypi,
  libseccomp,
  age,
  aide,
  bubblewrap,
  btrfs-progs,
  e2fsprogs,
  git,
  gnupg,
  iproute2,
  nebula,
  nftables,
  openssh,
  pass,
  procps,
  util-linux,
}:
let
  pyproject = lib.importTOML ../pyproject.toml;
  # pyseccomp (a ctypes binding of libseccomp) is not in nixpkgs; nixpkgs' own `seccomp`
  # (pkgs/development/python-modules/seccomp) is another module name. Pinned as nixpkgs pins
  # PyPI sources: the sdist's hash (docs/install.md says how to compute it for a new version).
  pyseccomp = python3Packages.buildPythonPackage rec {
    pname = "pyseccomp";
    version = "0.1.2";
    pyproject = true;
    src = fetchPypi {
      inherit pname version;
      hash = "sha256-DVTvrPcb2kvf0hIz9URLcwy+z1k9YC95bmQSqGgiWL0=";
    };
    build-system = [ python3Packages.setuptools python3Packages.wheel ];
    # ctypes.util.find_library finds nothing on NixOS: the library by its store path.
    postPatch = ''
      substituteInPlace pyseccomp.py --replace-fail \
        'ctypes.util.find_library("seccomp")' '"${lib.getLib libseccomp}/lib/libseccomp.so.2"'
    '';
    pythonImportsCheck = [ "pyseccomp" ];
  };
in
python3Packages.buildPythonApplication {
  pname = "qnix";
  inherit (pyproject.project) version;
  pyproject = true;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml ../README.md ../qnix ];
  };
  build-system = [ python3Packages.setuptools ];
  # Each from nixpkgs: pkgs/development/python-modules/{pydantic,click,rich,pyroute2,qrcode}/default.nix;
  # nftables is libnftables' own binding, built from the nftables package
  # (pkgs/top-level/python-packages.nix: nftables = callPackage
  # ../os-specific/linux/nftables/python.nix), the module PyPI's ansibleguy-nftables copies.
  dependencies = [
    python3Packages.click
    python3Packages.nftables
    python3Packages.pydantic
    python3Packages.pyroute2
    python3Packages.qrcode
    python3Packages.rich
    pyseccomp
  ];
  pythonRemoveDeps = [ "ansibleguy-nftables" ];
  # pyproject.toml bounds pyroute2 below 0.10 for pip; nixpkgs moves it with its own tests.
  pythonRelaxDeps = [ "pyroute2" ];
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [
      age
      aide
      bubblewrap
      btrfs-progs
      e2fsprogs
      git
      gnupg
      iproute2
      nebula
      nftables
      openssh
      pass
      procps
      util-linux
    ])
  ];
  # The tests make namespaces, veths and nft tables as root: `make test`, not the sandbox.
  doCheck = false;
  pythonImportsCheck = [ "qnix" ];
  meta = {
    description = pyproject.project.description;
    license = lib.licenses.asl20;
    mainProgram = "qnix";
    platforms = lib.platforms.linux;
  };
}
