# procurator as a Python application, from nixpkgs' Python packages.
# `pkgs.callPackage ./package.nix { }`; the flake exposes it as
# packages.<system>.default and the NixOS modules use it by default.
#
# The wheel is built by hatchling from pyproject.toml, which force-includes
# schema/procurator.capnp as procurator/schema/procurator.capnp: the daemons
# load the Cap'n Proto schema from their own package at run time.
{
  lib,
  python3Packages,
}:
let
  root = ../..;
  # Only what the wheel is built from: an edit to the tests, the docs or the
  # Nix files does not change the package's store path.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/pyproject.toml")
      (root + "/README.md")
      (root + "/procurator")
      (root + "/schema")
    ];
  };
  pyproject = builtins.fromTOML (builtins.readFile (root + "/pyproject.toml"));
in
python3Packages.buildPythonApplication {
  pname = "procurator";
  inherit (pyproject.project) version;
  pyproject = true;
  inherit src;

  build-system = [ python3Packages.hatchling ];

  dependencies = with python3Packages; [
    pycapnp
    trio
    httpx
    pyroute2
    prometheus-client
  ];

  # pyproject.toml pins pycapnp exactly (the version the suite runs against
  # on PyPI); nixpkgs ships its own 2.x release, whose Python API is the same.
  # The runtime-deps check would otherwise refuse the build.
  pythonRelaxDeps = [ "pycapnp" ];

  nativeCheckInputs = with python3Packages; [
    pytest
    pytest-trio
    hypothesis
    openapi-core
    pyyaml
  ];

  # The suite needs root, network namespaces, taps, nix-store and QEMU, none
  # of which the Nix build sandbox offers; it runs in CI outside Nix (see
  # README "Testing against real peers"). The import check below still
  # catches a wheel that is missing modules or the schema.
  doCheck = false;
  pythonImportsCheck = [
    "procurator"
    "procurator.core.models"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.asl20;
    mainProgram = "procurator";
    platforms = lib.platforms.linux;
  };
}
