{
  description = "qnix: Qubes-style compartments for NixOS and other Linux workstations";

  # nixpkgs only. `nix flake lock` writes flake.lock (it needs the network); `nix flake update`
  # moves the pin (docs/install.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "riscv64-linux" ];
      eachSystem = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = eachSystem (pkgs: {
        qnix = pkgs.callPackage ./nix/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.qnix;
      });

      # nix run . -- check SPEC
      apps = eachSystem (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.qnix}/bin/qnix";
        };
      });

      # What `make test` needs on NixOS (shell.nix, which make uses there, is the same shell).
      devShells = eachSystem (pkgs: {
        default = import ./shell.nix { inherit pkgs; };
      });

      # The qnix services (nix/module.nix, generated from qnix/compile/services.py):
      # `services.qnix.enable = true;` with this flake's package.
      nixosModules.qnix = {
        imports = [ ./nix/module.nix ];
      };
      nixosModules.default = self.nixosModules.qnix;
    };
}
