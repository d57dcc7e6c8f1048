"""ImageManager against the real Nix store: present, rooted, confined, copied."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nixtool_helpers import GCROOTS_AUTO, Link, NixTool

from procurator.core.confinement import HostSide, ImageLimits
from procurator.core.errors import TemporaryError, ValidationError
from procurator.core.vmdef import Nic
from procurator.nix import ImageManager, NixStore
from procurator.nix._disk import clone_or_copy
from procurator.nix.store import auto_root_name

pytestmark = pytest.mark.nix

MIB = 1 << 20
ABSENT = "/nix/store/" + "0" * 32 + "-procurator-test-absent"
HOST = HostSide(serial_file="/var/lib/procurator/vms/web/serial.log")
NIC = Nic(tap="pvm-test0", mac="52:54:00:00:00:01")


def config(**overrides: Any) -> str:
    base: dict[str, Any] = {
        "payload": {"kernel": "vmlinux", "initramfs": "initrd.img", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * MIB},
        "disks": [{"path": "disk.img"}, {"path": "seed.img", "readonly": True}],
    }
    return json.dumps(base | overrides)


def image_tree(
    cfg: str | None = None, **extra: bytes | str | Link
) -> dict[str, bytes | str | Link]:
    # A disk with data at both ends and zeros in between, like a fresh fs image.
    disk = b"boot sector" + bytes(2 * MIB) + b"superblock"
    return {
        "vm-config.json": cfg if cfg is not None else config(),
        "vmlinux": "kernel",
        "initrd.img": "initrd",
        "disk.img": disk,
        "seed.img": "seed",
        **extra,
    }


class RecordingStore:
    """The real store, with a log of the calls the image manager made."""

    def __init__(self, inner: NixStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def is_valid(self, path: str) -> bool:
        self.calls.append("is_valid")
        return self.inner.is_valid(path)

    def realise(self, path: str, *, root: Path | None = None) -> None:
        self.calls.append("realise")
        self.inner.realise(path, root=root)

    def closure(self, path: str) -> frozenset[str]:
        self.calls.append("closure")
        return self.inner.closure(path)

    def add_root(self, path: str, link: Path) -> None:
        self.calls.append("add_root")
        self.inner.add_root(path, link)

    def add_root_beside(self, path: str, link: Path, witness: Path) -> bool:
        self.calls.append("add_root_beside")
        return self.inner.add_root_beside(path, link, witness)

    def has_root(self, link: Path) -> bool:
        self.calls.append("has_root")
        return self.inner.has_root(link)

    def remove_root(self, link: Path) -> None:
        self.calls.append("remove_root")
        self.inner.remove_root(link)


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(state_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if not p.is_dir())


# ------------------------------------------------------------------ valid


def test_valid_image_points_at_copies_and_closure_paths(
    nix: NixTool, images: ImageManager, state_dir: Path
) -> None:
    path = nix.add(image_tree())
    prepared = images.prepare("web", path, host=HOST)
    try:
        name = os.path.basename(path)
        disk_dir = state_dir / "vms" / "web" / "disks" / name
        cfg = images.attach_nic(prepared, nic=NIC, cmdline_extra="ip=10.0.0.2").to_vm_config()
        assert prepared.store_path == path
        assert cfg["payload"] == {
            "kernel": f"{path}/vmlinux",
            "initramfs": f"{path}/initrd.img",
            "cmdline": "console=ttyS0 ip=10.0.0.2",
        }
        assert cfg["disks"] == [
            {"path": str(disk_dir / "disk0.img"), "id": "disk0"},
            {"path": f"{path}/seed.img", "readonly": True, "id": "disk1"},
        ]
        assert prepared.disks == (disk_dir / "disk0.img",)
        assert cfg["net"] == [{"tap": "pvm-test0", "mac": "52:54:00:00:00:01", "id": "net0"}]
        assert cfg["serial"] == {"mode": "File", "file": HOST.serial_file}
        assert cfg["console"] == {"mode": "Off"}
        assert images.roots() == {"web": frozenset({path})}
    finally:
        images.release("web")
    assert images.roots() == {}
    assert leftovers(state_dir) == []


def test_absolute_paths_into_the_closure(nix: NixTool, images: ImageManager) -> None:
    cfg = {"payload": {"kernel": "@KERNEL@/vmlinux", "initramfs": "@KERNEL@/initrd.img"}}
    image, kernel = nix.build_with_kernel(json.dumps(cfg))
    try:
        prepared = images.prepare("vm1", image, host=HostSide())
        assert prepared.definition.to_vm_config()["payload"] == {
            "kernel": f"{kernel}/vmlinux",
            "initramfs": f"{kernel}/initrd.img",
        }
    finally:
        images.release("vm1")


def test_disk_copy_is_writable_and_the_store_is_untouched(
    nix: NixTool, images: ImageManager
) -> None:
    path = nix.add(image_tree())
    before = sha(f"{path}/disk.img")
    try:
        (copy,) = images.prepare("vm1", path, host=HOST).disks
        assert sha(copy) == before
        assert (copy.stat().st_mode & 0o777) == 0o600
        # Sparse: the 2 MiB of zeros in the middle are a hole in the copy.
        assert copy.stat().st_blocks * 512 < MIB
        with open(copy, "r+b") as disk:
            disk.write(b"guest wrote this")
        assert sha(f"{path}/disk.img") == before
        assert not os.access(f"{path}/disk.img", os.W_OK) or os.geteuid() == 0

        # A restart of the same image keeps the guest's writes...
        again = images.prepare("vm1", path, host=HOST)
        assert again.disks == (copy,)
        assert copy.read_bytes().startswith(b"guest wrote this")

        # ...a new image gets fresh copies; the old ones stay (the old VMM
        # may still run on them) until the VM runs the new image.
        newer = nix.add(image_tree(seed="new seed"))
        (fresh,) = images.prepare("vm1", newer, host=HOST).disks
        assert fresh != copy
        assert sha(fresh) == before
        assert copy.exists()
        assert images.roots() == {"vm1": frozenset({path, newer})}
        assert path not in nix.dead()
        images.retire_others("vm1", newer)
        assert not copy.exists()
        assert images.roots() == {"vm1": frozenset({newer})}
        assert path in nix.dead()
    finally:
        images.release("vm1")


def test_relative_paths_resolve_against_the_image(nix: NixTool, images: ImageManager) -> None:
    cfg = config(payload={"kernel": "./boot/vmlinux", "initramfs": "boot//initrd.img"})
    tree = image_tree(cfg, **{"boot/vmlinux": "k", "boot/initrd.img": "i"})
    path = nix.add(tree)
    try:
        payload = images.prepare("vm1", path, host=HostSide()).definition.to_vm_config()["payload"]
        assert payload == {"kernel": f"{path}/boot/vmlinux", "initramfs": f"{path}/boot/initrd.img"}
    finally:
        images.release("vm1")


# ------------------------------------------------------------- refused


def refused(images: ImageManager, path: str, state_dir: Path) -> tuple[str, ...]:
    with pytest.raises(ValidationError) as info:
        images.prepare("vm1", path, host=HOST)
    assert str(info.value).startswith("VM vm1: ")
    # A refused image leaves nothing behind: no root, no disk copy.
    assert images.roots() == {}
    assert leftovers(state_dir) == []
    return info.value.details


def test_config_naming_etc_shadow(nix: NixTool, images: ImageManager, state_dir: Path) -> None:
    cfg = config(disks=[{"path": "disk.img"}, {"path": "/etc/shadow"}])
    path = nix.add(image_tree(cfg))
    assert refused(images, path, state_dir) == (
        "disks[1].path: '/etc/shadow' is outside the image's closure",
    )


def test_config_with_a_vfio_device(nix: NixTool, images: ImageManager, state_dir: Path) -> None:
    cfg = config(devices=[{"path": "/sys/bus/pci/devices/0000:01:00.0/", "iommu": True}])
    path = nix.add(image_tree(cfg))
    assert refused(images, path, state_dir) == (
        "devices: refused: VFIO passes host PCI devices through; images may not use host devices",
    )


def test_symlinks_leaving_the_closure(nix: NixTool, images: ImageManager, state_dir: Path) -> None:
    stranger = nix.add({"vmlinux": "not in the image's closure"}, name="stranger")
    cfg = config(payload={"kernel": "vmlinux", "initramfs": "initrd.img"})
    tree = image_tree(
        cfg, vmlinux=Link("/etc/shadow"), **{"initrd.img": Link(f"{stranger}/vmlinux")}
    )
    path = nix.add(tree)
    assert refused(images, path, state_dir) == (
        "payload.kernel: 'vmlinux' resolves through a symlink to '/etc/shadow', "
        "outside the image's closure",
        f"payload.initramfs: 'initrd.img' resolves through a symlink to '{stranger}/vmlinux', "
        "outside the image's closure",
    )


def test_vm_config_symlink_leaving_the_closure(
    nix: NixTool, images: ImageManager, state_dir: Path
) -> None:
    path = nix.add(image_tree(**{"vm-config.json": Link("/etc/passwd")}))
    with pytest.raises(ValidationError, match="outside the image's closure"):
        images.prepare("vm1", path, host=HOST)
    assert images.roots() == {}


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"vmlinux": "k"}, "has no vm-config.json"),
        ({"vm-config.json": "{not json"}, "is not valid JSON"),
        ({"vm-config.json/nested": "x"}, "is a directory"),
    ],
)
def test_broken_image(
    nix: NixTool, images: ImageManager, state_dir: Path, tree: dict[str, Any], message: str
) -> None:
    path = nix.add(tree)
    with pytest.raises(ValidationError, match=message):
        images.prepare("vm1", path, host=HOST)
    assert leftovers(state_dir) == []


@pytest.mark.parametrize("bad", ["/etc", "/nix/store/not-a-hash-web", "nix/store/x", ""])
def test_not_a_store_path(images: ImageManager, bad: str) -> None:
    with pytest.raises(ValidationError, match=r"VM vm1: image: .* is not a Nix store path"):
        images.prepare("vm1", bad, host=HOST)


def test_vcpu_and_memory_bounds(
    nix: NixTool, store: NixStore, state_dir: Path, images: ImageManager
) -> None:
    path = nix.add(image_tree(config(cpus={"boot_vcpus": 8, "max_vcpus": 8})))
    details = refused(images, path, state_dir)
    assert details == (
        "cpus.boot_vcpus: 8 exceeds this worker's limit of 4 vCPUs",
        "cpus.max_vcpus: 8 exceeds this worker's limit of 4 vCPUs",
    )
    small = nix.add(image_tree())
    with pytest.raises(ValidationError) as info:
        images.prepare("vm1", small, host=HostSide(memory_mib=4096))
    assert info.value.details == (
        "memory.size: 4294967296 bytes (the assignment's override) exceeds this worker's "
        "limit of 1024 MiB",
    )
    bigger = ImageManager(store, state_dir, limits=ImageLimits(max_vcpus=8, max_memory_mib=1024))
    try:
        assert (
            bigger.prepare("vm1", path, host=HOST).definition.to_vm_config()["cpus"]["boot_vcpus"]
            == 8
        )
    finally:
        bigger.release("vm1")


# ------------------------------------------------------- missing paths


def test_missing_path_fails_clearly_after_trying_to_realise(
    nix: NixTool, store: NixStore, state_dir: Path, limits: ImageLimits
) -> None:
    recording = RecordingStore(store)
    images = ImageManager(recording, state_dir, limits=limits)
    phases: list[str] = []
    with pytest.raises(TemporaryError) as info:
        images.prepare("vm1", ABSENT, host=HOST, on_realise=lambda: phases.append("realising"))
    assert str(info.value).startswith(f"could not realise {ABSENT} from ")
    # Rooting is tried first (one nix-store run when the path is there).
    assert recording.calls[:2] == ["add_root", "realise"]
    assert phases == ["realising"]
    assert images.roots() == {}
    assert leftovers(state_dir) == []


def test_missing_path_is_realised_from_a_binary_cache(
    nix: NixTool, nix_env: dict[str, str], state_dir: Path, tmp_path: Path, limits: ImageLimits
) -> None:
    path = nix.add(image_tree())
    cache = f"file://{tmp_path}/cache"
    nix.run("nix", "copy", "--to", cache, path)
    assert nix.delete(path).returncode == 0

    recording = RecordingStore(NixStore(substituters=[cache], extra_env=nix_env))
    images = ImageManager(recording, state_dir, limits=limits)
    phases: list[str] = []
    try:
        prepared = images.prepare("vm1", path, host=HOST, on_realise=lambda: phases.append("r"))
        assert phases == ["r"]
        assert recording.calls[:2] == ["add_root", "realise"]
        assert nix.valid(path)
        assert path not in nix.dead()
        assert sha(prepared.disks[0]) == sha(f"{path}/disk.img")
    finally:
        images.release("vm1")


# ------------------------------------------------------------ GC roots


def test_gc_root_lives_as_long_as_the_vm(nix: NixTool, images: ImageManager) -> None:
    path = nix.add(image_tree())
    images.prepare("vm1", path, host=HOST)
    try:
        assert path not in nix.dead()
        refused = nix.delete(path)
        assert refused.returncode != 0
        assert "still alive" in refused.stderr
    finally:
        images.release("vm1")
    images.release("vm1")  # idempotent
    assert path in nix.dead()
    assert nix.delete(path).returncode == 0


def test_two_vms_share_one_image(nix: NixTool, images: ImageManager) -> None:
    path = nix.add(image_tree())
    try:
        a = images.prepare("vm-a", path, host=HOST)
        b = images.prepare("vm-b", path, host=HOST)
        assert a.disks != b.disks  # each VM writes to its own copy
        assert images.roots() == {"vm-a": frozenset({path}), "vm-b": frozenset({path})}
        images.release("vm-a")
        assert path not in nix.dead()
        assert nix.delete(path).returncode != 0
        assert b.disks[0].exists()
    finally:
        images.release("vm-a")
        images.release("vm-b")
    assert path in nix.dead()


def test_a_refused_new_image_keeps_the_old_one(
    nix: NixTool, images: ImageManager, state_dir: Path
) -> None:
    good = nix.add(image_tree())
    bad = nix.add(image_tree(config(vsock={"cid": 3, "socket": "/run/x.sock"})))
    try:
        (disk,) = images.prepare("vm1", good, host=HOST).disks
        with pytest.raises(ValidationError):
            images.prepare("vm1", bad, host=HOST)
        assert images.roots() == {"vm1": frozenset({good})}
        assert disk.exists()
        assert bad in nix.dead()
    finally:
        images.release("vm1")
    assert leftovers(state_dir) == []


def test_abandon_undoes_only_what_the_prepare_made(
    nix: NixTool, images: ImageManager, state_dir: Path
) -> None:
    """A launch that fails after its image was prepared gives back what that
    prepare took: a fresh root and disk copies (and the directories made for
    them); an image the VM already had stays."""
    old, new = nix.add(image_tree()), nix.add(image_tree(config(memory={"size": 128 * MIB})))
    fresh = images.prepare("vm1", old, host=HOST)
    assert fresh.fresh
    images.abandon("vm1", fresh)
    assert images.roots() == {}
    assert not (state_dir / "vms" / "vm1").exists() and leftovers(state_dir) == []
    try:
        (disk,) = images.prepare("vm1", old, host=HOST).disks
        again = images.prepare("vm1", old, host=HOST)  # the VM has it already
        assert not again.fresh
        images.abandon("vm1", again)
        moving = images.prepare("vm1", new, host=HOST)  # a replacement, not yet running
        images.abandon("vm1", moving)
        assert images.roots() == {"vm1": frozenset({old})}
        assert disk.exists()
    finally:
        images.release("vm1")
    assert leftovers(state_dir) == []


def test_the_nic_is_attached_with_its_kernel_arguments_within_the_limit(
    nix: NixTool, store: NixStore, state_dir: Path
) -> None:
    tight = ImageManager(
        store, state_dir, limits=ImageLimits(max_vcpus=4, max_memory_mib=1024, max_cmdline=40)
    )
    path = nix.add(image_tree(config(payload={"kernel": "vmlinux", "cmdline": "console=ttyS0"})))
    try:
        prepared = tight.prepare("vm1", path, host=HOST)
        definition = tight.attach_nic(prepared, nic=NIC, cmdline_extra="ip=10.0.0.2")
        assert definition.net is not None and definition.net.tap == NIC.tap
        assert definition.payload.cmdline == "console=ttyS0 ip=10.0.0.2"
        with pytest.raises(ValidationError, match="kernel command line"):
            tight.attach_nic(prepared, nic=NIC, cmdline_extra="ip=" + "1" * 30)
    finally:
        tight.release("vm1")


def test_state_dir_in_the_store_is_refused(store: NixStore, limits: ImageLimits) -> None:
    with pytest.raises(ValueError, match="may not lie in the Nix store"):
        ImageManager(store, Path("/nix/store/x"), limits=limits)


# ------------------------------------------------------------ disk copy


def test_copy_falls_back_from_reflink_and_keeps_holes(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    with open(source, "wb") as file:
        file.write(b"start")
        file.seek(8 * MIB)
        file.write(bytes(MIB) + b"end")  # written zeros, then data
        file.truncate(16 * MIB)  # a trailing hole
    target = tmp_path / "copy.img"
    method = clone_or_copy(source, target)
    assert method in ("reflink", "copy")
    assert sha(target) == sha(source)
    assert target.stat().st_size == 16 * MIB
    assert target.stat().st_blocks * 512 <= 2 * MIB
    with pytest.raises(FileExistsError):
        clone_or_copy(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.img", "source.img"]
    forced = tmp_path / "forced.img"
    assert clone_or_copy(source, forced, allow_reflink=False) == "copy"
    assert sha(forced) == sha(source)


@pytest.mark.root
def test_reflink_where_the_filesystem_can(tmp_path: Path) -> None:
    """On btrfs (a loop-mounted image) the copy is a reflink."""
    if shutil.which("mkfs.btrfs") is None or os.geteuid() != 0:
        pytest.skip("needs root and mkfs.btrfs (btrfs-progs) to make a reflink-capable fs")
    backing, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    with open(backing, "wb") as file:
        file.truncate(256 * MIB)
    subprocess.run(["mkfs.btrfs", "-q", str(backing)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        source = mnt / "source.img"
        source.write_bytes(os.urandom(4 * MIB))
        assert clone_or_copy(source, mnt / "copy.img") == "reflink"
        assert sha(mnt / "copy.img") == sha(source)
        # Cross-filesystem (the store is elsewhere): falls back to a copy.
        assert clone_or_copy(source, tmp_path / "copy.img") == "copy"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------- roots beside roots


def test_an_image_already_rooted_is_rooted_beside_without_nix_store(
    nix: NixTool, store: NixStore, state_dir: Path, limits: ImageLimits
) -> None:
    """A thousand VMs of one image need one nix-store run, not a thousand:
    the second VM's root is written beside the first's, the way nix-store
    writes it, and both are real roots."""
    path = nix.add(image_tree())
    recording = RecordingStore(store)
    images = ImageManager(recording, state_dir, limits=limits)
    name = os.path.basename(path)
    links = [state_dir / "gcroots" / vm / name for vm in ("vm1", "vm2", "vm3")]
    try:
        for vm in ("vm1", "vm2", "vm3"):
            images.prepare(vm, path, host=HOST)
        assert recording.calls.count("add_root") == 1
        assert recording.calls.count("add_root_beside") == 2
        for link in links:
            assert os.readlink(link) == path
            assert store.has_root(link)
            assert os.readlink(GCROOTS_AUTO / auto_root_name(str(link))) == str(link)
        # Each root holds the path on its own.
        images.release("vm1")
        images.release("vm2")
        assert path not in nix.dead()
        images.release("vm3")
        assert path in nix.dead()
        assert not any(os.path.lexists(GCROOTS_AUTO / auto_root_name(str(x))) for x in links)
    finally:
        for vm in ("vm1", "vm2", "vm3"):
            images.release(vm)


def test_a_witness_nix_has_no_record_of_is_not_trusted(
    nix: NixTool, store: NixStore, state_dir: Path, limits: ImageLimits
) -> None:
    path = nix.add(image_tree())
    recording = RecordingStore(store)
    images = ImageManager(recording, state_dir, limits=limits)
    first = state_dir / "gcroots" / "vm1" / os.path.basename(path)
    try:
        images.prepare("vm1", path, host=HOST)
        os.unlink(GCROOTS_AUTO / auto_root_name(str(first)))  # vm1's link roots nothing now
        images.prepare("vm2", path, host=HOST)
        assert recording.calls.count("add_root") == 2  # nix-store, not beside vm1
    finally:
        images.release("vm1")
        images.release("vm2")


def test_sweep_roots_again_a_link_nix_has_no_record_of(
    nix: NixTool, store: NixStore, state_dir: Path, limits: ImageLimits
) -> None:
    """A worker killed between the link and Nix's record of it left a link
    that roots nothing; a running VM's image is not prepared again, so the
    sweep at start must notice."""
    path = nix.add(image_tree())
    images = ImageManager(store, state_dir, limits=limits)
    link = state_dir / "gcroots" / "vm1" / os.path.basename(path)
    try:
        images.prepare("vm1", path, host=HOST)
        os.unlink(GCROOTS_AUTO / auto_root_name(str(link)))
        assert path in nix.dead()
        ImageManager(store, state_dir, limits=limits).sweep({"vm1"})
        assert store.has_root(link)
        assert path not in nix.dead()
    finally:
        images.release("vm1")


_OPENED: list[str] = []


def _audit_opens(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and isinstance(args[0], str) and args[0].endswith("/vm-config.json"):
        _OPENED.append(args[0])


sys.addaudithook(_audit_opens)  # audit hooks stay for the process: it only appends


def test_an_image_is_read_once_while_rooted_and_each_vm_still_confined(
    nix: NixTool, images: ImageManager, state_dir: Path
) -> None:
    """A thousand VMs of one image read and resolve its vm-config.json
    once (issue 31: per image, not per VM), while this worker roots the
    path (it cannot change then); each VM's own side is still checked, and
    once the last root goes the next prepare reads the store again."""
    path = nix.add(image_tree())
    config_file = f"{path}/vm-config.json"
    _OPENED.clear()
    try:
        a = images.prepare("vm1", path, host=HOST)
        b = images.prepare("vm2", path, host=HOST)
        assert _OPENED.count(config_file) == 1
        assert a.definition.payload == b.definition.payload and a.disks != b.disks
        with pytest.raises(ValidationError, match="vcpus"):
            images.prepare("vm3", path, host=HostSide(serial_file=HOST.serial_file, vcpus=64))
        images.release("vm1")
        images.prepare("vm4", path, host=HOST)  # vm2 still roots it
        assert _OPENED.count(config_file) == 1
        images.release("vm2")
        images.release("vm4")
        images.prepare("vm5", path, host=HOST)  # no root was left: read again
        assert _OPENED.count(config_file) == 2
    finally:
        for vm in ("vm1", "vm2", "vm3", "vm4", "vm5"):
            images.release(vm)
    assert leftovers(state_dir) == []
