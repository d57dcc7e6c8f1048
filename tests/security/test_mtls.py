"""Mutual TLS and authorization, against real master processes on real
sockets: who may connect, who may register as which worker, who may apply."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import capnp
import pytest
import trio
from sechelpers import MasterProcess, Pki, cli, master_process, plain_env

from procurator.app.worker import WorkerConfig, run_worker
from procurator.core.errors import UnauthorizedError, UnavailableError
from procurator.core.models import Assignment, WorkerInfo, WorkerStatus
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.rpc.tls import MASTER_SERVER_NAME, TlsFiles

IMAGE = "/nix/store/" + "a" * 32 + "-web-vm"


async def _nothing(assignment: Assignment) -> None:
    pass


def _port(master: MasterProcess) -> int:
    return int(master.address.rsplit(":", 1)[1])


def _refused_after_handshake(port: int, context: ssl.SSLContext) -> str:
    """Handshake with ``context``, then read; returns how the master ended
    the connection. TLS 1.3: the server judges the client certificate after
    the client's side of the handshake is done, so its verdict shows on the
    first read: the connection closes (asyncio's server drops it without
    flushing an alert) or an alert arrives. A master that accepted us would
    wait for a Cap'n Proto message instead, and this would time out."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=MASTER_SERVER_NAME) as tls,
    ):
        try:
            data = tls.recv(1)
        except (ssl.SSLError, ConnectionResetError) as exc:
            return f"refused: {exc}"
        assert data == b"", f"the master sent data to an unauthenticated client: {data!r}"
        return "closed"


async def _still_serves(bridge: Bridge, master: MasterProcess, pki: Pki) -> None:
    async with open_control(bridge, master.address, tls=pki.files("control-ci")) as client:
        status = await client.status()
    assert status.generation >= 0


def test_pycapnp_still_lets_us_see_the_peer_certificate() -> None:
    # procurator.rpc.bridge.start_listener relies on this pycapnp internal
    # to reach the TLS transport of an accepted connection.
    assert callable(getattr(capnp.AsyncIoStream, "_connect", None))


async def test_worker_and_cli_over_mutual_tls(
    tmp_path: Path, pki: Pki, tls_master: MasterProcess, bridge: Bridge
) -> None:
    config = WorkerConfig(
        worker_id="host-a",
        runtime=None,
        master=tls_master.address,
        state_dir=tmp_path / "worker",
        tls=pki.files("worker-host-a"),
    )
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        textwrap.dedent(f"""\
        [workers.host-a]
        vms = [ {{ id = "web-1", image = "{IMAGE}" }} ]
        """)
    )
    async with trio.open_nursery() as nursery:
        link = await nursery.start(run_worker, config)
        with trio.fail_after(30):
            await link.wait_connected()
        # The CLI applies with a control certificate given as flags; the
        # worker takes the push and reports it observed (--wait returns 0).
        applied = await trio.to_thread.run_sync(
            lambda: cli(
                "apply",
                str(fleet),
                "--master",
                tls_master.address,
                "--wait",
                "--timeout",
                "60",
                *pki.flags("control-ci"),
            )
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "applied as generation 1" in applied.stdout
        assert link.newest_generation == 1
        # status, with the TLS files given through the environment instead.
        files = pki.files("control-ci")
        status = await trio.to_thread.run_sync(
            lambda: cli(
                "status",
                "--json",
                "--master",
                tls_master.address,
                env={
                    "PROCURATOR_TLS_CERT": str(files.cert),
                    "PROCURATOR_TLS_KEY": str(files.key),
                    "PROCURATOR_TLS_CA": str(files.ca),
                },
            )
        )
        assert status.returncode == 0, status.stderr
        (worker,) = json.loads(status.stdout)["workers"]
        assert worker["worker_id"] == "host-a"
        assert worker["connected"] is True
        assert worker["observed_generation"] == 1
        # describe and events speak TLS too (flags as for apply).
        for args in (("describe", "vm", "web-1", "--json"), ("events", "--json")):
            shown = await trio.to_thread.run_sync(
                lambda args=args: cli(
                    *args, "--master", tls_master.address, *pki.flags("control-ci")
                )
            )
            assert shown.returncode == 0, shown.stdout + shown.stderr
        nursery.cancel_scope.cancel()
    assert "mutual TLS" in tls_master.text()


def test_worker_process_registers_over_tls(
    tmp_path: Path, pki: Pki, tls_master: MasterProcess
) -> None:
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "procurator",
                "worker",
                "--id",
                "host-a",
                "--master",
                tls_master.address,
                "--state-dir",
                str(tmp_path / "worker"),
                "--driver",
                "qemu",
                "--no-network",
                "--metrics-listen",
                "",
                *pki.flags("worker-host-a"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=plain_env(),
        )
    try:
        tls_master.wait_for_log(r"worker host-a connected")
        status = cli("status", "--json", "--master", tls_master.address, *pki.flags("control-ci"))
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["workers"][0]["connected"] is True
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_a_worker_certificate_registers_only_its_own_id(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    dialer = CapnpMasterDialer(bridge, tls_master.address, tls=pki.files("worker-host-a"))
    with pytest.raises(UnauthorizedError, match="may not register as worker 'host-b'"):
        await dialer.connect(WorkerInfo("host-b"), _nothing)
    assert "register refused" in tls_master.text()
    # Its own id works, and the session it gets reports only for itself.
    session = await dialer.connect(WorkerInfo("host-a"), _nothing)
    try:
        await session.report_status(WorkerStatus("host-a", 0))
        with pytest.raises(UnauthorizedError, match="cannot report status for worker 'host-b'"):
            await session.report_status(WorkerStatus("host-b", 0))
        assert await session.get_assignment(0) is None
    finally:
        await session.aclose()
    # host-b's own certificate may register host-b.
    other = CapnpMasterDialer(bridge, tls_master.address, tls=pki.files("worker-host-b"))
    await (await other.connect(WorkerInfo("host-b"), _nothing)).aclose()


async def test_a_worker_certificate_cannot_use_control(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    with pytest.raises(UnauthorizedError, match="may not use the control interface"):
        async with open_control(bridge, tls_master.address, tls=pki.files("worker-host-a")):
            pass
    assert "control refused" in tls_master.text()
    result = await trio.to_thread.run_sync(
        lambda: cli("status", "--master", tls_master.address, *pki.flags("worker-host-a"))
    )
    assert result.returncode == 1
    assert "may not use the control interface" in result.stderr


async def test_a_control_certificate_cannot_register(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    dialer = CapnpMasterDialer(bridge, tls_master.address, tls=pki.files("control-ci"))
    with pytest.raises(UnauthorizedError, match="may not register workers"):
        await dialer.connect(WorkerInfo("ci"), _nothing)


async def test_no_client_certificate_is_refused_in_the_handshake(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    anonymous = ssl.create_default_context(cafile=str(pki.fleet / "ca.crt"))
    await trio.to_thread.run_sync(_refused_after_handshake, _port(tls_master), anonymous)
    await _still_serves(bridge, tls_master, pki)


async def test_a_certificate_of_another_ca_is_refused(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    stranger = ssl.create_default_context(cafile=str(pki.fleet / "ca.crt"))
    foreign = pki.files("control-ci", foreign=True)
    stranger.load_cert_chain(str(foreign.cert), str(foreign.key))
    await trio.to_thread.run_sync(_refused_after_handshake, _port(tls_master), stranger)
    # Through our own client: the refusal is named for what it most likely is.
    with pytest.raises(UnavailableError, match="refused this certificate"):
        async with open_control(bridge, tls_master.address, tls=pki.stranger("control-ci")):
            pass
    await _still_serves(bridge, tls_master, pki)


async def test_a_master_of_another_ca_is_not_trusted(
    tmp_path: Path, pki: Pki, bridge: Bridge
) -> None:
    with master_process(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        *pki.flags("master", foreign=True),
        name="impostor",
    ) as impostor:
        with pytest.raises(UnauthorizedError, match="certificate is not trusted"):
            async with open_control(bridge, impostor.address, tls=pki.files("control-ci")):
                pass
        dialer = CapnpMasterDialer(bridge, impostor.address, tls=pki.files("worker-host-a"))
        with pytest.raises(UnauthorizedError, match="certificate is not trusted"):
            await dialer.connect(WorkerInfo("host-a"), _nothing)


async def test_a_worker_certificate_cannot_pose_as_the_master(
    tmp_path: Path, pki: Pki, bridge: Bridge
) -> None:
    with (
        master_process(
            tmp_path,
            "--listen",
            "127.0.0.1:0",
            *pki.flags("worker-host-a"),
            name="impostor",
        ) as impostor,
        pytest.raises(UnauthorizedError, match="certificate is not trusted"),
    ):
        async with open_control(bridge, impostor.address, tls=pki.files("control-ci")):
            pass


async def test_a_plaintext_client_is_refused_and_others_are_served(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    with pytest.raises(UnavailableError):
        async with open_control(bridge, tls_master.address):  # loopback: plaintext allowed
            pass
    dialer = CapnpMasterDialer(bridge, tls_master.address)
    with pytest.raises(UnavailableError):
        await dialer.connect(WorkerInfo("host-a"), _nothing)
    # Raw garbage where a ClientHello should be.
    with socket.create_connection(("127.0.0.1", _port(tls_master)), timeout=30) as raw:
        raw.sendall(b"\x00" * 64 + b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            # The master answers with an alert or just closes; either way
            # this returns once it is done with us.
            while await trio.to_thread.run_sync(raw.recv, 1024):
                pass
    await _still_serves(bridge, tls_master, pki)
    assert tls_master.popen.poll() is None


def test_plaintext_off_loopback_is_refused_unless_insecure(tmp_path: Path, pki: Pki) -> None:
    refused = cli(
        "master", "--listen", "0.0.0.0:0", "--db", str(tmp_path / "m.db"), "--metrics-listen", ""
    )
    assert refused.returncode == 1
    assert "refusing plaintext Cap'n Proto on a non-loopback address" in refused.stderr
    assert "--insecure" in refused.stderr

    with master_process(
        tmp_path, "--listen", "0.0.0.0:0", "--insecure", name="insecure"
    ) as insecure:
        assert "INSECURE" in insecure.text()
        assert "plaintext" in insecure.text()

    # TLS material makes a non-loopback listen fine.
    with master_process(
        tmp_path, "--listen", "0.0.0.0:0", *pki.flags("master"), name="tls"
    ) as secure:
        assert "mutual TLS" in secure.text()

    # Clients refuse before dialing (192.0.2.0/24 is TEST-NET-1: nobody there).
    for args in (
        ("status", "--master", "192.0.2.1:7300"),
        ("apply", str(tmp_path / "none.toml"), "--master", "192.0.2.1:7300"),
    ):
        (tmp_path / "none.toml").write_text("")
        result = cli(*args)
        assert result.returncode == 1, result
        assert "refusing plaintext" in result.stderr, result.stderr
    worker = cli(
        "worker",
        "--id",
        "host-a",
        "--master",
        "192.0.2.1:7300",
        "--state-dir",
        str(tmp_path / "w"),
        "--driver",
        "qemu",
        "--no-network",
        "--metrics-listen",
        "",
    )
    assert worker.returncode == 1
    assert "refusing plaintext" in worker.stderr

    partial = cli("status", "--master", "192.0.2.1:7300", "--tls-cert", "/x.crt")
    assert partial.returncode == 1
    assert "--tls-key, --tls-ca missing" in partial.stderr


def _openssl_steps() -> str:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md").read_text()
    match = re.search(r"```bash\n# openssl-steps\n(.*?)```", doc, re.S)
    assert match is not None, "docs/SECURITY.md lost its openssl-steps block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_the_documented_openssl_steps_make_a_working_fleet(
    tmp_path: Path, bridge: Bridge
) -> None:
    pki_dir = tmp_path / "openssl-pki"
    pki_dir.mkdir()
    made = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            ["bash", "-c", _openssl_steps()],
            cwd=pki_dir,
            capture_output=True,
            text=True,
            check=False,
        )
    )
    assert made.returncode == 0, made.stderr

    def files(stem: str) -> TlsFiles:
        return TlsFiles(pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key", pki_dir / "ca.crt")

    master_files = files("master")
    with master_process(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(master_files.cert),
        "--tls-key",
        str(master_files.key),
        "--tls-ca",
        str(master_files.ca),
    ) as master:
        dialer = CapnpMasterDialer(bridge, master.address, tls=files("worker-host-a"))
        await (await dialer.connect(WorkerInfo("host-a"), _nothing)).aclose()
        with pytest.raises(UnauthorizedError):
            await dialer.connect(WorkerInfo("host-b"), _nothing)
        async with open_control(bridge, master.address, tls=files("control-ci")) as client:
            assert (await client.status()).generation == 0
