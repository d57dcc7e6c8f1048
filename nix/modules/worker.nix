# NixOS module: a procurator worker, one per VM host.
#
# The worker dials the master, receives its assignment and runs one VMM
# process (cloud-hypervisor, or QEMU) per VM, each on its own tap on a bridge.
# It opens no RPC port (it dials out); only its Prometheus exporter listens.
#
# Why the unit looks the way it does:
#
# - VMs must outlive the worker. Each VMM runs in its own session (setsid), so
#   no terminal or process-group signal reaches it, and on start the worker
#   re-adopts running VMMs from its state directory instead of booting them
#   again. systemd would still kill them with the worker: by default stopping
#   or restarting a unit kills every process in its cgroup. KillMode=process
#   limits that to the worker's main process, so `systemctl restart`, a crash
#   with Restart=always, and `nixos-rebuild switch` (which restarts changed
#   units) leave running VMs alone. The VMMs stay in this unit's cgroup, so
#   their CPU and memory still show under procurator-worker.service, and
#   TasksMax is lifted because every vCPU thread of every VM counts there.
#   Stopping the unit therefore does not stop VMs either: apply a fleet
#   without them for that. At system shutdown systemd's final kill ends them.
#
# - Root, with a bounding set of exactly what jailing a VMM takes: the worker
#   runs every VMM jailed (docs/SECURITY.md: a uid of its own from
#   --vmm-uids, mount/pid/IPC namespaces, pivot_root into a root of its own,
#   a cgroup with limits, seccomp), which needs CAP_SYS_ADMIN (namespaces,
#   mounts), CAP_SETUID/SETGID/SETPCAP (dropping to the VM's uid and every
#   capability), CAP_CHOWN and CAP_DAC_OVERRIDE (the VM's own directories,
#   cgroupfs), CAP_MKNOD (the VM's /dev/kvm and /dev/net/tun), CAP_SYS_CHROOT,
#   CAP_SYS_PTRACE (reading a VMM's /proc to see what confines it), CAP_KILL
#   and CAP_NET_ADMIN (the bridge and taps). The worker refuses to start
#   without one of them. The VMMs hold none: each runs as its VM's uid.
#   Device access stays limited to /dev/kvm, /dev/net/tun and /dev/vhost-net.
#
# - Cgroups: the VMs' cgroups are made by the worker, so the unit delegates
#   the memory, cpu and pids controllers and runs the worker in a
#   sub-cgroup of its own (DelegateSubgroup): on cgroup v2 a VM's cgroup
#   goes beside it, in the unit's (procurator-worker.service/procurator/...),
#   and cgroupfs must be writable (no ProtectControlGroups).
#
# - Nix: the worker checks, realises (from the configured substituters, as an
#   untrusted client of the Nix daemon) and GC-roots image store paths with
#   the system's `nix-store`, and copies each VM's disk into its state
#   directory, /var/lib/procurator-worker.
#
# - Network: the bridge (default br-procurator) gets the first host address
#   of the subnet, the guests' gateway, exactly as the worker computes it
#   (nix/lib/net.nix mirrors procurator/worker/network.py), and NAT lets VMs
#   reach the outside. The worker would create a missing bridge itself; the
#   declarative one is there at boot, before the worker, and survives it.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.procurator.worker;
  net = import ../lib/net.nix;
  stateDirectory = "procurator-worker";
  subnet = net.parseCidr cfg.network.subnet;
  vmmPackage = if cfg.driver == "cloud-hypervisor" then cfg.cloudHypervisorPackage else cfg.qemuPackage;
  useNetworkd = config.networking.useNetworkd;
in
{
  options.services.procurator.worker = {
    enable = lib.mkEnableOption "a procurator worker (runs this host's share of the fleet's VMs)";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../lib/package.nix { };
      defaultText = lib.literalExpression "procurator.packages.\${system}.default";
      description = "The procurator package providing the `procurator` command.";
    };

    id = lib.mkOption {
      type = lib.types.strMatching "[a-z0-9][a-z0-9.-]{0,62}";
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "host-a";
      description = ''
        This worker's id: the key of its entry under `[workers.<id>]` in fleet
        files. 1-63 characters of a-z, 0-9, '.' and '-', starting with a letter
        or digit.
      '';
    };

    master = lib.mkOption {
      type = lib.types.strMatching "(.+:[0-9]+|unix:/.+)";
      example = "master.example.org:7300";
      description = ''
        The master's RPC address as HOST:PORT (services.procurator.master.port
        on the master host, 7300 by default), or unix:/path for a master on
        the same host. The worker dials it and keeps reconnecting; VMs keep
        running while the master is unreachable.
      '';
    };

    driver = lib.mkOption {
      type = lib.types.enum [
        "cloud-hypervisor"
        "qemu"
      ];
      default = "cloud-hypervisor";
      description = ''
        The VMM that runs the VMs: cloud-hypervisor (one process per VM, REST
        API on a unix socket), or QEMU (`-M microvm`, QMP) where
        cloud-hypervisor cannot run. The chosen one is put on the worker's PATH.
      '';
    };

    cloudHypervisorPackage = lib.mkOption {
      type = lib.types.package;
      default = pkgs.cloud-hypervisor;
      defaultText = lib.literalExpression "pkgs.cloud-hypervisor";
      description = "The cloud-hypervisor package used when `driver` is \"cloud-hypervisor\".";
    };

    qemuPackage = lib.mkOption {
      type = lib.types.package;
      default = pkgs.qemu_kvm;
      defaultText = lib.literalExpression "pkgs.qemu_kvm";
      description = "The QEMU package used when `driver` is \"qemu\".";
    };

    network = {
      bridge = lib.mkOption {
        type = lib.types.strMatching "[a-zA-Z0-9_.-]{1,15}";
        default = "br-procurator";
        description = ''
          The bridge every VM's tap is attached to (at most 15 characters, the
          kernel's limit on interface names).
        '';
      };

      subnet = lib.mkOption {
        type = lib.types.str;
        default = "10.120.0.0/24";
        example = "10.121.0.0/22";
        description = ''
          IPv4 subnet of the VMs on this host, in CIDR form. The bridge gets
          its first host address (10.120.0.1 for the default), which is the
          guests' gateway; each VM gets a stable address from the rest, passed
          to the guest on the kernel command line (ip=). Give each worker its
          own subnet if their VMs must route to each other.
        '';
      };

      configureHost = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether to declare the bridge and its address in the NixOS network
          configuration (networking.bridges and networking.interfaces, so with
          scripted networking and with systemd-networkd alike). Turn off to
          manage the bridge yourself; the worker then creates a missing bridge
          at start.
        '';
      };

      nat = {
        enable = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = ''
            Whether VMs reach the outside world through NAT (networking.nat:
            IP forwarding plus masquerading of the subnet).
          '';
        };

        externalInterface = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "eth0";
          description = ''
            The uplink VMs' traffic leaves through (networking.nat.externalInterface).
            null masquerades towards any interface.
          '';
        };
      };

      trustBridge = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Whether the host firewall accepts everything VMs send to the host
          itself (adds the bridge to networking.firewall.trustedInterfaces).
          Off by default: VMs then reach the outside through NAT but none of
          the host's own services.
        '';
      };
    };

    metrics = {
      listenAddress = lib.mkOption {
        type = lib.types.str;
        default = "0.0.0.0";
        description = ''
          Address of the worker's Prometheus exporter (`/metrics`: per-VM
          phase, restarts, CPU, memory, disk and network counters, reconcile
          timings). The master's service discovery lists it for Prometheus.
        '';
      };

      port = lib.mkOption {
        type = lib.types.port;
        default = 9301;
        description = "Port of the worker's Prometheus exporter.";
      };
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether to open the metrics port in the NixOS firewall (the worker has
        no other listening port: it dials the master).
      '';
    };

    tls = {
      cert = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/secrets/procurator/worker-ID.crt";
        description = ''
          Certificate (PEM) for mutual TLS with the master, made with
          `procurator certs issue` (see docs/SECURITY.md). A path on the host,
          not a Nix path: keys must not enter the world-readable store.
          With `key` and `ca`; null: plaintext, which procurator refuses off
          loopback unless `--insecure` is in `extraArgs`.
        '';
      };
      key = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Private key (PEM) of `tls.cert`; a host path readable by the service.";
      };
      ca = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The fleet's CA certificate (PEM), `procurator certs init`.";
      };
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        Further arguments to `procurator worker` (see `procurator worker
        --help`), appended after the ones this module sets.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        # procurator refuses plaintext to a master off loopback
        # (docs/SECURITY.md): say so at evaluation time.
        assertions = [
          {
            assertion =
              cfg.tls.cert != null
              || builtins.match "(127[.].*|[[]::1[]]:.*|localhost:.*|unix:.*)" cfg.master != null
              || builtins.elem "--insecure" cfg.extraArgs;
            message = ''
              services.procurator.worker dials ${cfg.master} without TLS: set
              services.procurator.worker.tls.{cert,key,ca} (procurator certs issue
              --worker ${cfg.id}), or add "--insecure" to extraArgs.
            '';
          }
          {
            assertion = (cfg.tls.cert == null) == (cfg.tls.key == null) && (cfg.tls.key == null) == (cfg.tls.ca == null);
            message = "services.procurator.worker.tls: set cert, key and ca together.";
          }
        ];

        environment.systemPackages = [ cfg.package ];

        # Loaded up front: the unit may not load modules itself
        # (ProtectKernelModules), and taps, vhost-net and the bridge need them.
        boot.kernelModules = [
          "tun"
          "vhost_net"
          "bridge"
        ];

        networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.metrics.port ];
        networking.firewall.trustedInterfaces = lib.mkIf cfg.network.trustBridge [ cfg.network.bridge ];

        systemd.services.procurator-worker = {
          description = "procurator worker ${cfg.id}: runs this host's VMs";
          wantedBy = [ "multi-user.target" ];
          wants = [ "network-online.target" ];
          # After the bridge units of scripted networking (ignored when they
          # do not exist, e.g. with networkd) and networkd.
          after = [
            "network-online.target"
            "nix-daemon.socket"
            "${cfg.network.bridge}-netdev.service"
            "network-addresses-${cfg.network.bridge}.service"
            "systemd-networkd.service"
          ];
          startLimitIntervalSec = 0;
          # nix-store for image paths and GC roots; the VMM of the chosen driver.
          path = [
            config.nix.package
            vmmPackage
          ];
          environment.PYTHONUNBUFFERED = "1";
          serviceConfig = {
            ExecStart = lib.escapeShellArgs (
              [
                (lib.getExe cfg.package)
                "worker"
                "--id"
                cfg.id
                "--master"
                cfg.master
                "--state-dir"
                "/var/lib/${stateDirectory}"
                "--driver"
                cfg.driver
                "--bridge"
                cfg.network.bridge
                "--subnet"
                cfg.network.subnet
                "--metrics-listen"
                (net.hostPort cfg.metrics.listenAddress cfg.metrics.port)
              ]
              ++ lib.optionals (cfg.tls.cert != null) [
                "--tls-cert"
                cfg.tls.cert
                "--tls-key"
                cfg.tls.key
                "--tls-ca"
                cfg.tls.ca
              ]
              ++ cfg.extraArgs
            );
            Restart = "always";
            RestartSec = "2s";
            # See the top of this file: VMMs survive worker restarts.
            KillMode = "process";
            TasksMax = "infinity";
            LimitNOFILE = 1048576;

            # Root (see the top of this file): each VMM runs as a uid of its
            # own; VM directories in the state directory are owned by them.
            StateDirectory = stateDirectory;
            StateDirectoryMode = "0750";
            UMask = "0027";

            CapabilityBoundingSet = [
              "CAP_CHOWN"
              "CAP_DAC_OVERRIDE"
              "CAP_KILL"
              "CAP_SETGID"
              "CAP_SETUID"
              "CAP_SETPCAP"
              "CAP_NET_ADMIN"
              "CAP_SYS_CHROOT"
              "CAP_SYS_PTRACE"
              "CAP_SYS_ADMIN"
              "CAP_MKNOD"
            ];
            # What it forbids (setuid binaries, file capabilities) neither the
            # worker nor a jailed VMM needs; the jail sets it for each VMM too.
            NoNewPrivileges = true;
            # One value: systemd's own list syntax (DelegateSubgroup needs
            # systemd 254, NixOS 23.11).
            Delegate = "cpu memory pids";
            DelegateSubgroup = "worker";
            DevicePolicy = "closed";
            DeviceAllow = [
              "/dev/kvm rw"
              "/dev/net/tun rw"
              "/dev/vhost-net rw"
            ];
            ProtectSystem = "full";
            ProtectHome = true;
            PrivateTmp = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectClock = true;
            RestrictSUIDSGID = true;
            LockPersonality = true;
          };
        };
      }

      (lib.mkIf cfg.network.configureHost {
        networking.bridges.${cfg.network.bridge}.interfaces = [ ];
        networking.interfaces.${cfg.network.bridge}.ipv4.addresses = [
          {
            address = subnet.firstHost;
            inherit (subnet) prefixLength;
          }
        ];
      })

      # systemd-networkd would wait for a carrier before configuring the
      # address, and an empty bridge has none until the first VM's tap joins;
      # nor should an empty bridge hold back network-online.target. "40-<name>"
      # is the unit NixOS generates from networking.interfaces.
      (lib.mkIf (cfg.network.configureHost && useNetworkd) {
        systemd.network.networks."40-${cfg.network.bridge}" = {
          networkConfig.ConfigureWithoutCarrier = true;
          linkConfig.RequiredForOnline = "no";
        };
      })

      (lib.mkIf cfg.network.nat.enable {
        networking.nat = {
          enable = true;
          internalInterfaces = [ cfg.network.bridge ];
          internalIPs = [ "${subnet.network}/${toString subnet.prefixLength}" ];
          externalInterface = lib.mkIf (cfg.network.nat.externalInterface != null) cfg.network.nat.externalInterface;
        };
      })
    ]
  );
}
