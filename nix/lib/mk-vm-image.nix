# `lib.mkVmImage`: build a procurator VM image, the store path a fleet file
# names and a worker boots:
#
#   $out/vm-config.json   cloud-hypervisor VmConfig naming the files below
#                         by absolute path inside $out
#   $out/vmlinux          kernel (x86_64: the PVH-bootable ELF vmlinux;
#                         aarch64: the Image)
#   $out/initrd           initramfs (if any)
#   $out/disk.img         raw root disk (if any); the worker boots a private
#                         writable copy of it, the store copy stays read-only
#
# Three ways to call it (exactly one of `modules`, `nixos`, `kernel`):
#
#   mkVmImage { system = "x86_64-linux"; modules = [ ./web.nix ]; }
#       a NixOS system from modules; nixosModules.guest is added and enabled.
#   mkVmImage { nixos = nixpkgs.lib.nixosSystem { ... }; }
#       an evaluated NixOS system, which must import nixosModules.guest and
#       set procurator.guest.enable (checked, with a message saying so).
#   mkVmImage { pkgs = ...; kernel = "${k}/vmlinux"; initrd = ...; disk = ...; }
#       files you built yourself: paths (strings) of the files, not packages.
#
# Common arguments: name, vcpus (1), memoryMib (512), cmdline (NixOS: appended
# to NixOS's own parameters; files: the whole command line), extraConfig
# (more VmConfig keys, e.g. rng or balloon; vm-config.nix refuses keys the
# worker owns). NixOS only: diskSize (MiB, or "auto": the closure plus
# make-disk-image's additionalSpace).
#
# The pure part (what vm-config.json contains) is vm-config.nix; the final
# step is assemble-image.nix. Only this file needs nixpkgs.
{
  # The flake's nixpkgs input (for nixosSystem and a default pkgs), or null
  # when used without the flake (then pass `nixos` or `pkgs`).
  nixpkgs ? null,
}:
{
  name ? "procurator-vm",
  system ? null,
  pkgs ? null,
  modules ? null,
  nixos ? null,
  kernel ? null,
  initrd ? null,
  disk ? null,
  cmdline ? null,
  vcpus ? 1,
  memoryMib ? 512,
  diskSize ? "auto",
  extraConfig ? { },
}:
let
  fail = msg: throw "procurator.mkVmImage (${name}): ${msg}";

  forms = builtins.filter (form: form != null) [
    (if modules != null then "modules" else null)
    (if nixos != null then "nixos" else null)
    (if kernel != null then "kernel" else null)
  ];
  form =
    if builtins.length forms == 1 then
      builtins.head forms
    else if forms == [ ] then
      fail "pass one of `modules` (NixOS modules), `nixos` (an evaluated NixOS system) or `kernel` (with optional `initrd` and `disk`)"
    else
      fail "pass only one of `modules`, `nixos`, `kernel`; got ${builtins.concatStringsSep " and " forms}";

  needNixpkgs =
    what:
    if nixpkgs == null then fail "${what} needs nixpkgs; call it through the flake's lib" else nixpkgs;

  cmdlineWords =
    if cmdline == null then
      [ ]
    else if builtins.isList cmdline then
      cmdline
    else
      [ cmdline ];

  evaluated =
    if form == "modules" then
      (needNixpkgs "`modules`").lib.nixosSystem {
        modules = [
          ../modules/guest.nix
          (
            { lib, ... }:
            {
              procurator.guest.enable = true;
              nixpkgs.hostPlatform = lib.mkIf (system != null) (lib.mkDefault system);
            }
          )
        ] ++ modules;
      }
    else
      nixos;

  fromNixos =
    let
      config = evaluated.config;
      guestPkgs = evaluated.pkgs;
      inherit (guestPkgs.stdenv) hostPlatform;
      diskImage = import "${guestPkgs.path}/nixos/lib/make-disk-image.nix" {
        pkgs = guestPkgs;
        inherit (guestPkgs) lib;
        inherit config diskSize;
        name = "${name}-disk";
        format = "raw";
        # The ext4 file system straight on the disk, labelled as
        # nixosModules.guest expects; no bootloader, no channel copy.
        partitionTableType = "none";
        fsType = "ext4";
        label = "nixos";
        installBootLoader = false;
        copyChannel = false;
      };
    in
    if !(config.procurator.guest.enable or false) then
      fail "the NixOS system does not enable procurator.guest: add the flake's nixosModules.guest to its modules and set procurator.guest.enable = true (or pass `modules` instead, which does both)"
    else
      {
        pkgs = guestPkgs;
        # cloud-hypervisor boots x86_64 guests from the uncompressed ELF
        # (PVH entry point), which NixOS keeps in the kernel's dev output.
        kernel =
          if hostPlatform.isx86_64 then
            "${config.boot.kernelPackages.kernel.dev}/vmlinux"
          else
            "${config.system.build.kernel}/${config.system.boot.loader.kernelFile}";
        initramfs = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";
        disk = "${diskImage}/nixos.img";
        cmdline = [
          "init=${config.system.build.toplevel}/init"
        ] ++ config.boot.kernelParams ++ cmdlineWords;
      };

  fromFiles =
    if diskSize != "auto" then
      fail "diskSize applies only to disks built from a NixOS system; size your own disk image yourself"
    else
      {
        pkgs =
          if pkgs != null then
            pkgs
          else if system != null then
            (needNixpkgs "`kernel` without `pkgs`").legacyPackages.${system}
          else
            fail "with `kernel`, pass `pkgs` or `system` (for the shell that assembles the image)";
        inherit kernel disk;
        initramfs = initrd;
        cmdline = cmdlineWords;
      };

  parts = if form == "kernel" then fromFiles else fromNixos;

  image = import ./assemble-image.nix {
    inherit name;
    inherit (parts.pkgs.stdenv.hostPlatform) system;
    shell = [ parts.pkgs.runtimeShell ];
    path = "${parts.pkgs.coreutils}/bin";
    inherit (parts)
      kernel
      initramfs
      disk
      cmdline
      ;
    inherit vcpus memoryMib extraConfig;
  };
in
# `nixos` is the evaluated guest system, for inspection
# (`nix eval .#vms.web.nixos.config.networking.hostName`).
if form == "kernel" then image else image // { nixos = evaluated; }
