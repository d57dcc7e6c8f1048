"""The jailer: a small fork server that starts every jailed VMM.

Run by the worker as ``python -I -S _jailer.py`` with one end of a
``SOCK_SEQPACKET`` socket pair on the fd ``$PROCURATOR_JAILER_FD`` names; it imports nothing
but the standard library (no site, no procurator package: it must start in
any environment the worker's interpreter has). See
``procurator.worker.jail`` for the worker's side and the why.

Why a fork server. A jail is made between fork and exec: namespaces,
mounts, ``pivot_root``, the cgroup, dropping privileges. The worker cannot
fork itself for that (it runs hundreds of threads: a forked child of a
threaded Python process may deadlock on any lock another thread held, which
is why ``subprocess``'s ``preexec_fn`` is unsafe), and starting a fresh
helper interpreter per VM costs ~30 ms of CPU, more than the rest of a
VM's start. This process is single-threaded, so it may fork, and a fork of
it costs well under a millisecond.

Protocol: each request is one message, a ``marshal``-ed dict (the jail
plan, built by ``procurator.worker.jail``), carrying one fd (SCM_RIGHTS):
the write end of a pipe on which the answer comes back, a ``marshal``-ed
``{"pid": <the VMM's pid>}`` or ``{"error": "<stage>: <why>"}``. The
server forks a *launcher* per request and goes back to listening; requests
never wait for each other. The server ends when the worker's end of the
socket closes (the worker ended, even by SIGKILL).

A launch, in the launcher (a child of this server):

1. ``PR_SET_PDEATHSIG`` SIGKILL: it dies with the server (so with the
   worker) until it has answered;
2. ``unshare`` a mount, pid and IPC namespace, and fork the *VMM process*,
   pid 1 of the new pid namespace. It, also with ``PR_SET_PDEATHSIG``:
   - writes ``0`` to each cgroup file it is given (it joins the VM's
     cgroup before anything else, so everything it runs is limited; it has
     one thread, so v1's ``tasks`` file moves all of it);
   - enters the worker's network namespace if one is given (``setns``) and
     hands the VM's tap to the VM's uid (``TUNSETOWNER``/``TUNSETGROUP``:
     the only way an unprivileged VMM may attach to it);
   - opens the log (stdout and stderr, appended) and ``/dev/null`` (stdin);
   - makes every mount private (nothing propagates back to the host),
     mounts a tmpfs as its future root, creates in it the symlinks and the
     bind mounts of the plan (read-only, or read-write for the VM's own
     directories; sources opened with ``O_NOFOLLOW`` and bound through
     ``/proc/self/fd``), a ``/dev`` with the plan's device nodes (the VM's
     own, e.g. ``/dev/kvm``, owned by its uid, mode 0600) and a fresh
     ``/proc``;
   - ``pivot_root`` into it, detaches the old root, makes the new root
     read-only, ``chdir``s;
   - drops every capability (ambient, bounding set), its groups, its uids
     and gids (to the VM's), sets ``no_new_privs`` (setting the uid also
     clears the parent-death signal: the VMM must outlive everyone);
   - installs the jail's seccomp filter (``procurator.core.seccomp``, built
     by the worker), the last thing before exec;
   - closes every other fd and ``execve``s the VMM, the same pid.
3. The launcher learns the outcome from a close-on-exec pipe (EOF: the exec
   happened; text: the stage that failed and why), answers, and exits. The
   VMM, now an orphan, is adopted by init like every VMM the worker starts.

A VMM process killed before its exec (the worker died meanwhile) never
runs unmarked: until it drops its uid it dies with the launcher, which dies
with this server, which ends when the worker does. After the exec it
carries the worker's launch marker in its environment like any VMM.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import marshal
import os
import select
import signal
import socket
import stat
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SYS_PIVOT_ROOT = 155  # x86_64
TUNSETIFF = 0x400454CA
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_MAX_REQUEST = 1 << 20


class _Failed(Exception):
    """A stage of a launch failed; the message says which and why."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise _Failed(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {source or ''} on {target}",
    )


def _prctl(option: int, arg: int, what: str) -> None:
    zero = ctypes.c_ulong(0)
    _check(_libc.prctl(option, ctypes.c_ulong(arg), zero, zero, zero), what)


def _inside(root: str, path: str) -> str:
    return root.rstrip("/") + path


def _mountpoint(path: str, *, directory: bool) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if directory:
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.lexists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))


def _bind(source: str, target: str, *, writable: bool) -> None:
    """Bind ``source`` (its last component not followed) on ``target`` and
    make that mount read-only unless ``writable``; never setuid, never
    device files."""
    try:
        fd = os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _Failed(f"bind {source}: {exc.strerror}") from None
    try:
        directory = stat.S_ISDIR(os.fstat(fd).st_mode)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise _Failed(f"bind {source}: is a symlink, not what was planned")
        _mountpoint(target, directory=directory)
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND, None)
    finally:
        os.close(fd)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    _mount(None, target, None, flags, None)


def _own_tap(name: str, uid: int, gid: int) -> None:
    """Give the existing tap ``name`` to ``uid``/``gid``: attach to it (it
    is free: no VMM of this VM runs), set its owner and group, detach. A tap
    that is not there is refused: attaching would create one, off the
    bridge (the worker makes the VM's tap before the VM starts)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise _Failed(
            f"tap {name} does not exist (it was made for the VM; deleted since?)"
        ) from None
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _Failed(f"tap {name}: /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
    except OSError as exc:
        raise _Failed(f"tap {name}: cannot give it to uid {uid}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _devices(root: str, devices: list[list[object]], uid: int, gid: int) -> None:
    dev = _inside(root, "/dev")
    os.makedirs(dev, mode=0o755, exist_ok=True)
    _mount("jail-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64")
    for path, major, minor, mode, own in devices:
        assert isinstance(path, str) and isinstance(mode, int)
        assert isinstance(major, int) and isinstance(minor, int)
        node = _inside(root, path)
        os.makedirs(os.path.dirname(node), mode=0o755, exist_ok=True)
        try:
            os.mknod(node, stat.S_IFCHR | mode, os.makedev(major, minor))
            os.chmod(node, mode)  # not narrowed by the umask
            if own:
                os.chown(node, uid, gid)
        except OSError as exc:
            raise _Failed(f"device {path}: {exc.strerror}") from None


def _drop_privileges(uid: int, gid: int, last_cap: int) -> None:
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise _Failed(f"set uid {uid} and gid {gid}: {exc.strerror}") from None
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise _Failed(f"still uid {os.getuid()} after dropping to {uid}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_filter(code: bytes) -> None:
    """Install the classic-BPF seccomp program ``code`` (needs
    ``no_new_privs``, set when privileges were dropped)."""
    buffer = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buffer))
    result = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
    _check(result, "install the seccomp filter")


def _vmm(plan: dict[str, object], report: int) -> None:
    """The VMM process (pid 1 of its pid namespace): set the jail up, exec."""
    stage = "start"
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
        # Its parent is in the outer pid namespace (getppid() says 0): the
        # launcher is alive while it holds the report pipe's read end.
        watch = select.poll()
        watch.register(report, 0)
        if watch.poll(0):
            os._exit(1)  # the launcher is gone: so is whoever wanted this VMM
        os.setsid()
        uid = plan["uid"]
        gid = plan["gid"]
        root = plan["root"]
        assert isinstance(uid, int) and isinstance(gid, int) and isinstance(root, str)
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        stage = "cgroup"
        for procs in plan["cgroups"]:  # type: ignore[attr-defined]
            try:
                with open(procs, "w") as f:
                    f.write("0")
            except OSError as exc:
                raise _Failed(f"join {procs}: {exc.strerror}") from None
        stage = "network"
        netns = plan["netns"]
        if netns:
            assert isinstance(netns, str)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(fd, CLONE_NEWNET), f"enter network namespace {netns}")
            finally:
                os.close(fd)
        for tap in plan["taps"]:  # type: ignore[attr-defined]
            _own_tap(tap, uid, gid)
        stage = "stdio"
        log = plan["log"]
        assert isinstance(log, str)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(log, flags, 0o640)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        stage = "mounts"
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        _mount("jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for link, target in plan["symlinks"]:  # type: ignore[attr-defined]
            where = _inside(root, link)
            os.makedirs(os.path.dirname(where), mode=0o755, exist_ok=True)
            if not os.path.lexists(where):
                os.symlink(target, where)
        for source, writable in plan["binds"]:  # type: ignore[attr-defined]
            _bind(source, _inside(root, source), writable=writable)
        _devices(root, plan["devices"], uid, gid)  # type: ignore[arg-type]
        proc = _inside(root, "/proc")
        os.makedirs(proc, mode=0o555, exist_ok=True)
        _mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        stage = "pivot_root"
        os.chdir(root)
        _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        cwd = plan["cwd"]
        assert isinstance(cwd, str)
        os.chdir(cwd)
        stage = "privileges"
        _drop_privileges(uid, gid, last_cap)
        stage = "seccomp"
        code = plan.get("seccomp")
        if code:
            assert isinstance(code, bytes)
            _install_filter(code)
        stage = "exec"
        os.closerange(3, report)
        os.closerange(report + 1, 1 << 16)
        exe = plan["exe"]
        argv = plan["argv"]
        env = plan["env"]
        assert isinstance(exe, str) and isinstance(argv, list) and isinstance(env, dict)
        os.execve(exe, argv, env)
    except BaseException as exc:  # noqa: BLE001 - reported to the worker, then exit
        text = exc.args[0] if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
        try:
            os.write(report, f"{stage}: {text}".encode(errors="replace")[:4000])
        finally:
            os._exit(127)


def _launch(plan: dict[str, object], answer: int, server: int) -> None:
    """The launcher: make the namespaces, fork the VMM process, answer."""
    result: dict[str, object]
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set the parent-death signal")
        if os.getppid() != server:
            os._exit(1)
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare namespaces")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _vmm(plan, write_end)
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        if chunks:
            os.waitpid(pid, 0)
            result = {"error": b"".join(chunks).decode(errors="replace")}
        else:
            result = {"pid": pid}
    except BaseException as exc:  # noqa: BLE001 - reported to the worker
        result = {"error": f"launcher: {exc}"}
    try:
        os.write(answer, marshal.dumps(result))
    finally:
        os._exit(0)


def _reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def serve(fd: int) -> None:
    """Answer launch requests on ``fd`` until the worker's end closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the worker's to handle
    sock = socket.socket(fileno=fd)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    me = os.getpid()
    children: set[int] = set()
    while True:
        if not poller.poll(1000 if children else None):
            _reap(children)
            continue
        try:
            message, ancillary, _, _ = sock.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                break
            raise
        if not message:
            break  # the worker is gone
        fds = [
            fd
            for level, kind, data in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
        ]
        if len(fds) != 1:
            for extra in fds:
                os.close(extra)
            continue
        answer = fds[0]
        try:
            plan = marshal.loads(message)
        except (ValueError, EOFError, TypeError) as exc:
            os.write(answer, marshal.dumps({"error": f"request: unreadable: {exc}"}))
            os.close(answer)
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _launch(plan, answer, me)
        os.close(answer)
        children.add(pid)
        _reap(children)
    # The worker is gone: launches in flight die with us (their parent-death
    # signal), so none of their VMMs runs without its marker.
    sys.exit(0)


if __name__ == "__main__":
    serve(int(os.environ["PROCURATOR_JAILER_FD"]))
