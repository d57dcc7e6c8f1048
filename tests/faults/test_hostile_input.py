"""Hostile input: fleet files and images that try to escape or exhaust.

Fleet files (``procurator apply``): path-traversal VM and worker ids,
duplicate ids, absurd sizes (10^9 vCPUs, 100,000 VMs, a 100 MB file),
unknown keys. Images (``vm-config.json``): host files (``/etc/shadow``, a
host kernel), a symlink inside the image pointing out of it, ``..`` out of
the image, and host devices (VFIO passthrough, a vhost-user socket, a vsock
socket). Every one is refused with a message that names the problem, and
nothing else is touched: the generation does not move for a refused fleet,
the VM already running keeps its VMM (same pid), and no VMM is started for a
refused image.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from faultlab import FaultLab, config, record

# (name, fleet file text or a function of the running image, expected fragment)
_FLEETS: list[tuple[str, str, str]] = [
    ("traversal-id", '[workers.host-a]\nvms = [ {{ id = "../etc", image = "{img}" }} ]\n', "id"),
    (
        "traversal-worker",
        '[workers."../../etc"]\nvms = [ {{ id = "web-1", image = "{img}" }} ]\n',
        "worker",
    ),
    (
        "traversal-image",
        '[workers.host-a]\nvms = [ {{ id = "web-1", image = "/nix/store/../../etc/shadow" }} ]\n',
        "image",
    ),
    (
        "duplicate-id",
        '[workers.host-a]\nvms = [ {{ id = "vm-ok", image = "{img}" }},'
        ' {{ id = "vm-ok", image = "{img}" }} ]\n',
        "vm-ok",
    ),
    (
        "huge-vcpus",
        '[workers.host-a]\nvms = [ {{ id = "vm-ok", image = "{img}", vcpus = 1000000000 }} ]\n',
        "vcpus",
    ),
    (
        "huge-memory",
        '[workers.host-a]\nvms = [ {{ id = "vm-ok", image = "{img}",'
        " memory_mib = 99999999999999 }} ]\n",
        "memory",
    ),
    (
        "unknown-key",
        '[workers.host-a]\nvms = [ {{ id = "vm-ok", image = "{img}", devices = ["/dev/sda"] }} ]\n',
        "devices",
    ),
    (
        "unknown-top-key",
        'evil = true\n[workers.host-a]\nvms = [ {{ id = "vm-ok", image = "{img}" }} ]\n',
        "evil",
    ),
]


def _huge_list(img: str) -> str:
    entries = ",\n".join(f'  {{ id = "vm-{i}", image = "{img}" }}' for i in range(100_000))
    return f"[workers.host-a]\nvms = [\n{entries}\n]\n"


def test_hostile_fleet_files_are_refused(
    images: Callable[..., str], make_lab: Callable[..., FaultLab], tmp_path: Path
) -> None:
    img = images("hostile-ok", config())
    lab = make_lab(network=False)
    lab.start_worker()
    lab.apply([("vm-ok", img)])
    (pid,) = lab.vmm_processes()["vm-ok"]
    generation = lab.status()["generation"]

    cases = [(name, text.format(img=img), fragment) for name, text, fragment in _FLEETS]
    cases.append(("huge-list", _huge_list(img), "limit"))
    cases.append(
        (
            "duplicate-json-key",
            json.dumps({"workers": {"host-a": {"vms": []}}})[:-1] + ', "workers": {}}',
            "workers",
        )
    )
    big = tmp_path / "big.toml"
    with open(big, "w") as out:
        out.write("[workers.host-a]\nvms = []\n# ")
        out.write("x" * (100 << 20))
    refused: dict[str, str] = {}
    for name, text, fragment in cases:
        suffix = ".json" if name.endswith("json-key") else ".toml"
        path = lab.dir / f"{name}{suffix}"
        path.write_text(text)
        result = lab.apply_file(path)
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"{name} was accepted:\n{output}"
        assert fragment in output, f"{name}: message does not say what is wrong:\n{output}"
        refused[name] = output.strip().splitlines()[-1][:160]
    result = lab.apply_file(big)
    assert result.returncode != 0
    assert "larger than" in result.stdout + result.stderr, result.stdout + result.stderr
    refused["100MB-file"] = (result.stdout + result.stderr).strip()[:160]

    assert lab.status()["generation"] == generation, "a refused fleet changed the generation"
    assert lab.vmm_processes()["vm-ok"] == [pid], "the running VM was disturbed"
    assert lab.worker_alive()
    record("test_hostile_fleet_files_are_refused", refused=len(refused), accepted=0, cases=refused)


_SHADOW = "/etc/shadow"


_IMAGES: list[tuple[str, dict[str, object], dict[str, str], str]] = [
    # (name, vm-config.json overrides, symlinks in the image, expected fragment)
    ("host-disk", {"disks": [{"path": _SHADOW}]}, {}, _SHADOW),
    ("host-kernel", {"payload": {"kernel": "/boot/vmlinuz"}}, {}, "/boot/vmlinuz"),
    ("dotdot-disk", {"disks": [{"path": "../../../../etc/shadow"}]}, {}, "shadow"),
    ("symlink-escape", {"disks": [{"path": "evil.img"}]}, {"evil.img": _SHADOW}, "shadow"),
    ("vfio-device", {"devices": [{"path": "/sys/bus/pci/devices/0000:00:01.0/"}]}, {}, "VFIO"),
    (
        "vhost-user-net",
        {"net": [{"vhost_user": True, "vhost_socket": "/run/evil.sock"}]},
        {},
        "vhost",
    ),
    ("vsock", {"vsock": {"cid": 3, "socket": "/tmp/evil-vsock.sock"}}, {}, "vsock"),
    ("not-json", {}, {}, "not valid JSON"),
]


def test_hostile_images_are_refused(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    good = images("hostile-good", config())
    evil = {
        f"vm-{name}": (
            images(
                f"evil-{name}",
                b"{not json" if name == "not-json" else {**config(), **overrides},
                symlinks=symlinks,
            ),
            fragment,
        )
        for name, overrides, symlinks, fragment in _IMAGES
    }
    lab = make_lab(network=False)
    lab.start_worker()
    lab.apply([("vm-ok", good)])
    (pid,) = lab.vmm_processes()["vm-ok"]
    lab.apply_nowait([("vm-ok", good), *((vm, img) for vm, (img, _) in evil.items())])
    worker = lab.wait_status(
        lambda w: all(
            {vm["id"]: vm["phase"] for vm in w["vms"]}.get(vm_id) == "failed" for vm_id in evil
        ),
        "every hostile image refused",
    )
    messages = {vm["id"]: vm["message"] for vm in worker["vms"]}
    for vm_id, (_, fragment) in evil.items():
        assert fragment in messages[vm_id], (vm_id, messages[vm_id])
    started = set(lab.vmm_processes()) - {"vm-ok"}
    assert not started, f"VMMs were started for refused images: {started}"
    assert lab.vmm_processes()["vm-ok"] == [pid], "the running VM was disturbed"
    assert lab.worker_alive()
    record(
        "test_hostile_images_are_refused",
        refused=len(evil),
        accepted=0,
        messages={vm: messages[vm].splitlines()[-1].strip()[:120] for vm in evil},
    )


def test_refused_images_take_no_tap_and_no_address(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    """An image is checked before the worker takes anything on the host for
    its VM. 200 refused images in a row on the default /24 (253 addresses)
    leave no tap and the whole address pool: nothing for a removal to free,
    nothing for repeated bad images to exhaust. An image refused only once
    its NIC is attached (the worker's ``ip=`` pushes its kernel command line
    past the limit) gives back the tap, address, GC root and disk copy it
    was given."""
    evil = images("refused-net", {**config(), "disks": [{"path": _SHADOW}]})
    too_long = images("refused-net-cmdline", config("console=ttyS0 " + "x" * 2000))
    good = images("refused-net-good", config())
    lab = make_lab()  # network on: a bridge and a tap per VM
    lab.start_worker()
    refused = {f"vm-{i:03d}": evil for i in range(200)} | {"vm-long": too_long}
    lab.apply_nowait(sorted(refused.items()))
    worker = lab.wait_status(
        lambda w: sum(vm["phase"] == "failed" for vm in w["vms"]) == len(refused),
        "every refused image reported failed",
        timeout=180,
    )
    messages = {vm["id"]: vm["message"] for vm in worker["vms"]}
    assert all(_SHADOW in messages[vm_id] for vm_id in refused if vm_id != "vm-long")
    assert "cmdline" in messages["vm-long"], messages["vm-long"]
    assert lab.taps() == [], "taps were made for refused images"
    assert lab.allocations() == {}, "addresses were taken for refused images"
    assert lab.gc_roots() == [], "refused images stay rooted"
    assert not list(lab.state_dir.glob("vms/*")), "refused images left VM directories"
    # The pool is whole: a good VM still gets its address and tap.
    lab.apply([("vm-ok", good)])
    assert set(lab.allocations()) == {"vm-ok"}
    assert len(lab.taps()) == 1
    record("test_refused_images_take_no_tap_and_no_address", refused=len(refused), taps=0)
