"""The cloud-hypervisor driver builds a bodiless request once and sends it
again (issue 31 target 3: building it was a fifth of the sweep's counters
call); a request with a body, or past the bound of kinds, is built anew."""

from __future__ import annotations

from procurator.worker.vmm import cloud_hypervisor as ch


def test_a_bodiless_request_is_built_once_and_sent_as_built() -> None:
    first = ch._request("GET", "vm.counters", 1.0, None)
    again = ch._request("GET", "vm.counters", 1.0, None)
    assert again is first
    assert first.method == "GET"
    assert first.url.path == "/api/v1/vm.counters"
    assert first.read() == b""
    assert first.extensions["timeout"] == {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}
    # Another timeout is another request: each call keeps its own bound.
    assert ch._request("GET", "vm.counters", 5.0, None).extensions["timeout"]["read"] == 5.0


def test_a_request_with_a_body_is_never_kept() -> None:
    body = {"payload": {"kernel": "/k"}}
    one = ch._request("PUT", "vm.create", 1.0, body)
    two = ch._request("PUT", "vm.create", 1.0, {"payload": {"kernel": "/other"}})
    assert one is not two
    assert b"/other" in two.read()


def test_timeouts_left_of_a_deadline_do_not_grow_the_kept_requests() -> None:
    for i in range(3 * ch._MAX_KEPT_REQUESTS):
        request = ch._request("GET", "vm.info", 0.5 + i / 1000, None)
        assert request.extensions["timeout"]["read"] == 0.5 + i / 1000
    assert len(ch._REQUESTS) <= ch._MAX_KEPT_REQUESTS


def test_one_off_timeouts_never_crowd_out_a_repeated_request() -> None:
    for i in range(3 * ch._MAX_KEPT_REQUESTS):
        ch._request("GET", "vmm.ping", 2.0 + i / 1000, None)
    ch._request("GET", "vm.counters", 1.0, None)
    assert ch._request("GET", "vm.counters", 1.0, None) is ch._request(
        "GET", "vm.counters", 1.0, None
    )
