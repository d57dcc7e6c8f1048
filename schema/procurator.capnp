@0xac7ebed6f3cb0532;
# procurator wire contract, version 1.
#
# This file alone is enough to write a worker or a CI client in any language
# with a Cap'n Proto implementation. Rules of evolution: fields and methods are
# only ever added (with the next ordinal), never renumbered, retyped or removed;
# enums only gain enumerants. Readers must treat an unknown enumerant as the
# "unknown"/first value.
#
# Topology. The master listens; everyone dials it. The bootstrap capability of
# a connection is `Master`. A worker calls `Master.register`, handing over a
# `Node` capability through which the master pushes assignments; it gets back a
# `WorkerSession` bound to its worker id for pulls and reports. People and CI
# call `Master.control` and use the returned `Control`.
#
# Errors are data. Every method answers a failure in its results: an
# `error :Error` arm of a result union, or (Control.status, Control.events,
# WorkerSession.getAssignment, Node.push, Node.pushChanges) an `error` result
# that is set only when the call failed, the other results then meaning
# nothing. `Error.code`
# says what the caller can do about it (see `ErrorCode`); `message` is one
# line for a person; the server never puts stack traces or its own file paths
# in an error. A message that does not decode (a field of the wrong type, a text
# without its NUL or not UTF-8, a message beyond the limits) is answered
# `invalid` or `limitExceeded` naming the field, and the connection goes on.
# An RPC exception (disconnect, overload) is still possible on every call and
# means "try again later"; the master raises none of its own.
#
# Connections. The master closes a connection that has no worker registered
# over it and no call in flight when it started no call within 10 s of
# connecting (of finishing its TLS handshake), or within 60 s of its last
# call's end: a half-sent message counts as no call. A connection a worker
# registered over is long-lived and may stay quiet between resyncs; it is
# closed when its peer goes away: TCP keepalive probes a silent peer after a
# third of the master's worker lease, then every ninth of it, 3 times (10 s,
# 3 s with the default 30 s lease; at most 60 s and 10 s), and data left
# unacknowledged is given up on as soon, so a partitioned worker is lost
# about a lease after that, not minutes later.

# ---------------------------------------------------------------- desired state

enum PowerState {
  # Desired (or observed) power state of a VM. Changing only the power state
  # never replaces a VM.
  running @0;
  paused @1;
  stopped @2;
}

struct Resources {
  # Optional overrides of what the image's vm-config.json asks for.
  # 0 means "as the image says".
  vcpus @0 :UInt32;
  memoryMib @1 :UInt64;
}

struct VmAssignment {
  id @0 :Text;
  # [a-z0-9][a-z0-9-]{0,62}; unique across the whole fleet.
  hash @1 :Text;
  # Identity of the desired VM: when it changes, the VM is replaced.
  # By default the 32-character hash part of nixStorePath.
  nixStorePath @2 :Text;
  # /nix/store/<32 base-32 chars>-<name>, holding vm-config.json.
  power @3 :PowerState;
  resources @4 :Resources;
  reschedule @5 :Bool;
  # In a worker's assignment only (ignored elsewhere): the VM is
  # on_worker_lost = "reschedule", so a worker cut off from every master
  # for --fence-after fences it (pauses it) before the master may place it
  # elsewhere. Default false ("wait", and what older masters send).
  health @6 :HealthCheck;
  # In a worker's assignment only: what the worker checks of the guest
  # (docs/ROLLOUTS.md). Unset: no check, the VM reports health unchecked.
  # Never part of the VM's identity: a changed check replaces nothing.
}

enum HealthKind {
  none @0;  # the VM running is the check
  tcp @1;   # a TCP connect to the guest's address and `port`
  http @2;  # GET `path` on the guest's `port` answers `expect`
}

struct HealthCheck {
  kind @0 :HealthKind;
  port @1 :UInt16;
  path @2 :Text;
  expect @3 :UInt16;
  minHealthyMs @4 :UInt32;
  # Healthy once the check has passed continuously this long.
  intervalMs @5 :UInt32;
  # 0: the worker's default.
}

enum Health {
  unchecked @0;  # no check assigned, or no guest running
  pending @1;    # checking; not passed for minHealthyMs yet
  healthy @2;    # passed continuously for minHealthyMs
  unhealthy @3;  # failing; VmStatus.message says how
}

enum PrepareState {
  pending @0;
  ready @1;      # realised and rooted on the worker
  failed @2;     # cannot be realised; `message` says why
}

struct PreparedImage {
  path @0 :Text;
  state @1 :PrepareState;
  message @2 :Text;
}

struct DiskTransfer {
  # A move's disk transfer the worker takes part in (docs/SNAPSHOTS.md,
  # "Moves"): in a worker's assignment only, while the move is transferring.
  vmId @0 :Text;
  opId @1 :Text;
  # The move's op id.
  receive @2 :Bool;
  # true: this worker is the target (accept the VM's disks presenting
  # `token`); false: the source (send them to `peer` with `token` once the
  # VM is stopped).
  token @3 :Text;
  # One-time, 32 hex digits.
  peer @4 :Text;
  # The source's only: the target's transfer address, HOST:PORT (a live
  # move's: where the target's incoming VMM takes the memory and state;
  # "" in a live move's "cancelling": stop migrating and report how it
  # ended. A worker older than that refuses it as invalid).
  live @5 :Bool;
  # A live move's (docs/SNAPSHOTS.md, "Live moves"): the target holds the
  # VM in an incoming VMM and reports where it listens (`TransferProgress.
  # memory`, `disks`); the source migrates the running VM there with
  # `token`. Added with live moves: an older worker ignores it, and the
  # master sends it only to workers that say `WorkerInfo.liveMoves`.
  disks @6 :Text;
  # A live move's source: where the target exports the VM's disks to
  # mirror, HOST:PORT ("": none to mirror).
  incoming @7 :VmAssignment;
  # A live move's target, until the switch: the VM to hold incoming, as
  # its source's assignment has it (unset after the switch, which puts the
  # VM in the target's own assignment).
  peerTlsWorker @8 :Text;
  # A cold move's source: the target's worker id when its transfer port
  # serves TLS (`WorkerInfo.transferTls`); the source then sends only in
  # TLS, to a server whose certificate names procurator://worker/<this id>
  # ("": the target serves plain TCP). Added with TLS on the transfers: an
  # older source ignores it and connects in plain, which a TLS target
  # refuses (saying so).
}

struct TransferProgress {
  # A worker's part in a `DiskTransfer` of its assignment.
  vmId @0 :Text;
  opId @1 :Text;
  state @2 :Text;
  # "pending", "sending", "sent", "received", "failed" or "ready" (a live
  # move's target: its incoming VMM listens; added with live moves).
  done @3 :UInt64;
  total @4 :UInt64;
  # Bytes (the source's, while sending).
  message @5 :Text;
  # Why it failed ("" otherwise).
  memory @6 :Text;
  disks @7 :Text;
  # A live move's target, ready: where its incoming VMM takes the memory
  # and state, and the disks (HOST:PORT; "": none). Added with live moves.
}

struct Assignment {
  # Everything one worker should run. Generations are fleet-wide, monotonic,
  # never reused (also across master restarts). A worker's assignment carries
  # the generation of the last apply that changed it.
  workerId @0 :Text;
  generation @1 :UInt64;
  vms @2 :List(VmAssignment);
  opId @3 :Text;
  # Operation id of the apply that produced this generation ("" if none).
  prepare @4 :List(Text);
  # Store paths to realise and root without running them (a rollout's
  # prepare phase); reported back in WorkerStatus.prepared.
  transfers @5 :List(DiskTransfer);
  # The moves' disk transfers this worker takes part in; reported back in
  # WorkerStatus.transfers. Added with moves: an older worker ignores it
  # (a move to or from it then fails by its deadline).
}

struct AssignmentChanges {
  # What changed in a worker's assignment from generation `baseGeneration`
  # to `generation`: the entries added or changed (whole) and the ids
  # removed, so that a one-VM change costs a one-VM message whatever the
  # worker runs. Applies only to the assignment of exactly `baseGeneration`:
  # a worker holding another one does not guess, it asks for the whole
  # assignment (`WorkerSession.getAssignment`, as on every (re)connect and
  # resync). The order of `Assignment.vms` carries no meaning.
  workerId @0 :Text;
  baseGeneration @1 :UInt64;
  generation @2 :UInt64;
  # Greater than baseGeneration.
  opId @3 :Text;
  # Operation id of the apply that produced `generation` ("" if none).
  upserted @4 :List(VmAssignment);
  # Whole entries: each replaces the entry of that VM id, or adds one. No id
  # twice, none also in `removed`.
  removed @5 :List(Text);
  # Ids of VMs no longer assigned; an id the base does not assign is
  # ignored (updates composed by the sender may name one).
  prepare @6 :List(Text);
  # Whole: replaces the base's `Assignment.prepare`.
  transfers @7 :List(DiskTransfer);
  # Whole: replaces the base's `Assignment.transfers`.
}

struct WorkerFleet {
  workerId @0 :Text;
  vms @1 :List(VmAssignment);
}

struct Fleet {
  # A whole desired fleet, as applied by `procurator apply`. Workers not named
  # here are assigned nothing (their VMs are removed).
  workers @0 :List(WorkerFleet);
  # The pinned VMs, per worker (`[workers.W] vms = [...]`).
  unpinned @1 :List(UnpinnedVm);
  # The VMs the master places (`[[vms]]`, docs/SCHEDULING.md), sorted by id.
  # A master older than this field ignores it: apply unpinned VMs through
  # masters that know it.
  strategy @2 :PlacementStrategy;
  # `[placement] strategy`.
  rollout @3 :RolloutSettings;
  # `[rollout]` (docs/ROLLOUTS.md). Unset: the fleet has none, and VMs
  # without their own settings are replaced at once. An older master
  # ignores it (and the two lists below): it replaces every VM at once.
  groupRollouts @4 :List(NamedRollout);
  # `[rollout.groups.NAME]`: a spread group's settings, sorted by name.
  vmRollouts @5 :List(NamedRollout);
  # A VM entry's `rollout = {...}`, sorted by VM id.
}

struct RolloutSettings {
  # Whole settings: an override carries the fleet-wide ones with its keys.
  maxParallel @0 :UInt32;
  health @1 :HealthCheck;
  # Its minHealthyMs is `min_healthy_time`. Unset: kind none, 10 s.
  healthyDeadlineMs @2 :UInt32;
  canary @3 :UInt32;
  autoRevert @4 :Bool;
  autoPromote @5 :Bool;
}

struct NamedRollout {
  name @0 :Text;
  settings @1 :RolloutSettings;
}

struct RolloutVmInfo {
  vmId @0 :Text;
  workerId @1 :Text;
  state @2 :Text;
  # waiting, switching, healthy or failed.
  canary @3 :Bool;
  message @4 :Text;
  # Why it failed.
  oldPath @5 :Text;
  newPath @6 :Text;
}

struct RolloutInfo {
  id @0 :Text;
  # "" when there is no rollout to show.
  opId @1 :Text;
  # The apply that started it.
  phase @2 :Text;
  # preparing, switching, awaiting promotion, reverting, done, failed, reverted.
  reason @3 :Text;
  paused @4 :Bool;
  batches @5 :UInt32;
  startedUnixMs @6 :UInt64;
  endedUnixMs @7 :UInt64;
  preparedWorkers @8 :UInt32;
  # Workers that report every image ready, of `prepareWorkers`.
  prepareWorkers @9 :UInt32;
  vms @10 :List(RolloutVmInfo);
  message @11 :Text;
  # What the call did, in one line.
}

struct RolloutResult {
  union {
    ok @0 :RolloutInfo;
    error @1 :Error;
  }
}

enum OnWorkerLost {
  reschedule @0;  # placed on another worker when its worker is lost
  wait @1;        # stays, unavailable, until its worker is back
}

enum PlacementStrategy {
  binpack @0;  # the fullest worker that fits
  spread @1;   # the emptiest worker that fits
}

struct UnpinnedVm {
  vm @0 :VmAssignment;
  # resources are required (vcpus and memoryMib both set).
  constraints @1 :List(Label);
  # Worker labels that must all match, as `[[vms]] constraints`.
  spread @2 :Text;
  # A group name ("" for none): its VMs go to different workers where they can.
  onWorkerLost @3 :OnWorkerLost;
}

# ---------------------------------------------------------------- observed state

enum Phase {
  unknown @0;
  pending @1;      # assigned, nothing done yet
  realising @2;    # fetching the image from a substituter
  starting @3;     # VMM spawned, VM being created and booted
  running @4;
  paused @5;
  stopping @6;
  stopped @7;      # VMM gone on purpose (desired power = stopped)
  failed @8;       # permanent failure (bad image, bad config); see message
  crashLoop @9;    # VMM keeps dying; restarting with backoff
  removing @10;
}

struct VmStatus {
  id @0 :Text;
  phase @1 :Phase;
  observedHash @2 :Text;
  # Hash of the VM that actually runs ("" if none).
  message @3 :Text;
  # Human-readable reason for the phase.
  restarts @4 :UInt32;
  address @5 :Text;
  # IPv4 address given to the guest, "" if none.
  observedPower @6 :PowerState;
  opId @7 :Text;
  # The operation this status is about: for a VM that has reached its
  # desired state, the apply that last acted on it (an apply that left it
  # alone does not change it); otherwise the apply whose work it waits for.
  health @8 :Health;
  # Of the guest that runs (observedHash), per VmAssignment.health.
}

struct WorkerStatus {
  workerId @0 :Text;
  observedGeneration @1 :UInt64;
  # The newest generation every VM of which has reached its desired state or
  # a permanent failure.
  vms @2 :List(VmStatus);
  prepared @3 :List(PreparedImage);
  # One entry per path of the assignment's `prepare`.
  transfers @4 :List(TransferProgress);
  # One entry per transfer of the assignment's `transfers` (a received set
  # is reported until the transfer leaves the assignment).
}

struct WorkerStatusChanges {
  # What changed in a worker's status since the status the master last
  # acknowledged on this session: the first `reportStatus` of the session,
  # then each `reportStatusChanges` in turn (a worker has at most one report
  # in flight). Lets a worker of many VMs report a one-VM change without
  # resending every VM. The order of `WorkerStatus.vms` carries no meaning.
  workerId @0 :Text;
  observedGeneration @1 :UInt64;
  changed @2 :List(VmStatus);
  # Whole entries: each replaces the master's entry of that VM id, or adds
  # one. No id twice, none also in `removed`.
  removed @3 :List(Text);
  # Ids of VMs the worker no longer reports; each must be in the status
  # the changes apply to.
  prepared @4 :List(PreparedImage);
  # Whole: replaces the status's `WorkerStatus.prepared`.
  transfers @5 :List(TransferProgress);
  # Whole: replaces the status's `WorkerStatus.transfers`.
}

struct WorkerInfo {
  workerId @0 :Text;
  version @1 :Text;
  capacity @2 :Capacity;
  metricsUrl @3 :Text;
  # Where this worker's Prometheus exporter listens ("" if none); the
  # master lists it in its HTTP service discovery.
  driver @4 :Text;
  # VMM driver in use ("cloud-hypervisor", "qemu", ...).
  labels @5 :List(Label);
  # The worker's labels (`--label zone=b`), which unpinned VMs' constraints
  # match: keys [a-z][a-z0-9._-]{0,62}, values [A-Za-z0-9][A-Za-z0-9._-]{0,62},
  # each key once, at most 64.
  cpuOvercommit @6 :Float64 = 1.0;
  memoryOvercommit @7 :Float64 = 1.0;
  # The scheduler offers floor(capacity.vcpus x cpuOvercommit) vCPUs and
  # floor(capacity.memoryMib x memoryOvercommit) MiB of this worker to
  # unpinned VMs (docs/SCHEDULING.md). Above 0, at most 64.
  transferAddress @8 :Text;
  # HOST:PORT where this worker takes a move's disks ("": it takes no
  # moves). Added with moves.
  liveMoves @9 :Bool;
  # Its VMM driver can move a running VM (`procurator move --live`; both
  # ends must say so and run the same `driver`). Added with live moves: an
  # older worker leaves it false, and a live move to or from it is refused.
  transferTls @10 :Bool;
  # Its transfer port serves TLS with its fleet certificate (it runs with
  # --tls-*): the master tells a move's source (`DiskTransfer.
  # peerTlsWorker`), which then requires TLS. Added with TLS on the
  # transfers: an older worker leaves it false and reads as plain.
}

struct Capacity {
  # What a worker's host offers, as the worker reports it at registration.
  vcpus @0 :UInt32;      # CPUs of the host
  memoryMib @1 :UInt64;  # memory VMs may use (the host's, or the configured cap)
  maxVms @2 :UInt32;     # the worker's own VM-count limit; 0: none of its own
}

struct MetricSample {
  # One numeric sample of a per-VM or per-worker metric.
  name @0 :Text;     # Prometheus metric name, e.g. procurator_vm_restarts_total
  vmId @1 :Text;     # "" for worker-level samples
  labels @2 :List(Label);
  value @3 :Float64;
}

struct Label {
  name @0 :Text;
  value @1 :Text;
}

struct MetricsReport {
  # A worker's figures for the master to relay (docs/METRICS.md, "Reports
  # to the master"). Each series (name, vmId, labels) is named at most once
  # in `samples` and `ended` together.
  workerId @0 :Text;
  samples @1 :List(MetricSample);
  # Whole report (`change` false): every series the worker has; it replaces
  # what the master holds of this worker. Change: only the series that are
  # new or whose value moved since the report the master last acknowledged
  # on this session.
  change @2 :Bool;
  # True: a change against the report the master acknowledged last on this
  # session (whole or change; a worker has at most one report in flight).
  # A master that holds no report of this session (the session's first
  # report, or the master restarted) or whose series do not fit `ended`
  # refuses it with `invalid` and keeps what it had: the worker then sends
  # a whole report. Added with reports as changes (after version 1's first
  # release): an older worker leaves it false, so its reports stay whole;
  # a worker sends a change only to a master that answered a report of this
  # session with `takesChanges` (an older master never does, and would read
  # a change as a whole report).
  ended @3 :List(MetricSeries);
  # Change only: series the worker no longer has (a VM removed, a device
  # gone, a phase left); each must be one the master holds. Empty in a
  # whole report.
}

struct MetricSeries {
  # One series of a metric, without its value: what `MetricsReport.ended`
  # names.
  name @0 :Text;
  vmId @1 :Text;     # "" for worker-level series
  labels @2 :List(Label);
}

enum EventKind {
  unknown @0;
  created @1;
  booted @2;
  crashed @3;
  restarted @4;
  replaced @5;
  stopped @6;
  failed @7;
  readopted @8;
  removed @9;
  paused @10;
  resumed @11;
  warning @12;
  # Something holds only in part: a limit the worker could not enforce, a
  # VMM not jailed. The VM runs; the message says what is missing.
  snapshotted @13;
  restored @14;
  # A snapshot of the VM was taken; the VM was restored from one (its
  # guest clock is then behind: docs/SNAPSHOTS.md).
  rescheduled @15;
  # The master moved the VM to this worker (an apply, or healing after its
  # worker was lost); the message says from where and why.
  moving @16;
  # A phase of a move (`procurator move`): preparing, stopping, switching,
  # moved, or failed with the reason; the op id is the move's. Added with
  # moves: an older reader sees `unknown`.
}

struct VmEvent {
  vmId @0 :Text;
  kind @1 :EventKind;
  message @2 :Text;
  opId @3 :Text;
  unixTimeMs @4 :Int64;
}

struct WorkerConnection {
  workerId @0 :Text;
  connected @1 :Bool;
  sinceUnixMs @2 :Int64;
  # When the worker (dis)connected.
  desiredGeneration @3 :UInt64;
  status @4 :WorkerStatus;
  # Last status the worker reported (empty until it reports).
  lastReportUnixMs @5 :Int64;
  vmCount @6 :UInt32;
  # Number of VMs assigned to this worker.
  desiredVms @7 :List(VmAssignment);
  # The VMs assigned to this worker (desired hash and power state), so a
  # client can show desired vs observed per VM.
  info @8 :WorkerInfo;
  # What the worker said of itself when it last registered (version,
  # driver, capacity, exporter); unset if it never connected.
  state @9 :Text;
  # "ready", "lost" (its lease expired), "cordoned" or "draining"; "" from
  # a master older than cordon and drain.
  renewedUnixMs @10 :Int64;
  # When its lease was last renewed (0: never), on the database's clock.
  renewedAgoMs @11 :Int64;
  # How long ago that was, on the database's clock (-1: never or unknown).
  mode @12 :WorkerMode;
  # What an operator set on it (cordon, drain and the drain's progress);
  # unset while it is ready.
  handoffs @13 :UInt32;
  # Its VMs being handed off to other workers now (a drain's moves in
  # flight).
}

struct WorkerMode {
  # A worker cordoned or draining (docs/SCHEDULING.md).
  state @0 :Text;
  # "cordoned" or "draining" (a finished drain leaves it "cordoned").
  opId @1 :Text;
  # The cordon's or drain's operation id (a drain's moves carry it).
  sinceUnixMs @2 :Int64;
  maxUnavailable @3 :UInt32;
  # A drain's bound on its VMs in handoff at once.
  moved @4 :UInt32;
  total @5 :UInt32;
  # A drain's progress: moved of total unpinned VMs.
  blocked @6 :Text;
  # Why the drain cannot go on ("" while it can), e.g. a VM that fits on
  # no other worker.
}

struct WorkerModeResult {
  union {
    ok :group {
      mode @0 :WorkerMode;
      # The worker's mode after the call; unset: ready.
      changed @1 :Bool;
      message @2 :Text;
      # One line for the operator.
    }
    error @3 :Error;
  }
}

struct FleetStatus {
  generation @0 :UInt64;
  # Current fleet generation.
  workers @1 :List(WorkerConnection);
  changeIndex @2 :UInt64;
  # The master's change index when this was read: see Control.status.
}

# ---------------------------------------------------------------- errors

enum ErrorCode {
  # What went wrong, and so what the caller can do. A code this reader does
  # not know (a newer peer) reads as `internal`.
  internal @0;
  # A bug or an unexpected failure on the server. The message says no more
  # than that; the server's log has the details under `opId`. Retrying the
  # same request may fail the same way.
  invalid @1;
  # The request is malformed or breaks a rule: a bad value, a message that
  # does not decode. `details` names each field ("fleet.workers[0].vms[2].id:
  # ..."). Do not retry it unchanged.
  staleGeneration @2;
  # Control.apply: `expected` no longer matches the fleet's generation;
  # nothing was applied. Read the status and decide again.
  notFound @3;
  # What the request names does not exist (Control.describeVm: a VM the
  # master has never heard of).
  unauthorized @4;
  # The connection's certificate does not allow this call (a worker
  # certificate calling `control`, or registering as another worker), or a
  # worker reported about what is not its own. Do not retry.
  limitExceeded @5;
  # A bound was exceeded: a list or text too long, too many connections or
  # registrations. `details` names the field. Retry only with less.
  unavailable @6;
  # The server cannot do it right now (shutting down, its store not
  # answering). Try again later.
}

struct Error {
  code @0 :ErrorCode;
  message @1 :Text;
  # One line for a person; no stack traces, no server file paths.
  details @2 :List(Text);
  # One line per problem, e.g. "workers.host-a.vms[2].id: ...".
  opId @3 :Text;
  # The operation the error belongs to (Control.apply: the apply's op id;
  # otherwise an id the server's log carries with the failure), or "".
}

# ---------------------------------------------------------------- diffs

struct PowerChange {
  vmId @0 :Text;
  from @1 :PowerState;
  to @2 :PowerState;
}

struct WorkerDiff {
  workerId @0 :Text;
  added @1 :List(Text);
  replaced @2 :List(Text);
  removed @3 :List(Text);
  powerChanged @4 :List(PowerChange);
  updated @5 :List(Text);
  # VMs whose entry changed in another way (resources with an explicit,
  # unchanged hash): the worker gets the new assignment, the VM is kept.
}

struct FleetPart {
  name @0 :Text;
  # A worker id (its pinned VMs), or "" for the settings part (the unpinned
  # VMs, the placement strategy, the rollout settings).
  digest @1 :Data;
  # SHA-256 (32 bytes) of the part's canonical JSON, as
  # procurator/core/fleetpatch.py writes down.
}

struct FleetPatch {
  # A fleet file by parts (docs/ARCHITECTURE.md, "Fleet patches"): the
  # fleet is exactly the parts listed, each either carried here or held by
  # the master under that digest (from the fleet it last applied).
  parts @0 :List(FleetPart);
  # Every part of the fleet, sorted by name (so the settings part first);
  # a worker not listed is assigned nothing, as in a whole apply. A big
  # worker may be listed by its chunks instead of its part: entries named
  # "<worker id>/<first VM id>" (no worker id has a "/"), each a run of its
  # VMs by id (core/fleetpatch.py). Added with chunks, no new field: a
  # master older than chunks refuses such a name as a worker id, and the
  # client then lists whole parts; an older client lists no chunks.
  fleet @1 :Fleet;
  # The parts carried: its workers are the worker parts carried, and the
  # chunks carried, each as an entry of its worker (a worker listed by
  # chunks may appear once per chunk); its other fields are the settings
  # part when `settingsSent` (else left unset).
  settingsSent @2 :Bool;
}

struct ApplyResult {
  union {
    ok :group {
      generation @0 :UInt64;
      # The new generation, or the current one when nothing changed.
      changed @1 :Bool;
      diffs @2 :List(WorkerDiff);
      # Only workers whose assignment changes.
      opId @3 :Text;
      dryRun @4 :Bool;
      replayed @6 :Bool;
      # True when the apply's requestId matched an apply the master had
      # already committed: this is that apply's result (its generation, diffs
      # and op id) and nothing was applied again. Added after version 1's
      # first release; older masters never set it.
      placed @7 :List(PlacedVm);
      # The unpinned VMs the apply places or moves (not those that keep
      # their worker), sorted by VM id; empty for a replay.
      rolloutId @8 :Text;
      # The rollout the apply started ("" for none: docs/ROLLOUTS.md).
    }
    error @5 :Error;
  }
}

enum PlacementReason {
  # Why an unpinned VM goes where an apply puts it (docs/SCHEDULING.md).
  new @0;
  kept @1;
  workerGone @2;
  workerLost @3;
  workerDraining @4;
  constraints @5;     # its constraints no longer match its worker
  noLongerFits @6;
}

struct PlacedVm {
  vmId @0 :Text;
  workerId @1 :Text;
  previousWorker @2 :Text;
  # "" for a VM that had no worker.
  reason @3 :PlacementReason;
  detail @4 :Text;
  # For a move: what the previous worker lacks, in words.
}

# ---------------------------------------------------------------- snapshots

struct Snapshot {
  # A VM's memory, device state and writable disks at one instant, kept by
  # the worker that runs the VM (docs/SNAPSHOTS.md).
  vmId @0 :Text;
  name @1 :Text;
  # 1-63 characters of a-z, 0-9 and '-' (the VM id rule).
  hash @2 :Text;
  # The VM's identity when it was taken: restored only onto the same hash
  # unless forced.
  image @3 :Text;
  sizeBytes @4 :UInt64;
  createdUnixMs @5 :Int64;
  opId @6 :Text;
  driver @7 :Text;
  workerId @8 :Text;
  # Where it lives ("" in a worker's own answers: the master fills it).
}

enum SnapshotAction {
  create @0;
  delete @1;
  restore @2;
}

struct SnapshotRequest {
  action @0 :SnapshotAction;
  vmId @1 :Text;
  name @2 :Text;
  # "" with create: named after its time.
  force @3 :Bool;
  # restore: load a snapshot of another image hash of the VM anyway.
  opId @4 :Text;
  # Set by the master (its answer to a Control call carries it); ignored
  # in a Control request.
}

struct SnapshotResult {
  union {
    snapshot @0 :Snapshot;
    # The snapshot created, deleted or restored.
    error @1 :Error;
  }
}

struct SnapshotListResult {
  union {
    snapshots @0 :List(Snapshot);
    error @1 :Error;
  }
}

# ---------------------------------------------------------------- moves

struct Move {
  # One move of a VM to another worker (docs/SNAPSHOTS.md, "Moves").
  vmId @0 :Text;
  source @1 :Text;
  target @2 :Text;
  kind @3 :Text;
  # "cold" or "live".
  phase @4 :Text;
  # "pending", "preparing", "stopping", "transferring", "migrating" (a
  # live move's), "switching", "done" or "failed"; a reader that does not
  # know a phase shows it as it is.
  opId @5 :Text;
  startedUnixMs @6 :Int64;
  updatedUnixMs @7 :Int64;
  deadlineUnixMs @8 :Int64;
  # A move not done by then fails (before its switch: the VM stays on
  # the source).
  generation @9 :UInt64;
  # The generation that began the current phase (0 while pending).
  reason @10 :Text;
  # Why it failed ("" otherwise).
  progress @11 :Text;
  # While transferring: "N%" of the disks' bytes sent, as the source
  # reports it ("" otherwise).
}

struct MoveResult {
  union {
    move @0 :Move;
    error @1 :Error;
  }
}

struct MoveListResult {
  union {
    moves @0 :List(Move);
    error @1 :Error;
  }
}

# ---------------------------------------------------------------- interfaces

interface Node {
  # Implemented by a worker, handed to the master in `register`.
  push @0 (assignment :Assignment) -> (error :Error);
  # The master pushes a new assignment. Returns once the worker has taken
  # note of it (not when it has converged). Pushes may arrive out of order or
  # be lost; the worker ignores generations older than the newest it has.
  # `error` is set when the worker refuses the assignment (not for it, or
  # malformed). Added after version 1's first release: an older worker
  # raises an RPC exception instead, an older master ignores it.
  pushChanges @1 (changes :AssignmentChanges) -> (error :Error);
  # What a master pushes once the worker has a whole assignment on this
  # session (pushed, or pulled): only what changed since the generation the
  # worker was last given. Answered like `push`; changes to a generation the
  # worker does not hold are no error: it takes note and pulls the whole
  # assignment. Added after version 1's first release: an older worker
  # answers it with an RPC exception (unimplemented), and the master then
  # pushes whole assignments to it for the rest of the session.
  snapshot @2 (request :SnapshotRequest) -> (result :SnapshotResult);
  # Create, delete or restore a snapshot of one of the worker's VMs
  # (docs/SNAPSHOTS.md); answers once done. Added with snapshots: an older
  # worker answers with an RPC exception (unimplemented).
  listSnapshots @3 (vmId :Text) -> (result :SnapshotListResult);
  # The worker's snapshots (vmId "" for all of its VMs), oldest first.
}

interface WorkerSession {
  # Bound to one worker id by `Master.register`; a worker can only pull and
  # report for itself.
  getAssignment @0 (knownGeneration :UInt64)
      -> (assignment :Assignment, changed :Bool, error :Error);
  # `changed` is false (and `assignment.vms` empty) when knownGeneration is
  # already the newest. `error` is set when the call failed (the other
  # results then mean nothing): check it first. Added after version 1's first release: an older
  # master raises an RPC exception instead, and an older worker, which does
  # not look at it, sees "nothing changed" and pulls again at its next resync.
  reportStatus @1 (status :WorkerStatus) -> (result :ReportResult);
  reportMetrics @2 (report :MetricsReport) -> (result :ReportResult, takesChanges :Bool);
  # `takesChanges`: this master takes change reports (`MetricsReport.change`)
  # on this session from now on. Added with reports as changes: an older
  # master leaves it false, and the worker's reports to it stay whole.
  reportEvents @3 (events :List(VmEvent)) -> (result :ReportResult);
  reportStatusChanges @4 (changes :WorkerStatusChanges) -> (result :ReportResult);
  # Refused with `invalid` when the session has delivered no full status
  # yet or the changes do not fit the last one (an unknown removed id, a VM
  # named twice), and with `limitExceeded` when the merged status would be
  # over the per-worker VM limit. Either way the master keeps the status it
  # had: the worker sends a full `reportStatus` next.
  reportStatusAndEvents @5 (changes :WorkerStatusChanges, events :List(VmEvent))
      -> (result :ReportResult, eventsResult :ReportResult);
  # `reportStatusChanges(changes)` then `reportEvents(events)` in one call
  # (a burst of starts reports both for the same VMs: half the calls).
  # `result` is the status changes' (and the call's own: changes that do
  # not decode, an internal error before the events); when it is an error
  # the events were not looked at, and `eventsResult` means nothing: the
  # worker sends them again, alone. Otherwise the status changes were taken
  # and `eventsResult` is the events' result, as `reportEvents` would answer
  # it (events that do not decode, or an internal error storing them, are
  # answered there). Added with combined reports (after
  # version 1's first release): an older master answers unimplemented, and
  # the worker makes the two calls instead for the rest of the session.
}

struct ReportResult {
  union {
    ok @0 :Void;
    error @1 :Error;
  }
}

struct RegisterResult {
  union {
    session @0 :WorkerSession;
    error @1 :Error;
  }
}

interface Control {
  # For people and CI pipelines.
  apply @0 (fleet :Fleet, expected :ExpectedGeneration, dryRun :Bool, requestId :Text,
            supersede :Bool) -> (result :ApplyResult);
  # requestId makes a retry safe: "" (the default) or 1 to 64 characters of
  # [A-Za-z0-9._-], chosen by the client (one per fleet it means to apply,
  # reused only to retry that very apply). An apply whose requestId matches a
  # committed apply of the same fleet is answered with that apply's result
  # (`ok.replayed`), applying nothing; with another fleet it is refused
  # `invalid`. Anything else is refused `invalid`. Added after version 1's
  # first release: an older master ignores it. While a rollout is under way
  # an apply that changes the fleet is refused `invalid` unless `supersede`
  # (the rollout then ends failed, superseded; docs/ROLLOUTS.md).
  status @1 (waitIndex :UInt64, waitMs :UInt32) -> (status :FleetStatus, error :Error);
  # The fleet's desired and observed state. A blocking read when waitIndex
  # and waitMs are both non-zero: the answer waits (at most waitMs, capped
  # at ten minutes) until the master's change index differs from waitIndex.
  # The index changes on every apply that changes the fleet, worker status
  # report, event report, worker connect and disconnect; a client waiting
  # for convergence passes the changeIndex of its last answer instead of
  # polling. Any other value, e.g. one from before a master restart (the
  # index starts from the wall clock in microseconds), answers at once.
  # `error` is set when the call failed (`status` then means nothing):
  # check it first. Added after version 1's first release: an older master raises an
  # RPC exception instead; an older client does not look at it and would
  # take the empty status for the fleet's, so upgrade clients with masters.
  events @2 (vmId :Text, limit :UInt32, afterSeq :UInt64)
      -> (events :List(WorkerEvent), error :Error);
  # Recent events, oldest first; vmId "" means all VMs. afterSeq 0: the
  # newest `limit`. Otherwise the oldest `limit` events whose seq is greater
  # (a client following the stream passes the last seq it saw; a jump in
  # seq means events it missed were dropped from the master's history).
  # `error` as in `status` (e.g. `invalid` for a vmId that is not a VM id).
  describeVm @3 (vmId :Text, eventLimit :UInt32, waitIndex :UInt64, waitMs :UInt32)
      -> (result :DescribeResult);
  # Everything the master knows about one VM: desired and observed state and
  # its newest `eventLimit` events (0: a default). notFound when the master
  # has never heard of the VM. waitIndex and waitMs block as in status (the
  # index is the master's, not the VM's: any change of the fleet answers).
  snapshot @4 (request :SnapshotRequest) -> (result :SnapshotResult);
  # Forwarded to the worker the VM is assigned to (it must be connected to
  # this master); answers once the worker is done, with the op id in the
  # error when it failed. Added with snapshots.
  listSnapshots @5 (vmId :Text) -> (result :SnapshotListResult);
  # The snapshots of one VM (vmId set: asks its worker) or of the fleet
  # (""), oldest first, each with its workerId: what the workers connected
  # to this master answer, and the store's record of the others (their
  # last answers).
  changeWorkerMode @6 (workerId :Text, action :Text, maxUnavailable :UInt32)
      -> (result :WorkerModeResult);
  # action "cordon" (the worker takes no new VMs, keeps its own),
  # "uncordon" (ready again; ends a drain: moves in flight are called off,
  # VMs moved so far stay where they are) or "drain" (its unpinned VMs move
  # to other workers through handoffs, at most maxUnavailable at once, 0
  # meaning 1; pinned VMs stay). Idempotent; notFound for a worker the
  # master never heard of. Added with cordon and drain: an older master
  # raises an RPC exception.
  rollout @7 (rolloutId :Text, action :Text) -> (result :RolloutResult);
  # action "status", "pause", "resume", "promote" or "undo" on the rollout
  # rolloutId ("": the one under way, else the newest). notFound when there
  # is none; an action on a rollout that is over changes nothing (the
  # message says so). Added with rollouts: an older master raises an RPC
  # exception.
  move @8 (vmId :Text, target :Text, live :Bool, timeoutS :UInt32) -> (result :MoveResult);
  # Record a move of vmId to worker target (timeoutS 0: the default, 600);
  # the leader drives it through its phases (read them with `moves`). The
  # answer is the move as recorded (phase "pending", its op id), or why it
  # is refused: notFound (a VM not in the fleet), invalid (the target
  # unknown, lost, cordoned, away or full; the VM on it already, moving,
  # in a handoff or a rollout; a live move, not built yet). Added with
  # moves: an older master raises an RPC exception.
  moves @9 (vmId :Text) -> (result :MoveListResult);
  # The moves under way and the newest that are over, newest first; of
  # one VM when vmId is set. Added with moves.
  applyPatch @10 (patch :FleetPatch, expected :ExpectedGeneration, dryRun :Bool,
                  requestId :Text, supersede :Bool)
      -> (result :ApplyResult, missing :List(Text));
  # `apply` of the fleet the patch stands for (FleetPatch), with the same
  # parameters and the same result, when the master holds every part the
  # patch lists and does not carry. Otherwise `missing` names the parts it
  # does not hold (the settings part as "") and nothing is applied (not
  # even a request id recorded; `result` is then an `invalid` error saying
  # so): send the patch again carrying them. A
  # client sends digests only first. Added with fleet patches: an older
  # master raises an RPC exception (unimplemented); apply the whole fleet.
}

struct VmDescription {
  vmId @0 :Text;
  fleetGeneration @1 :UInt64;
  workerId @2 :Text;
  # The worker the VM is assigned to ("" when it is not desired anywhere).
  desiredGeneration @3 :UInt64;
  # Generation of that worker's assignment (0 when not desired).
  desiredOpId @4 :Text;
  # Operation id of the apply that produced that assignment.
  desired @5 :VmAssignment;
  # Unset when the VM is not desired (e.g. being removed).
  observedBy @6 :Text;
  # The worker whose last status report shows the VM ("" when none does).
  workerConnected @7 :Bool;
  # Whether observedBy (or else workerId) is connected.
  observedGeneration @8 :UInt64;
  # The observed generation of workerId (of observedBy when the VM is not
  # desired): the one that compares with desiredGeneration.
  status @9 :VmStatus;
  # Unset when no worker reports the VM.
  events @10 :List(WorkerEvent);
  # Newest last.
  changeIndex @11 :UInt64;
  # As in FleetStatus.
  move @12 :Move;
  # The VM's move under way, else its newest one over (among those the
  # master keeps); unset when it has none. Added with the moves' metrics:
  # an older master leaves it unset, an older reader ignores it.
}

struct DescribeResult {
  union {
    vm @0 :VmDescription;
    error @1 :Error;
  }
}

struct ExpectedGeneration {
  # Optimistic concurrency: refuse the apply unless the fleet is still at
  # this generation.
  union {
    any @0 :Void;
    generation @1 :UInt64;
  }
}

struct WorkerEvent {
  workerId @0 :Text;
  event @1 :VmEvent;
  seq @2 :UInt64;
  # Assigned by the master as it receives events: increasing, also across
  # master restarts (it starts from the wall clock in microseconds).
}

interface Master {
  # The bootstrap capability of every connection to the master.
  register @0 (info :WorkerInfo, node :Node) -> (result :RegisterResult);
  control @1 () -> (result :ControlResult);
}

struct ControlResult {
  union {
    control @0 :Control;
    error @1 :Error;
  }
}
