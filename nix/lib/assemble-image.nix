# The last step of every procurator VM image: a store path holding the
# kernel, initramfs and disk (as links) and a vm-config.json naming them by
# their absolute path inside this very store path.
#
# Deliberately free of nixpkgs (a bare `derivation`): mk-vm-image.nix calls it
# with bash and coreutils from nixpkgs, and the flake tests build it offline
# with a static busybox, so the step users run is the step tested here.
#
# The config names `$out/vmlinux` etc. through `builtins.placeholder "out"`:
# Nix replaces the placeholder in the builder's environment with the real
# output path, so the JSON holds final store paths although the output path is
# unknown at evaluation time.
{
  name,
  system,
  # The builder and its leading arguments; the script is appended. For example
  # [ "${pkgs.bash}/bin/bash" ], or [ busyboxStorePath "sh" ].
  shell,
  # PATH for the builder: directories providing mkdir and ln. "" for a busybox
  # shell, which runs its own applets.
  path ? "",
  # Store paths of the files (strings with context, e.g. "${kernel.dev}/vmlinux").
  kernel,
  initramfs ? null,
  disk ? null,
  # Passed through to vm-config.nix's mkVmConfig.
  cmdline ? "",
  vcpus ? 1,
  memoryMib ? 512,
  extraConfig ? { },
}:
let
  vmConfigLib = import ./vm-config.nix;
  inherit (vmConfigLib) layout;
  inside = vmConfigLib.imagePaths (builtins.placeholder "out");
  orEmpty = value: if value == null then "" else value;
  vmConfig = vmConfigLib.mkVmConfig {
    kernel = inside.kernel;
    initramfs = if initramfs == null then null else inside.initramfs;
    disk = if disk == null then null else inside.disk;
    inherit
      cmdline
      vcpus
      memoryMib
      extraConfig
      ;
  };
in
if !(builtins.isList shell) || shell == [ ] then
  throw "procurator.assembleImage: shell must be a non-empty list (builder, leading args...)"
else
  derivation {
    inherit name system;
    builder = builtins.head shell;
    args = builtins.tail shell ++ [ ./assemble-image.sh ];
    PATH = path;
    kernel = kernel;
    initramfs = orEmpty initramfs;
    disk = orEmpty disk;
    kernelName = layout.kernel;
    initramfsName = layout.initramfs;
    diskName = layout.disk;
    configName = layout.config;
    vmConfig = builtins.toJSON vmConfig;
    # Links and a small file: not worth a remote builder or a substituter.
    preferLocalBuild = true;
    allowSubstitutes = false;
  }
