"""Helpers for the VMM driver and VmManager tests (fixtures: conftest.py).

Every VMM here is the fake cloud-hypervisor (tests/fakes/cloud-hypervisor-fake.py),
a real process serving the REST API on a real unix socket. When the
cloud-hypervisor OpenAPI description is available (../shared/reference, or
$PROCURATOR_CHV_OPENAPI), every request the driver sends and every response
the fake returns is validated against it through httpx event hooks; a test
that produced an invalid message fails at teardown. Without the file the
lifecycle tests still run, and the conformance tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from openapi_core import OpenAPI
from openapi_core.exceptions import OpenAPIError
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.testing import MockRequest, MockResponse

from procurator.core.backoff import RestartPolicy
from procurator.core.jail import JailPolicy
from procurator.core.models import EventKind, Phase, VmEvent
from procurator.core.vmdef import VmDefinition
from procurator.worker import cgroups
from procurator.worker.jail import Jail, Jailer, instance_name
from procurator.worker.manager import Timeouts, VmManager, VmObservation
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm._unix_http import UnixSocketTransport
from procurator.worker.vmm.base import VmmHandle, VmmPaths
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver, default_transport

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fakes" / "cloud-hypervisor-fake.py"
#: Files a VM definition can name for the fake (which never reads them): a
#: jail exposes only paths that exist.
GUEST = REPO / "tests" / "fakes" / "guest"
#: Where this session's VM cgroups go (tests/conftest.py sets it).
CGROUP_PARENT = os.environ.get("PROCURATOR_CGROUP_PARENT", "procurator-test")


def make_jail(state_dir: Path, jailer: Jailer | None = None, **policy: Any) -> Jail:
    """A worker's jail on ``state_dir``, VM cgroups under this session's
    parent (``jailer``: a shared jailer, else the jail starts its own)."""
    policy.setdefault("cgroup_parent", CGROUP_PARENT)
    return Jail(
        JailPolicy(**policy),
        state_dir,
        cgroups=cgroups.detect(policy["cgroup_parent"], instance_name(state_dir)),
        jailer=jailer,
    )


def vm_paths(state_dir: Path, vm_id: str) -> VmmPaths:
    """The paths the worker gives VM ``vm_id``."""
    return StateDir(state_dir).paths(vm_id)


def fake_driver(**kwargs: Any) -> CloudHypervisorDriver:
    """The cloud-hypervisor driver running the fake VMM (the interpreter,
    with the fake's script as its first argument)."""
    return CloudHypervisorDriver(sys.executable, args=[str(FAKE)], **kwargs)


OPENAPI = Path(
    os.environ.get(
        "PROCURATOR_CHV_OPENAPI",
        REPO.parent / "shared" / "reference" / "cloud-hypervisor-openapi.yaml",
    )
)
U64_MAX = 2**64 - 1

# Small figures so faults play out in well under a second; generous
# deadlines so a loaded machine cannot make a test flaky.
FAST = Timeouts(
    spawn=20.0,
    api=1.0,
    boot=20.0,
    health_interval=0.1,
    hung_after=2,
    counters_interval=0.1,
    power_button_wait=3.0,
    shutdown_vmm_wait=3.0,
    sigterm_wait=0.5,
    sigkill_wait=5.0,
    ensure=60.0,
)
FAST_POLICY = RestartPolicy(
    initial_delay=0.05, max_delay=0.2, stable_after=60.0, crash_loop_after=3
)


#: A NIC for a VmConfig's ``net``. Its tap does not exist: only for VMMs
#: launched without a jail (a jail gives the VM's tap to its uid, and
#: refuses a tap that is not there).
NET = {"tap": "vm-tap0", "mac": "52:54:00:12:34:56", "id": "net0"}


def definition(**extra: Any) -> VmDefinition:
    """A plausible, already-confined VM (``config`` as a definition)."""
    return VmDefinition.from_vm_config(config(**extra))


def config(**extra: Any) -> dict[str, Any]:
    """A plausible, already-confined VmConfig (the JSON a VMM is given),
    without a NIC (``NET``)."""
    base: dict[str, Any] = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": str(GUEST / "vmlinux"), "cmdline": "console=ttyS0"},
        "disks": [{"path": str(GUEST / "disk.img"), "id": "disk0", "readonly": True}],
        "serial": {"mode": "Off"},
        "console": {"mode": "Off"},
    }
    base.update(extra)
    return base


# -- OpenAPI validation ---------------------------------------------------------


def _string_keys(value: Any) -> Any:
    # YAML reads `200:` as an int; OpenAPI wants status codes as strings.
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _without_u64_max(value: Any) -> Any:
    # cloud-hypervisor reports unset latency counters as u64::MAX while its
    # API description says int64: the one known gap between the real API and
    # its description. Validate everything else about the counters.
    if isinstance(value, dict):
        return {k: _without_u64_max(v) for k, v in value.items()}
    return 2**63 - 1 if value == U64_MAX else value


class ApiValidator:
    """Validates requests and responses on the wire against the OpenAPI file."""

    def __init__(self, spec_path: Path) -> None:
        self.api = OpenAPI.from_dict(_string_keys(yaml.safe_load(spec_path.read_text())))
        self.errors: list[str] = []
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def transport(self, api_socket: str) -> httpx.BaseTransport:
        """The driver's own transport, every request and answer checked."""
        return _ValidatingTransport(default_transport(api_socket), self)

    def check_request(self, method: str, path: str, body: bytes, content_type: str) -> None:
        request = MockRequest(
            "http://localhost", method, path, data=body or None, content_type=content_type
        )
        with self._lock:
            self.seen[f"{method.upper()} {path}"] += 1
            try:
                self.api.validate_request(request)
            except Exception as exc:
                self.errors.append(f"request {method.upper()} {path}: {_explain(exc)}")

    def check_response(
        self, method: str, path: str, status: int, body: bytes, content_type: str
    ) -> None:
        where = f"response {status} to {method.upper()} {path}"
        if path.endswith("/vm.counters") and status == 200:
            body = json.dumps(_without_u64_max(json.loads(body))).encode()
        request = MockRequest("http://localhost", method, path)
        response = MockResponse(body, status, content_type=content_type)
        with self._lock:
            try:
                self.api.validate_response(request, response)
            except ResponseNotFound:
                # Error statuses the description does not list: check the
                # documented error shape (a JSON list of messages) instead.
                if status < 400 or not _is_error_list(body):
                    self.errors.append(f"{where}: not in the API description: {body[:200]!r}")
            except OpenAPIError as exc:
                self.errors.append(f"{where}: {_explain(exc)}")
            if status >= 400 and not _is_error_list(body):
                self.errors.append(f"{where}: error body is not a list of messages: {body!r}")


def walk_documented_api(
    driver: CloudHypervisorDriver, paths: VmmPaths, openapi: ApiValidator
) -> None:
    """Every endpoint a fake VMM serves, in every state, through a
    validating client (request and answer checked against the OpenAPI
    description): a VMM launched as ``driver`` launches one, without a VM,
    walked from 404s before ``vm.create`` to ``vmm.shutdown``, after which
    it must exit. The conformance check of every fake VMM we run (the test
    fake, bench/tiny_vmm.c)."""
    # A VMM without a VM: the fake launched as the driver would, not booted.
    pid, ticks = process.launch_detached(
        driver.argv(paths), vm_dir=paths.vm_dir, log_path=paths.vm_dir / "vmm.stdout"
    )
    handle = VmmHandle(driver.name, pid, ticks, str(paths.api_socket))
    try:
        process.wait_for_api(
            handle,
            lambda seconds: driver.ping(handle, timeout=seconds),
            deadline=time.monotonic() + 20.0,
            who="the fake",
        )
        client = httpx.Client(transport=openapi.transport(handle.api_socket), trust_env=False)
        with client:
            base = "http://localhost/api/v1/"
            # Before vm.create: 404s with error lists.
            for method, endpoint in [
                ("GET", "vm.info"),
                ("GET", "vm.counters"),
                ("PUT", "vm.boot"),
                ("PUT", "vm.pause"),
                ("PUT", "vm.power-button"),
            ]:
                assert client.request(method, base + endpoint).status_code == 404
            assert client.get(base + "vmm.ping").status_code == 200
            assert client.put(base + "vm.create", json=config()).status_code == 204
            assert client.put(base + "vm.create", json=config()).status_code == 400
            assert client.put(base + "vm.boot").status_code == 204
            for endpoint in ["vm.counters", "vm.counters", "vm.info"]:
                assert client.get(base + endpoint).status_code == 200
            for endpoint, status in [
                ("vm.resume", 405),
                ("vm.pause", 204),
                ("vm.pause", 405),
                ("vm.resume", 204),
                ("vm.reboot", 204),
                ("vm.shutdown", 204),
                ("vm.delete", 204),
            ]:
                assert client.put(base + endpoint).status_code == status, endpoint
            assert client.get(base + "vm.info").status_code == 404
            assert client.put(base + "vmm.shutdown").status_code == 204
        assert process.wait_exit(handle.pid, handle.pid_start_ticks, 10.0)
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
    assert sum(openapi.seen.values()) >= 20
    assert not openapi.errors


class _ValidatingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, validator: ApiValidator) -> None:
        self._inner = inner
        self._validator = validator

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method.lower(), request.url.path
        request.read()
        self._validator.check_request(
            method, path, request.content, request.headers.get("content-type", "")
        )
        response = self._inner.handle_request(request)
        response.read()
        self._validator.check_response(
            method,
            path,
            response.status_code,
            response.content,
            response.headers.get("content-type", "") if response.content else "",
        )
        return response

    def close(self) -> None:
        self._inner.close()


def api_client(api_socket: str) -> httpx.Client:
    """A plain httpx client on a VMM's API socket, for calls behind the
    worker's back."""
    return httpx.Client(transport=UnixSocketTransport(api_socket), trust_env=False)


def _is_error_list(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, list) and all(isinstance(item, str) for item in data)


# -- processes and state --------------------------------------------------------


@dataclass
class ApiCalls:
    """Every API call the driver made: (endpoint, seconds, ok)."""

    calls: list[tuple[str, float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, endpoint: str, seconds: float, ok: bool) -> None:
        with self.lock:
            self.calls.append((endpoint, seconds, ok))

    def count(self) -> int:
        with self.lock:
            return len(self.calls)

    def endpoints(self) -> list[str]:
        with self.lock:
            return [c[0] for c in self.calls]


def vmm_pids_under(root: Path) -> dict[int, int]:
    """pid -> start ticks of every live process whose command line mentions
    ``root`` (the fake VMMs of one test's state dir)."""
    needle = str(root).encode()
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and b"cloud-hypervisor" in cmdline:
            ticks = process.pid_start_ticks(int(entry))
            if ticks is not None:
                found[int(entry)] = ticks
    return found


def kill_all_under(root: Path) -> None:
    for pid, ticks in vmm_pids_under(root).items():
        process.signal_process(pid, ticks, signal.SIGKILL)
        process.wait_exit(pid, ticks, 5.0)


class Recorder:
    """Collects on_change calls; lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.changes: list[tuple[VmObservation, VmEvent | None]] = []

    def __call__(self, obs: VmObservation, event: VmEvent | None) -> None:
        with self.cond:
            self.changes.append((obs, event))
            self.cond.notify_all()

    def events(self, vm_id: str | None = None) -> list[VmEvent]:
        with self.cond:
            return [e for _, e in self.changes if e is not None and vm_id in (None, e.vm_id)]

    def kinds(self, vm_id: str) -> list[EventKind]:
        return [e.kind for e in self.events(vm_id)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"condition not met within {timeout} s; last changes: "
                        + "; ".join(
                            f"{o.vm_id} {o.phase.value} {o.message!r} {e.kind.value if e else ''}"
                            for o, e in self.changes[-8:]
                        )
                    )
                self.cond.wait(min(left, 0.05))


ManagerFactory = Callable[..., VmManager]


class RemovalGate:
    """``on_change``: holds the supervisor's thread at the start of its
    removal (its "removing" observation) until ``open``."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def __call__(self, obs: VmObservation, event: object) -> None:
        if obs.phase is Phase.REMOVING and obs.message == "removing":
            self.reached.set()
            assert self.opened.wait(60), "the test never opened the gate"  # a hang guard


def write_faults(state_dir: Path, vm_id: str, faults: dict[str, Any]) -> Path:
    """Fault controls for the fake VMM of one VM (read on every request)."""
    sock = StateDir(state_dir).paths(vm_id).api_socket
    sock.parent.mkdir(parents=True, exist_ok=True)
    path = Path(f"{sock}.fault")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(faults))
    tmp.replace(path)
    return path


def _explain(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return text
