# NixOS module: the procurator master.
#
# The master keeps the desired fleet under monotonic generations in its
# database and pushes each worker its assignment over Cap'n Proto RPC;
# workers dial in (so only the master needs an open port), `procurator
# apply` talks to the same port. It also serves Prometheus metrics and HTTP
# service discovery for the workers' exporters on a second port.
#
# The database is SQLite in the state directory (one master per fleet), or
# PostgreSQL (`database = "postgresql://..."`): then several hosts run this
# module against the same database and all serve (docs/HA.md); workers and
# the CLI are given every master.
#
# The service runs as a systemd DynamicUser: it needs no privilege beyond its
# own state directory (/var/lib/procurator-master, holding master.db), so the
# unit is locked down hard. It restarts always: desired state and generations
# live in the database and survive any restart; workers reconnect by
# themselves.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.procurator.master;
  net = import ../lib/net.nix;
  stateDirectory = "procurator-master";
  sqliteDatabase = "/var/lib/${stateDirectory}/master.db";
  postgres =
    builtins.substring 0 13 cfg.database == "postgresql://"
    || builtins.substring 0 11 cfg.database == "postgres://";
  privilegedPorts = lib.any (port: port < 1024) [
    cfg.port
    cfg.metrics.port
  ];
  # Where a Prometheus on this host reaches the master's metrics server: a
  # wildcard listen address is reached on loopback.
  localMetricsHost =
    if cfg.metrics.listenAddress == "0.0.0.0" then
      "127.0.0.1"
    else if cfg.metrics.listenAddress == "::" then
      "::1"
    else
      cfg.metrics.listenAddress;
  localMetrics = net.hostPort localMetricsHost cfg.metrics.port;
  # Tested with `promtool test rules` (tests/operator); docs/METRICS.md.
  rulesFile = ../../contrib/prometheus/procurator.rules.yml;
  dashboards = ../../contrib/grafana;
in
{
  options.services.procurator.master = {
    enable = lib.mkEnableOption "the procurator master (desired fleet state and per-worker assignments)";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../lib/package.nix { };
      defaultText = lib.literalExpression "procurator.packages.\${system}.default";
      description = "The procurator package providing the `procurator` command.";
    };

    listenAddress = lib.mkOption {
      type = lib.types.str;
      default = "0.0.0.0";
      example = "::";
      description = ''
        Address the Cap'n Proto RPC port listens on, for workers and for
        `procurator apply` / `procurator status`. Use a specific address to
        serve one network only.
      '';
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 7300;
      description = ''
        Cap'n Proto RPC port. Workers are started with
        `--master <this host>:<port>` (services.procurator.worker.master).
      '';
    };

    database = lib.mkOption {
      type = lib.types.str;
      default = sqliteDatabase;
      example = "postgresql://procurator@db.example:5432/procurator?sslmode=verify-full";
      description = ''
        The master's database: a SQLite file (the default, in the state
        directory: one master per fleet), or a PostgreSQL URL, for several
        masters on one database (docs/HA.md); the schema is created and
        migrated when the master starts. Never put a password in the URL:
        it would be world-readable in the Nix store; use `passwordFile`, a
        client certificate (`sslcert`, `sslkey` parameters), or peer
        authentication over the local socket
        (`postgresql:///procurator?host=/run/postgresql`, as the dynamic user
        `procurator-master`).
      '';
    };

    passwordFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/procurator/pgpass";
      description = ''
        With a PostgreSQL `database`: a libpq password file
        (`host:port:database:user:password` lines), handed to the master as a
        systemd credential and named by `PGPASSFILE`. A host path, not a Nix
        path.
      '';
    };

    masterId = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "master-a";
      description = ''
        This master's name in the database (sessions, the leader lease) and in
        its logs; unique among the masters of one database. Null: the host
        name and a random suffix, new at every start.
      '';
    };

    metrics = {
      listenAddress = lib.mkOption {
        type = lib.types.str;
        default = "0.0.0.0";
        description = ''
          Address of the HTTP server for Prometheus: `/metrics` (fleet metrics,
          and the per-VM figures workers relay) and the HTTP service discovery
          document listing every worker's exporter.
        '';
      };

      port = lib.mkOption {
        type = lib.types.port;
        default = 9300;
        description = "Port of the Prometheus metrics and service discovery HTTP server.";
      };
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether to open the RPC port and the metrics port in the NixOS
        firewall. Workers must reach the RPC port; Prometheus the metrics port.
      '';
    };

    tls = {
      cert = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/secrets/procurator/master.crt";
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
        description = "Private key (PEM) of `tls.cert`; a host path, read by systemd (LoadCredential), so it may stay root-only.";
      };
      ca = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "The fleet's CA certificate (PEM), `procurator certs init`.";
      };
    };

    monitoring = {
      prometheus = {
        enable = lib.mkOption {
          type = lib.types.bool;
          default = false;
          description = ''
            Whether the Prometheus of this host (services.prometheus, which
            you enable and give its alertmanagers yourself) watches the fleet:
            it gets procurator's alerting and recording rules (`rules`) and
            scrape jobs for this master and, through the master's HTTP
            service discovery, every worker (`scrape`). The alerts and what
            to do about each are in docs/METRICS.md.
          '';
        };

        rules = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = ''
            With `monitoring.prometheus.enable`: whether to load
            contrib/prometheus/procurator.rules.yml (services.prometheus.ruleFiles):
            the alerts (worker disconnected, fleet not converged, VM
            crash-looping or failed, generation stuck, metrics stale, master
            database unavailable...) and the recording rules the dashboard reads.
          '';
        };

        scrape = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = ''
            With `monitoring.prometheus.enable`: whether to add the scrape
            jobs `procurator-master` (this master's /metrics) and
            `procurator-workers` (every worker's exporter, found through the
            master's /sd). Turn off when the scrape configuration is kept
            elsewhere; the rules do not depend on job names.
          '';
        };
      };

      grafana.enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Whether to provision the fleet dashboard
          (contrib/grafana/procurator-fleet.json) into the Grafana of this host
          (services.grafana, which you enable and give a Prometheus data
          source yourself). The dashboard's data source is a variable, and it
          reads the recording rules of `monitoring.prometheus.rules`.
        '';
      };
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--log-format"
        "json"
      ];
      description = ''
        Further arguments to `procurator master` (see `procurator master
        --help`), appended after the ones this module sets.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # procurator refuses plaintext off loopback (docs/SECURITY.md): say so at
    # evaluation time, not as a unit that fails to start.
    assertions = [
      {
        assertion =
          cfg.tls.cert != null
          || builtins.elem cfg.listenAddress [ "127.0.0.1" "::1" "localhost" ]
          || builtins.elem "--insecure" cfg.extraArgs;
        message = ''
          services.procurator.master listens on ${cfg.listenAddress} without TLS:
          set services.procurator.master.tls.{cert,key,ca} (procurator certs),
          listen on loopback, or add "--insecure" to extraArgs.
        '';
      }
      {
        assertion = (cfg.tls.cert == null) == (cfg.tls.key == null) && (cfg.tls.key == null) == (cfg.tls.ca == null);
        message = "services.procurator.master.tls: set cert, key and ca together.";
      }
      {
        assertion = cfg.passwordFile == null || postgres;
        message = "services.procurator.master.passwordFile needs a postgresql:// database.";
      }
    ];

    # `procurator apply` and `procurator status` for people logged in here.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
      cfg.port
      cfg.metrics.port
    ];

    services.prometheus = lib.mkIf cfg.monitoring.prometheus.enable {
      ruleFiles = lib.optionals cfg.monitoring.prometheus.rules [ rulesFile ];
      scrapeConfigs = lib.optionals cfg.monitoring.prometheus.scrape [
        {
          job_name = "procurator-master";
          static_configs = [ { targets = [ localMetrics ]; } ];
        }
        {
          job_name = "procurator-workers";
          http_sd_configs = [ { url = "http://${localMetrics}/sd"; } ];
        }
      ];
    };

    services.grafana.provision.dashboards.settings.providers = lib.mkIf cfg.monitoring.grafana.enable [
      {
        name = "procurator";
        options.path = dashboards;
      }
    ];

    systemd.services.procurator-master = {
      description = "procurator master: desired fleet state for procurator workers";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # A PostgreSQL on this host starts first (one elsewhere is waited for
      # by restarting: a master fails when its database cannot be reached).
      after = [
        "network-online.target"
      ]
      ++ lib.optionals (postgres && (config.services.postgresql.enable or false)) [
        "postgresql.service"
      ];
      # Restart=always means forever: never give up after a burst of failures.
      startLimitIntervalSec = 0;
      environment = {
        PYTHONUNBUFFERED = "1";
      }
      // (if cfg.passwordFile != null then { PGPASSFILE = "%d/pgpass"; } else { });
      serviceConfig = {
        ExecStart = lib.escapeShellArgs (
          [
            (lib.getExe cfg.package)
            "master"
            "--listen"
            (net.hostPort cfg.listenAddress cfg.port)
            "--database"
            cfg.database
            "--metrics-listen"
            (net.hostPort cfg.metrics.listenAddress cfg.metrics.port)
          ]
          ++ lib.optionals (cfg.masterId != null) [
            "--master-id"
            cfg.masterId
          ]
          # The files come in as systemd credentials (%d: the unit's
          # credentials directory): root-only key files stay root-only,
          # and the dynamic user still reads its copy.
          ++ lib.optionals (cfg.tls.cert != null) [
            "--tls-cert"
            "%d/tls-cert"
            "--tls-key"
            "%d/tls-key"
            "--tls-ca"
            "%d/tls-ca"
          ]
          ++ cfg.extraArgs
        );
        LoadCredential =
          lib.optionals (cfg.tls.cert != null) [
            "tls-cert:${cfg.tls.cert}"
            "tls-key:${cfg.tls.key}"
            "tls-ca:${cfg.tls.ca}"
          ]
          ++ lib.optionals (cfg.passwordFile != null) [ "pgpass:${cfg.passwordFile}" ];
        Restart = "always";
        RestartSec = "2s";
        # Every connection is a descriptor: well above --max-connections.
        LimitNOFILE = 1048576;

        DynamicUser = true;
        StateDirectory = stateDirectory;
        StateDirectoryMode = "0700";
        UMask = "0077";

        # Nothing but sockets and its own state directory.
        CapabilityBoundingSet = if privilegedPorts then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
        AmbientCapabilities = lib.mkIf privilegedPorts [ "CAP_NET_BIND_SERVICE" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
      };
    };
  };
}
