# The tiny test image: an uncompressed stock Debian kernel plus a busybox
# initramfs that brings eth0 up from the kernel command line, prints a
# readiness marker on the serial console and answers ping and HTTP (port
# 80: its service, what guest health checks find). `--arg service false`
# makes the "bad" variant: it boots and answers ping, but never opens port 80
# (docs/ROLLOUTS.md, the rollout tests).
#
# Built offline and without nixpkgs: the builder is a static busybox added to
# the store as a plain file, and every input is a path given by the caller
# (scripts/build-test-image.sh fetches the kernel with apt). Nothing here
# needs the network or a sandbox-provided shell.
#
#   nix-build nix/test-image --arg busybox /bin/busybox \
#     --arg kernel /path/to/vmlinux --arg modules /path/to/modules-dir
#
# The output is an image as the worker expects it (see DESIGN.md "Image"):
#   $out/vm-config.json   cloud-hypervisor VmConfig, paths relative to $out
#   $out/vmlinux          the kernel (PVH-bootable ELF)
#   $out/initrd           gzip'd newc cpio
{
  # A statically linked busybox: the builder, and the guest's whole userland.
  busybox,
  # The uncompressed kernel (the XZ payload of Debian's vmlinuz).
  kernel,
  # A directory holding the guest's modules as <name>.ko (flat), at least
  # virtio_ring virtio virtio_mmio failover net_failover virtio_net.
  modules,
  name ? "procurator-test-vm",
  vcpus ? 1,
  memoryMib ? 256,
  # The worker appends its own parameters (e.g. ip=...) to this.
  cmdline ? "console=ttyS0 quiet panic=-1",
  # The guest's service: busybox httpd on port 80. false: none (the bad variant).
  service ? true,
}:
let
  # busybox picks the applet from argv[0] unless its basename starts with
  # "busybox"; a store file's basename starts with its hash, so the binary
  # goes into a store directory of its own, under its own name.
  bbDir = builtins.path {
    path = dirOf busybox;
    name = "busybox-static";
    filter = path: _type: path == toString busybox;
  };
  bb = "${bbDir}/${baseNameOf busybox}";
  vmConfig = {
    cpus = {
      boot_vcpus = vcpus;
      max_vcpus = vcpus;
    };
    memory = {
      size = memoryMib * 1024 * 1024;
    };
    payload = {
      kernel = "vmlinux";
      initramfs = "initrd";
      inherit cmdline;
    };
  };
in
derivation {
  inherit name;
  system = "x86_64-linux";
  # Nix runs the builder as argv[0] = its store path, so busybox takes the
  # applet from the first argument. Its shell runs applets without PATH.
  builder = bb;
  args = [
    "sh"
    "-eu"
    ./build.sh
  ];
  busybox = bb;
  kernel = builtins.path {
    path = kernel;
    name = "vmlinux";
  };
  modules = builtins.path {
    path = modules;
    name = "test-vm-modules";
  };
  init = ./init;
  powerButton = ./power-button;
  statusCgi = ./status.cgi;
  vmConfig = builtins.toJSON vmConfig;
  # Non-empty: the guest starts no service (/etc/no-service, read by /init).
  noService = if service then "" else "1";
  # Loaded by /init in this order (each needs the ones before it).
  moduleOrder = "virtio_ring virtio virtio_mmio failover net_failover virtio_net virtio_blk virtio-rng evdev button";
}
