# What a procurator VM image is, as pure Nix: builtins only, no nixpkgs and no
# derivations, so it evaluates anywhere (`nix-instantiate --eval`, `nix eval
# --expr`) and the test suite can check it on machines that cannot fetch
# nixpkgs.
#
# The image contract (DESIGN.md, "Image"): a store path holding
# `vm-config.json`, a cloud-hypervisor `VmConfig` whose kernel, initramfs and
# disk paths are absolute paths into the image's closure or relative to the
# image directory, next to the files they name.
#
# Invariants of every config built here:
#   - `payload.kernel` is set; `cpus.boot_vcpus == cpus.max_vcpus == vcpus`;
#     `memory.size` is in bytes (cloud-hypervisor's unit), from `memoryMib`.
#   - vCPUs and memory lie within the bounds the worker enforces
#     (procurator/core/validation.py `Limits`), so an out-of-range image fails
#     at evaluation instead of on every worker it is pushed to.
#   - Nothing host-facing: the worker owns the API socket, the tap and MAC
#     (`net`), serial/console files and vsock; keys that reach host resources
#     (VFIO `devices`, `vdpa`, `user_devices`, vhost-user, `fs`, `pmem`, ...)
#     are refused by the worker. `mkVmConfig` rejects both kinds in
#     `extraConfig` with a message naming the key.
#   - The only disk gets the stable device id `disk0`, so `vm.counters` names
#     it the same way on every VM (the worker's metrics rely on stable ids).
let
  # File names inside an image directory. mk-vm-image.nix and
  # assemble-image.nix use the same names, so the config and the files agree.
  layout = {
    config = "vm-config.json";
    kernel = "vmlinux";
    initramfs = "initrd";
    disk = "disk.img";
  };

  # Mirrors procurator/core/validation.py `Limits` (vCPUs, memory).
  limits = {
    minVcpus = 1;
    maxVcpus = 256;
    minMemoryMib = 16;
    maxMemoryMib = 1048576;
  };

  # Keys the worker sets itself for every VM: an image must leave them out.
  workerOwnedKeys = [
    "net"
    "serial"
    "console"
    "debug_console"
    "vsock"
  ];

  # Keys that would let an image reach host resources beyond its closure; the
  # worker refuses any image that sets them.
  hostReachingKeys = [
    "devices"
    "user_devices"
    "vdpa"
    "fs"
    "pmem"
    "generic_vhost_user"
    "tpm"
    "landlock_rules"
  ];

  # Keys mkVmConfig computes from its own arguments.
  computedKeys = [
    "cpus"
    "memory"
    "payload"
    "disks"
  ];

  fail = msg: throw "procurator.mkVmConfig: ${msg}";

  show = value: if builtins.isString value then ''"${value}"'' else builtins.toJSON value;

  isPathString = value: builtins.isString value && value != "";

  joinCmdline =
    cmdline:
    if builtins.isString cmdline then
      cmdline
    else if builtins.isList cmdline && builtins.all builtins.isString cmdline then
      builtins.concatStringsSep " " (builtins.filter (word: word != "") cmdline)
    else
      fail "cmdline must be a string or a list of strings, got ${builtins.typeOf cmdline}";

  checkInt =
    name: value: low: high:
    if !(builtins.isInt value) then
      fail "${name} must be an integer, got ${builtins.typeOf value} ${show value}"
    else if value < low || value > high then
      fail "${name} = ${toString value} is out of range [${toString low}, ${toString high}]"
    else
      value;

  checkExtra =
    extraConfig:
    let
      keys = builtins.attrNames extraConfig;
      clash = list: builtins.filter (key: builtins.elem key list) keys;
      owned = clash workerOwnedKeys;
      hostly = clash hostReachingKeys;
      computed = clash computedKeys;
    in
    if !(builtins.isAttrs extraConfig) then
      fail "extraConfig must be an attribute set, got ${builtins.typeOf extraConfig}"
    else if owned != [ ] then
      fail "extraConfig sets ${builtins.concatStringsSep ", " owned}: the worker sets these for every VM (tap, MAC, console files), an image must not"
    else if hostly != [ ] then
      fail "extraConfig sets ${builtins.concatStringsSep ", " hostly}: these reach host resources outside the image and the worker refuses them"
    else if computed != [ ] then
      fail "extraConfig sets ${builtins.concatStringsSep ", " computed}: use the kernel, initramfs, cmdline, disk, vcpus and memoryMib arguments instead"
    else
      extraConfig;

  # The VmConfig of one image, as an attribute set (builtins.toJSON it for the
  # file). Paths are taken as given: absolute store paths, or names relative to
  # the image directory (see `layout`).
  mkVmConfig =
    {
      kernel,
      initramfs ? null,
      cmdline ? "",
      disk ? null,
      vcpus ? 1,
      memoryMib ? 512,
      extraConfig ? { },
    }:
    let
      cmdlineText = joinCmdline cmdline;
      checkedVcpus = checkInt "vcpus" vcpus limits.minVcpus limits.maxVcpus;
      checkedMemory = checkInt "memoryMib" memoryMib limits.minMemoryMib limits.maxMemoryMib;
      payload =
        { kernel = kernel; }
        // (if initramfs == null then { } else { initramfs = initramfs; })
        // (if cmdlineText == "" then { } else { cmdline = cmdlineText; });
    in
    if !(isPathString kernel) then
      fail "kernel must be a non-empty path string, got ${builtins.typeOf kernel} ${show kernel}"
    else if initramfs != null && !(isPathString initramfs) then
      fail "initramfs must be null or a non-empty path string, got ${show initramfs}"
    else if disk != null && !(isPathString disk) then
      fail "disk must be null or a non-empty path string, got ${show disk}"
    else
      {
        cpus = {
          boot_vcpus = checkedVcpus;
          max_vcpus = checkedVcpus;
        };
        memory = {
          size = checkedMemory * 1024 * 1024;
        };
        inherit payload;
      }
      // (if disk == null then { } else { disks = [ { path = disk; id = "disk0"; } ]; })
      // checkExtra extraConfig;

  # The paths of an image's files under `dir` (an image directory, e.g.
  # `builtins.placeholder "out"` inside the derivation that builds it).
  imagePaths =
    dir:
    builtins.mapAttrs (_: file: "${dir}/${file}") layout;
in
{
  inherit
    layout
    limits
    workerOwnedKeys
    hostReachingKeys
    mkVmConfig
    imagePaths
    ;

  # `vm-config.json`'s text for the same arguments as mkVmConfig.
  mkVmConfigJSON = args: builtins.toJSON (mkVmConfig args);
}
