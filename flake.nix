{
  description = "procurator: a declarative control plane for microVMs whose images are Nix store paths";

  # nixos-25.05: the stable release whose Python set has pycapnp 2.x, trio,
  # httpx, pyroute2 and prometheus-client. No flake.lock is committed yet:
  # nixpkgs cannot be fetched on the machines this was written on, so the
  # first `nix build` locks the branch's current head (see docs/NIX.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # cloud-hypervisor runs on these; QEMU on both as well.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      mkVmImage = import ./nix/lib/mk-vm-image.nix { inherit nixpkgs; };

      # The image every example and check boots: a minimal NixOS that takes
      # the worker's address, prints a readiness marker on the serial console
      # and answers HTTP on port 80, like the offline test image.
      testVmModule =
        { pkgs, ... }:
        {
          networking.hostName = "procurator-test-vm";
          networking.firewall.allowedTCPPorts = [ 80 ];
          documentation.enable = false;
          system.stateVersion = "25.05";

          systemd.services.procurator-test-http = {
            description = "HTTP answer of the procurator test VM";
            wantedBy = [ "multi-user.target" ];
            serviceConfig.ExecStart = "${pkgs.busybox}/bin/httpd -f -p 80 -h ${pkgs.writeTextDir "index.html" "procurator test vm\n"}";
          };

          systemd.services.procurator-test-ready = {
            description = "Readiness marker of the procurator test VM";
            wantedBy = [ "multi-user.target" ];
            after = [
              "procurator-guest-address.service"
              "procurator-test-http.service"
            ];
            path = [ pkgs.iproute2 ];
            serviceConfig = {
              Type = "oneshot";
              StandardOutput = "tty";
              TTYPath = "/dev/console";
            };
            script = ''
              addr=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n1)
              echo "PROCURATOR-READY ''${addr:-none}"
            '';
          };
        };
    in
    {
      lib = {
        # mkVmImage { system; modules; } | { nixos; } | { pkgs; kernel; initrd?; disk?; }
        # plus name, vcpus, memoryMib, cmdline, diskSize, extraConfig.
        # See nix/lib/mk-vm-image.nix.
        inherit mkVmImage;

        # Pure (no nixpkgs): what vm-config.json holds, and subnet arithmetic.
        vmConfig = import ./nix/lib/vm-config.nix;
        net = import ./nix/lib/net.nix;

        # The final step of mkVmImage without nixpkgs, for callers that bring
        # their own shell (see nix/lib/assemble-image.nix).
        assembleImage = import ./nix/lib/assemble-image.nix;

        # The offline test image (static busybox + a Debian kernel; no
        # nixpkgs). A function, not a package: its inputs are host paths that
        # scripts/build-test-image.sh fetches (see nix/test-image/default.nix).
        offlineTestImage = import ./nix/test-image;
      };

      overlays.default = final: _prev: {
        procurator = final.callPackage ./nix/lib/package.nix { };
      };

      packages = forAllSystems (
        system: pkgs: {
          default = self.packages.${system}.procurator;
          procurator = pkgs.callPackage ./nix/lib/package.nix { };
          testVmImage = mkVmImage {
            name = "procurator-test-vm";
            inherit system;
            modules = [ testVmModule ];
            vcpus = 1;
            memoryMib = 512;
          };
        }
      );

      nixosModules = {
        master = ./nix/modules/master.nix;
        worker = ./nix/modules/worker.nix;
        # For the systems inside VMs; mkVmImage adds it to `modules` itself.
        guest = ./nix/modules/guest.nix;
        default = {
          imports = [
            ./nix/modules/master.nix
            ./nix/modules/worker.nix
          ];
        };
      };

      checks = forAllSystems (
        system: _pkgs: {
          inherit (self.packages.${system}) procurator testVmImage;
        }
      );

      devShells = forAllSystems (
        _system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3.withPackages (
                ps:
                with ps;
                [
                  pycapnp
                  trio
                  httpx
                  pyroute2
                  prometheus-client
                  pytest
                  pytest-trio
                  hypothesis
                  openapi-core
                  pyyaml
                  mypy
                  hatchling
                ]
                # Not in every nixpkgs release; `make check` installs it into
                # .venv where it is missing.
                ++ lib.optional (ps ? import-linter) ps.import-linter
              ))
              pkgs.ruff
              pkgs.nix
              pkgs.qemu_kvm
              pkgs.cloud-hypervisor
              pkgs.prometheus
              pkgs.nftables
              pkgs.iproute2
              pkgs.cpio
              pkgs.pkgsStatic.busybox
            ];
          };
        }
      );
    };
}
