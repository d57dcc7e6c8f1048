# NixOS module for the inside of a procurator VM: what a NixOS system needs to
# boot from an image built by `lib.mkVmImage` and to take the address the
# worker gives it.
#
# How such a VM boots: the VMM (cloud-hypervisor, or QEMU -M microvm) loads
# the kernel and NixOS's initrd directly, with no bootloader; the root file
# system is the image's raw ext4 disk (no partition table, label "nixos"),
# which the worker attaches as the first virtio-blk disk; stage 1 finds it by
# label, and the kernel command line names the system's `init`.
#
# Networking: the worker allocates each VM a stable IPv4 address and appends
# `ip=<addr>::<gateway>:<netmask>:<vm id>:eth0:off` to the kernel command
# line (procurator/core/netnames.py). Stock NixOS kernels build virtio_net as
# a module, so the kernel's own ip= autoconfiguration cannot apply it; the
# `procurator-guest-address` unit does, with nix/lib/guest-address.sh, once
# the interface exists. Interface names are kept classic (eth0) so the name
# on the command line is the name in the guest.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.procurator.guest;
  device = "sys-subsystem-net-devices-${utils.escapeSystemdPath cfg.interface}.device";
in
{
  options.procurator.guest = {
    enable = lib.mkEnableOption ''
      running this NixOS system as a procurator VM: direct kernel boot, the
      root file system on the image's virtio disk (label "nixos"), a serial
      console, and the address the worker passes in the kernel command line
      (ip=) applied to the VM's network interface. `lib.mkVmImage` enables it
      for the modules it is given, and refuses a NixOS system that lacks it
    '';

    interface = lib.mkOption {
      type = lib.types.str;
      default = "eth0";
      description = ''
        The guest network interface that gets the worker-assigned address when
        the ip= parameter names no device. Predictable interface names are
        turned off, so the VM's only virtio-net device is eth0.
      '';
    };

    console = lib.mkOption {
      type = lib.types.str;
      default = if pkgs.stdenv.hostPlatform.isAarch64 then "ttyAMA0" else "ttyS0";
      defaultText = lib.literalExpression ''if aarch64 then "ttyAMA0" else "ttyS0"'';
      description = ''
        The kernel console (console= on the command line). The worker sends
        the VM's serial port to a per-VM log file, so this is where boot
        messages end up.
      '';
    };

    configureAddress = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether to apply the worker-assigned address (ip= on the kernel command
        line) to the interface at boot. Turn off to configure the network
        yourself (e.g. with systemd-networkd).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # The VMM loads kernel and initrd itself: no bootloader to install.
    boot.loader.grub.enable = false;
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_mmio"
      "virtio_blk"
      "virtio_net"
      "virtio_console"
      "virtio_rng"
    ];
    boot.kernelParams = [ "console=${cfg.console}" ];

    # mkVmImage builds the disk with make-disk-image's partitionTableType
    # "none" and label "nixos".
    fileSystems."/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
    };

    networking.usePredictableInterfaceNames = false;
    networking.useDHCP = lib.mkDefault false;

    systemd.services.procurator-guest-address = lib.mkIf cfg.configureAddress {
      description = "Apply the procurator worker's ip= address to ${cfg.interface}";
      wantedBy = [
        "multi-user.target"
        "network-online.target"
      ];
      before = [
        "network-online.target"
        "network.target"
      ];
      # Runs once the interface exists, and again if it is re-created.
      bindsTo = [ device ];
      after = [ device ];
      path = [ pkgs.iproute2 ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${pkgs.runtimeShell} ${../lib/guest-address.sh} --interface ${lib.escapeShellArg cfg.interface}";
      };
    };
  };
}
