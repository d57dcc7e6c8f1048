"""The NixOS modules' own expressions, evaluated against a stub ``lib``.

nixpkgs cannot be fetched here, so the modules cannot be evaluated inside a
real NixOS. What can be checked honestly without it (see stub-lib.nix for
what the stub does and does not do):

- every option is documented, and the defaults are the documented ones;
- the worker id pattern is the worker's own (``WORKER_ID_RE``);
- the argv each unit runs is accepted by the real ``procurator`` command
  line parser, except for flags the CLI does not have yet (listed below and
  reported; the list must shrink to empty, and this test fails as soon as a
  listed flag appears, so the list cannot go stale);
- the unit settings the design relies on (KillMode=process, CAP_NET_ADMIN,
  device access, the VMM on PATH) and the declarative bridge/NAT.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from flakehelpers import NIX_MODULES, STUB_LIB, Nix, nix_path

from procurator.cli import build_parser
from procurator.core.validation import WORKER_ID_RE
from procurator.worker import cgroups, jail

pytestmark = pytest.mark.nix

STORE = "/nix/store/00000000000000000000000000000000"
PACKAGE = f"{STORE}-procurator"
CLOUD_HYPERVISOR = f"{STORE}-cloud-hypervisor"
QEMU = f"{STORE}-qemu"
NIX_PACKAGE = f"{STORE}-nix"

PKGS = f"""{{
  callPackage = _: _: "{PACKAGE}";
  cloud-hypervisor = "{CLOUD_HYPERVISOR}";
  qemu_kvm = "{QEMU}";
  iproute2 = "{STORE}-iproute2";
  runtimeShell = "/bin/sh";
  stdenv.hostPlatform = {{ isAarch64 = false; }};
}}"""

# Flags the modules pass that procurator/cli does not accept yet. The
# worker needs them to run the driver, bridge, subnet and exporter the
# module configures; each must be added to the CLI (and removed from here).
# Flags a unit passes that the CLI does not know yet (none: keep it so).
PENDING_CLI_FLAGS: dict[str, set[str]] = {"master": set(), "worker": set()}


def evaluate(nix: Nix, module: str, settings: dict[str, Any], networkd: bool = False) -> Any:
    """``{options, config}`` of ``nix/modules/<module>.nix`` for the given
    option values (merged over the module's own defaults)."""
    section = {"master": "services.procurator.master", "worker": "services.procurator.worker"}
    attr = section.get(module, "procurator.guest")
    return nix.eval(
        f"""let
          lib = import {nix_path(STUB_LIB)};
          module = import {nix_path(NIX_MODULES / f"{module}.nix")};
          pkgs = {PKGS};
          utils.escapeSystemdPath = s: s;
          settings = builtins.fromJSON {json.dumps(json.dumps(settings))};
          declared = (module {{ inherit lib pkgs utils; config = base; }}).options.{attr};
          base = {{
            networking.hostName = "host-a";
            networking.useNetworkd = {"true" if networkd else "false"};
            nix.package = "{NIX_PACKAGE}";
          }};
          config = base // lib.setAttrByPath "{attr}" ((lib.defaultsOf declared) // settings);
          result = module {{ inherit lib pkgs utils config; }};
          described = path: value:
            if value ? _type
            then [ {{ inherit path; description = value.description or ""; }} ]
            else builtins.concatLists (builtins.attrValues
              (builtins.mapAttrs (n: v: described "${{path}}.${{n}}" v) value));
          packages = [ "package" "cloudHypervisorPackage" "qemuPackage" ];
        in {{
          options = described "{attr}" declared;
          defaults = lib.defaultsOf (builtins.removeAttrs declared packages);
          idPattern = declared.id.type.regex or null;
          config = result.config;
        }}"""
    )


def parse(command: str, argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """Parse with the real CLI; return the namespace and the flags it rejected."""
    assert argv[0] == f"{PACKAGE}/bin/procurator"
    assert argv[1] == command
    namespace, unknown = build_parser().parse_known_args(argv[1:])
    return namespace, {arg for arg in unknown if arg.startswith("--")}


def test_stub_lib_sets_attr_paths(nix: Nix) -> None:
    # setAttrByPath is the one helper the test itself needs from the stub.
    assert nix.eval(f'(import {nix_path(STUB_LIB)}).setAttrByPath "a.b" 1') == {"a": {"b": 1}}


@pytest.mark.parametrize("module", ["master", "worker", "guest"])
def test_every_option_is_documented(nix: Nix, module: str) -> None:
    settings = {"master": "m.example:7300"} if module == "worker" else {}
    options = evaluate(nix, module, settings)["options"]
    assert len(options) >= 4
    undocumented = [o["path"] for o in options if len(o["description"].strip()) < 20]
    assert undocumented == []


def test_master_defaults_and_argv(nix: Nix) -> None:
    result = evaluate(nix, "master", {"enable": True})
    assert result["defaults"] == {
        "enable": False,
        "listenAddress": "0.0.0.0",
        "port": 7300,
        "metrics": {"listenAddress": "0.0.0.0", "port": 9300},
        "openFirewall": False,
        "tls": {"cert": None, "key": None, "ca": None},
        "database": "/var/lib/procurator-master/master.db",
        "passwordFile": None,
        "masterId": None,
        "monitoring": {
            "prometheus": {"enable": False, "rules": True, "scrape": True},
            "grafana": {"enable": False},
        },
        "extraArgs": [],
    }
    service = result["config"]["systemd"]["services"]["procurator-master"]
    args, rejected = parse("master", service["serviceConfig"]["ExecStart"])
    assert rejected == PENDING_CLI_FLAGS["master"]
    assert args.listen == "0.0.0.0:7300"
    assert args.metrics_listen == "0.0.0.0:9300"
    assert args.db == "/var/lib/procurator-master/master.db"
    unit = service["serviceConfig"]
    assert unit["Restart"] == "always"
    assert unit["DynamicUser"] is True
    assert unit["StateDirectory"] == "procurator-master"
    assert unit["CapabilityBoundingSet"] == [""]
    assert result["config"]["networking"]["firewall"]["allowedTCPPorts"] == {}  # mkIf false


def test_masters_on_postgresql(nix: Nix) -> None:
    """Several hosts, one database: the URL, a password file as a
    credential named by PGPASSFILE, a chosen master id (docs/HA.md)."""
    url = "postgresql://procurator@db.example:5432/procurator"
    result = evaluate(
        nix,
        "master",
        {
            "enable": True,
            "listenAddress": "127.0.0.1",
            "database": url,
            "passwordFile": "/run/secrets/pgpass",
            "masterId": "master-a",
        },
    )
    service = result["config"]["systemd"]["services"]["procurator-master"]
    args, rejected = parse("master", service["serviceConfig"]["ExecStart"])
    assert rejected == PENDING_CLI_FLAGS["master"]
    assert (args.db, args.master_id) == (url, "master-a")
    assert service["environment"]["PGPASSFILE"] == "%d/pgpass"
    assert "pgpass:/run/secrets/pgpass" in service["serviceConfig"]["LoadCredential"]
    assert all(ok for ok, _ in _assertions(result))
    sqlite = evaluate(nix, "master", {"enable": True, "passwordFile": "/run/secrets/pgpass"})
    refused = [message for ok, message in _assertions(sqlite) if not ok]
    assert any("passwordFile needs a postgresql:// database" in m for m in refused)


def test_master_on_a_privileged_port_with_an_open_firewall(nix: Nix) -> None:
    result = evaluate(
        nix, "master", {"enable": True, "port": 443, "listenAddress": "::", "openFirewall": True}
    )
    unit = result["config"]["systemd"]["services"]["procurator-master"]["serviceConfig"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    args, _ = parse("master", unit["ExecStart"])
    assert args.listen == "[::]:443"
    assert result["config"]["networking"]["firewall"]["allowedTCPPorts"] == [443, 9300]


def test_worker_defaults(nix: Nix) -> None:
    result = evaluate(nix, "worker", {"master": "m.example:7300"})
    defaults = result["defaults"]
    assert defaults["id"] == "host-a"  # networking.hostName
    assert defaults["driver"] == "cloud-hypervisor"
    assert defaults["network"] == {
        "bridge": "br-procurator",
        "subnet": "10.120.0.0/24",
        "configureHost": True,
        "nat": {"enable": True, "externalInterface": None},
        "trustBridge": False,
    }
    assert defaults["metrics"] == {"listenAddress": "0.0.0.0", "port": 9301}
    assert result["idPattern"] == WORKER_ID_RE.pattern


def test_worker_unit(nix: Nix) -> None:
    result = evaluate(nix, "worker", {"enable": True, "master": "m.example:7300", "id": "host-b"})
    config = result["config"]
    service = config["systemd"]["services"]["procurator-worker"]
    unit = service["serviceConfig"]

    args, rejected = parse("worker", unit["ExecStart"])
    assert rejected == PENDING_CLI_FLAGS["worker"]
    assert (args.driver, args.bridge, args.subnet, args.metrics_listen) == (
        "cloud-hypervisor",
        "br-procurator",
        "10.120.0.0/24",
        "0.0.0.0:9301",
    )
    assert (args.id, args.master, args.state_dir) == (
        "host-b",
        "m.example:7300",
        "/var/lib/procurator-worker",
    )
    argv = unit["ExecStart"]
    for flag, value in [
        ("--driver", "cloud-hypervisor"),
        ("--bridge", "br-procurator"),
        ("--subnet", "10.120.0.0/24"),
        ("--metrics-listen", "0.0.0.0:9301"),
    ]:
        assert argv[argv.index(flag) + 1] == value

    # VMMs outlive the worker. It jails each VMM (docs/SECURITY.md): root,
    # with exactly the capabilities the jail needs (those the worker checks
    # at start), and the cgroup controllers delegated to it.
    assert unit["KillMode"] == "process"
    assert unit["Restart"] == "always"
    assert "User" not in unit and "AmbientCapabilities" not in unit
    assert sorted(unit["CapabilityBoundingSet"]) == sorted(jail.NEEDED_CAPABILITIES)
    assert sorted(unit["Delegate"].split()) == sorted(cgroups.CONTROLLERS)
    assert unit["DelegateSubgroup"] == "worker"
    assert not unit.get("ProtectControlGroups", False)
    assert {"/dev/kvm rw", "/dev/net/tun rw"} <= set(unit["DeviceAllow"])
    assert "--unconfined" not in argv
    assert unit["StateDirectory"] == "procurator-worker"
    assert service["path"] == [NIX_PACKAGE, CLOUD_HYPERVISOR]

    # The bridge the worker computes (first host of the subnet), and NAT.
    networking = config["networking"]
    assert networking["bridges"] == {"br-procurator": {"interfaces": []}}
    assert networking["interfaces"]["br-procurator"]["ipv4"]["addresses"] == [
        {"address": "10.120.0.1", "prefixLength": 24}
    ]
    assert networking["nat"]["internalInterfaces"] == ["br-procurator"]
    assert networking["nat"]["internalIPs"] == ["10.120.0.0/24"]
    assert "network" not in config.get("systemd", {})  # scripted networking here


def test_worker_with_qemu_networkd_and_a_custom_subnet(nix: Nix) -> None:
    result = evaluate(
        nix,
        "worker",
        {
            "enable": True,
            "master": "m.example:7300",
            "driver": "qemu",
            "network": {
                "bridge": "br-vms",
                "subnet": "10.121.4.0/22",
                "configureHost": True,
                "nat": {"enable": False, "externalInterface": None},
                "trustBridge": True,
            },
        },
        networkd=True,
    )
    config = result["config"]
    assert config["systemd"]["services"]["procurator-worker"]["path"] == [NIX_PACKAGE, QEMU]
    assert config["networking"]["interfaces"]["br-vms"]["ipv4"]["addresses"] == [
        {"address": "10.121.4.1", "prefixLength": 22}
    ]
    assert config["systemd"]["network"]["networks"]["40-br-vms"] == {
        "networkConfig": {"ConfigureWithoutCarrier": True},
        "linkConfig": {"RequiredForOnline": "no"},
    }
    assert "nat" not in config["networking"]
    assert config["networking"]["firewall"]["trustedInterfaces"] == ["br-vms"]


def test_guest_module(nix: Nix) -> None:
    config = evaluate(nix, "guest", {"enable": True})["config"]
    assert config["fileSystems"]["/"] == {"device": "/dev/disk/by-label/nixos", "fsType": "ext4"}
    assert config["boot"]["kernelParams"] == ["console=ttyS0"]
    assert config["networking"]["usePredictableInterfaceNames"] is False
    service = config["systemd"]["services"]["procurator-guest-address"]
    assert service["serviceConfig"]["ExecStart"].endswith("guest-address.sh --interface eth0")
    assert service["bindsTo"] == ["sys-subsystem-net-devices-eth0.device"]


TLS = {"cert": "/run/keys/p.crt", "key": "/run/keys/p.key", "ca": "/run/keys/ca.crt"}


def _assertions(result: Any) -> list[tuple[bool, str]]:
    return [(a["assertion"], a["message"]) for a in result["config"]["assertions"]]


def test_plaintext_off_loopback_is_an_evaluation_error(nix: Nix) -> None:
    # The CLI refuses it at run time (docs/SECURITY.md); the modules say so
    # when the system is built instead.
    master = _assertions(evaluate(nix, "master", {"enable": True}))
    assert not master[0][0] and "without TLS" in master[0][1]
    assert master[1][0]
    loopback = _assertions(evaluate(nix, "master", {"enable": True, "listenAddress": "127.0.0.1"}))
    assert all(ok for ok, _ in loopback)
    worker = _assertions(evaluate(nix, "worker", {"enable": True, "master": "m.example:7300"}))
    assert not worker[0][0] and "m.example:7300 without TLS" in worker[0][1]
    local = _assertions(evaluate(nix, "worker", {"enable": True, "master": "127.0.0.1:7300"}))
    assert all(ok for ok, _ in local)
    half = _assertions(
        evaluate(
            nix, "worker", {"enable": True, "master": "127.0.0.1:7300", "tls": {**TLS, "ca": None}}
        )
    )
    assert not half[1][0]


def test_tls_files_reach_the_command_line(nix: Nix) -> None:
    for module in ("master", "worker"):
        result = evaluate(nix, module, {"enable": True, "master": "m.example:7300", "tls": TLS})
        assert all(ok for ok, _ in _assertions(result))
        unit = result["config"]["systemd"]["services"][f"procurator-{module}"]["serviceConfig"]
        args, rejected = parse(module, unit["ExecStart"])
        assert rejected == set()
        given = (args.tls_cert, args.tls_key, args.tls_ca)
        if module == "worker":
            assert given == (TLS["cert"], TLS["key"], TLS["ca"])
            continue
        # The master runs as a dynamic user: its files come as credentials,
        # so a root-only key need not be made readable to everyone.
        assert given == ("%d/tls-cert", "%d/tls-key", "%d/tls-ca")
        assert unit["LoadCredential"] == [
            f"tls-cert:{TLS['cert']}",
            f"tls-key:{TLS['key']}",
            f"tls-ca:{TLS['ca']}",
        ]
        assert unit["LimitNOFILE"] >= 65536
