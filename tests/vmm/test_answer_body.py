"""How the cloud-hypervisor driver takes an answer's body (issue 31 target 3:
the sweep's counters call). An answer its transport read whole (an in-memory
``httpx.ByteStream``, no content coding) is taken from its stream as it is;
a streamed one is read as httpx reads it and closed; one with a content
coding (never asked for) is refused, never decoded. A
hand-written transport (the driver's ``TransportFactory`` port) answers."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import httpx
import pytest

from procurator.worker.vmm.base import VmmError, VmmHandle, VmmRejected
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

HANDLE = VmmHandle("cloud-hypervisor", pid=1, pid_start_ticks=1, api_socket="/nonexistent.sock")
COUNTERS = {"_net0": {"rx_bytes": 1500, "rx_frames": 1}, "_disk0": {"read_ops": 2}}


class _Streamed(httpx.SyncByteStream):
    """A body that comes in pieces and must be closed (as from a pooled
    connection)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces

    def close(self) -> None:
        self.closed = True


class Answering(httpx.BaseTransport):
    """Answers every request with the next of ``answers``."""

    def __init__(self, answers: list[httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.pop(0)


def driver_answering(*answers: httpx.Response) -> CloudHypervisorDriver:
    transport = Answering(list(answers))
    return CloudHypervisorDriver("cloud-hypervisor", transport_factory=lambda _path: transport)


def test_an_answer_read_whole_is_taken_as_it_is() -> None:
    body = json.dumps(COUNTERS).encode()
    driver = driver_answering(
        httpx.Response(
            200,
            headers=[(b"Content-Type", b"application/json")],
            stream=httpx.ByteStream(body),
        )
    )
    assert driver.counters(HANDLE, timeout=1.0) == COUNTERS


def test_an_answer_with_a_content_coding_is_refused_not_decoded() -> None:
    # The driver asks for no coding (no Accept-Encoding) and cloud-hypervisor
    # sends none: a coded answer is a broken or hostile VMM. Decoded, 17 KiB
    # of gzip here would become 17 MiB, past the transport's 16 MiB bound on
    # a body (a 16 MiB body, ~16 GiB), all of it in the worker's memory.
    bomb = json.dumps({"state": "Running", "pad": "0" * (17 << 20)}).encode()
    driver = driver_answering(
        httpx.Response(
            200,
            headers=[(b"Content-Encoding", b"gzip")],
            stream=httpx.ByteStream(gzip.compress(bomb, compresslevel=1)),
        ),
        httpx.Response(
            200,
            headers=[(b"Content-Encoding", b"identity")],
            stream=httpx.ByteStream(json.dumps(COUNTERS).encode()),
        ),
    )
    with pytest.raises(VmmError, match="content coding 'gzip'"):
        driver.info(HANDLE, timeout=1.0)
    assert driver.counters(HANDLE, timeout=1.0) == COUNTERS  # identity is no coding


@pytest.mark.parametrize(
    ("codings", "refused"),
    [
        ([b"Identity"], None),
        ([b" identity "], None),
        ([b""], None),
        ([b"identity", b"identity"], None),
        ([b"identity", b"gzip"], "gzip"),
        ([b"br"], "br"),
    ],
)
def test_each_content_coding_header_is_checked(codings: list[bytes], refused: str | None) -> None:
    driver = driver_answering(
        httpx.Response(
            200,
            headers=[(b"Content-Encoding", coding) for coding in codings],
            stream=httpx.ByteStream(json.dumps(COUNTERS).encode()),
        )
    )
    if refused is None:
        assert driver.counters(HANDLE, timeout=1.0) == COUNTERS
    else:
        with pytest.raises(VmmError, match=f"content coding '{refused}'"):
            driver.counters(HANDLE, timeout=1.0)


def test_a_streamed_answer_is_read_and_closed() -> None:
    stream = _Streamed([b'{"state": ', b'"Running"}'])
    driver = driver_answering(httpx.Response(200, stream=stream))
    assert driver.info(HANDLE, timeout=1.0) == {"state": "Running"}
    assert stream.closed


def test_an_error_answer_keeps_its_chain_either_way() -> None:
    chain = json.dumps(["Error from API", "The VM is not created"]).encode()
    driver = driver_answering(
        httpx.Response(400, stream=httpx.ByteStream(chain)),
        httpx.Response(500, stream=_Streamed([chain[:5], chain[5:]])),
    )
    with pytest.raises(VmmRejected) as rejected:
        driver.pause(HANDLE, timeout=1.0)
    assert rejected.value.details == ("Error from API", "The VM is not created")
    with pytest.raises(VmmError) as failed:
        driver.pause(HANDLE, timeout=1.0)
    assert failed.value.details == ("Error from API", "The VM is not created")


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"], ids=["invalid", "not-an-object"])
def test_a_body_that_is_not_a_json_object_names_the_endpoint(body: bytes) -> None:
    driver = driver_answering(httpx.Response(200, stream=httpx.ByteStream(body)))
    with pytest.raises(VmmError, match=r"for /api/v1/vm\.counters"):
        driver.counters(HANDLE, timeout=1.0)
