"""The image's command run the way Docker would run it, without Docker.

No Docker engine runs here, yet a container's file system decides whether the
server starts at all (a read-only root leaves it nowhere to put its control
socket). This builds what Docker builds, from the Dockerfile and the compose
service, out of kernel parts the test machine has:

- a mount namespace and a PID namespace, with the ENTRYPOINT (tini) as PID 1;
- the root file system: this machine's own, as an overlay whose upper layer is
  a private tmpfs, plus the files the Dockerfile COPYs (and the venv the build
  stage makes, linked to this test's venv); made read-only for ``read_only``;
- the service's ``tmpfs`` mounts (mode taken from the mount point, as runc
  does, then the service's options) and its bind ``volumes``;
- the image's USER, ENV, ENTRYPOINT and CMD, and the service's environment;
- ``docker exec`` as nsenter into those namespaces with the same user and env.

The network is the host's (tests bind 127.0.0.1 only). Nothing is changed
outside the namespaces: the mounts go away with the last process.

Run as ``python container.py SPEC.json`` under ``unshare --mount --pid --fork``;
the test side uses ``running`` (or ``start`` and ``exec_in``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Docker's PATH when an image sets none; the python images use it too.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Mounts a container gets fresh rather than from the host's tree.
PSEUDO = ("/proc", "/sys", "/dev")


@dataclass
class Image:
    """The final stage of a Dockerfile, as far as running it goes."""

    env: dict[str, str]
    user: tuple[int, int]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    #: (build-context path, image path) of each COPY from the context.
    copies: list[tuple[str, str]]
    #: image paths that COPY --from another stage fills.
    from_stages: list[str]


@dataclass
class Service:
    """A compose service, as far as its file system and environment go."""

    environment: dict[str, str] = field(default_factory=dict)
    read_only: bool = False
    tmpfs: list[str] = field(default_factory=list)
    #: (host path, container path, read-only)
    volumes: list[tuple[str, str, bool]] = field(default_factory=list)
    healthcheck: list[str] | None = None


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def parse_image(dockerfile: Path) -> Image:
    instr = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(instr) if word == "FROM")
    env = {"PATH": DEFAULT_PATH}
    user = (0, 0)
    entrypoint: list[str] = []
    cmd: list[str] = []
    health: list[str] = []
    copies: list[tuple[str, str]] = []
    from_stages: list[str] = []
    for word, rest in instr[last_from + 1:]:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif word == "USER":
            uid, _, gid = rest.partition(":")
            user = (int(uid), int(gid or uid))
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "HEALTHCHECK":
            health = json.loads(rest[rest.index(" CMD ") + 5:])
        elif word == "COPY":
            args = shlex.split(rest)
            if args[0].startswith("--from="):
                from_stages.append(args[-1])
            else:
                copies += [(src, args[-1]) for src in args[:-1]]
    return Image(env, user, entrypoint, cmd, health, copies, from_stages)


def parse_service(svc: dict[str, Any], project_dir: Path) -> Service:
    volumes = []
    for spec in svc.get("volumes", []):
        assert isinstance(spec, str), f"only short volume syntax is emulated: {spec!r}"
        src, dst, *mode = spec.split(":")
        assert src.startswith(("./", "/")), f"only bind mounts are emulated: {spec!r}"
        volumes.append((str((project_dir / src).resolve()), dst, mode == ["ro"]))
    env = svc.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    test = svc.get("healthcheck", {}).get("test")
    assert not test or test[0] == "CMD", f"only exec-form health checks are emulated: {test!r}"
    return Service(
        environment={k: str(v) for k, v in env.items()},
        read_only=bool(svc.get("read_only", False)),
        tmpfs=list(svc.get("tmpfs", [])),
        volumes=volumes,
        healthcheck=test[1:] if test and test[0] == "CMD" else None,
    )


def container_env(image: Image, service: Service | None) -> dict[str, str]:
    # No passwd entry for the image's uid in this root: Docker's HOME is then /.
    env = {"HOME": "/", **image.env}
    if service is not None:
        env.update(service.environment)
    return env


def start(image: Image, service: Service | None, work: Path, files: dict[str, str],
          links: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start the container; ``files`` are image paths with their text (COPY
    results), ``links`` image paths made symlinks (COPY --from results)."""
    import shardudp

    spec = {
        "work": str(work / "fs"),
        "files": files,
        "links": links,
        # This test's Python and, for an editable install, the checkout the
        # venv's shardudp points at.
        "reachable": [os.path.realpath(sys.executable), sys.prefix,
                      str(Path(shardudp.__file__).resolve().parent.parent)],
        "read_only": bool(service and service.read_only),
        "tmpfs": service.tmpfs if service else [],
        "volumes": service.volumes if service else [],
        "user": image.user,
        "env": container_env(image, service),
        "argv": image.entrypoint + image.cmd,
    }
    (work / "fs").mkdir(parents=True)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with log.open("wb") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child", sys.executable, __file__, str(spec_file)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={"PATH": DEFAULT_PATH})


def init_pid(unshare_pid: int) -> int | None:
    """The container's PID 1, as seen from here: the child unshare forked."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def exec_in(pid1: int, image: Image, service: Service | None, argv: Sequence[str],
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``docker exec``: the container's namespaces, root, user and environment."""
    uid, gid = image.user
    env = [f"{k}={v}" for k, v in container_env(image, service).items()]
    return subprocess.run(
        ["nsenter", "--target", str(pid1), "--mount", "--pid", "--root", "--wd",
         "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         "env", "-i", *env, *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, check=False, env={"PATH": DEFAULT_PATH})


def wait_until(check: Callable[[], bool], alive: Callable[[], bool], timeout: float,
               what: str) -> None:
    """Poll ``check`` (bounded in count and time) while ``alive``."""
    deadline = time.monotonic() + timeout
    for _ in range(500):
        if check():
            return
        if not alive() or time.monotonic() > deadline:
            break
        select.select([], [], [], 0.1)
    raise AssertionError(f"{what}: " + (f"not within {timeout} s" if alive() else "exited"))


@dataclass
class Running:
    """A started container whose PID 1 is up and whose probe has passed."""

    proc: subprocess.Popen[bytes]
    pid1: int
    image: Image
    service: Service | None
    log: Path

    def exec(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return exec_in(self.pid1, self.image, self.service, argv)


@contextlib.contextmanager
def running(image: Image, service: Service | None, work: Path, files: dict[str, str],
            probe: Sequence[str], what: str) -> Iterator[Running]:
    """``start`` the container (the build stages linked to this test's venv), wait
    for its PID 1 and then for ``probe`` to pass inside it (``what`` names both in
    a failure, with the log); on the way out, kill whatever of it is left."""
    from harness import STARTED_SESSIONS, session_pids

    log = work / f"{what}.log"
    proc = start(image, service, work, files, dict.fromkeys(image.from_stages, sys.prefix), log)
    STARTED_SESSIONS.add(proc.pid)
    try:
        def alive() -> bool:
            return proc.poll() is None

        pid1 = 0

        def started() -> bool:
            nonlocal pid1
            pid1 = init_pid(proc.pid) or 0
            return pid1 != 0

        try:
            wait_until(started, alive, 10.0, f"PID 1 of the {what}")
            wait_until(lambda: exec_in(pid1, image, service, probe).returncode == 0, alive,
                       30.0, f"{what}'s probe {shlex.join(probe)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{log.read_text()}") from None
        yield Running(proc, pid1, image, service, log)
    finally:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- inside the namespaces, as root --------------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _needed_mounts(paths: list[str]) -> list[str]:
    """This machine's mount points (other than /) that ``paths`` live on: the
    overlay of / does not carry them. Other mounts stay out of the container."""
    points = [line.split()[4].replace("\\040", " ")
              for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    needed = {p for p in points if p != "/" and not p.startswith(PSEUDO)
              and any(path == p or path.startswith(p + "/") for path in paths)}
    kept: list[str] = []
    for point in sorted(needed, key=len):
        if not any(point.startswith(k + "/") for k in kept):
            kept.append(point)
    return kept


def _make_reachable(root: str, path: str) -> None:
    """Let the image's user reach ``path`` (this test's Python): o+x on its
    directories, changed in the overlay only, never through a bind mount."""
    dev = os.stat(root).st_dev
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        inside = root + str(Path(*parts[:i]))
        st = os.stat(inside)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            if st.st_dev != dev:
                sys.exit(f"container: {Path(*parts[:i])} is not traversable and not on the overlay")
            os.chmod(inside, st.st_mode | stat.S_IXOTH)


def _setup_and_exec(spec: dict[str, Any]) -> None:
    work = spec["work"]
    _mount("-t", "tmpfs", "tmpfs", work)
    root = f"{work}/root"
    for d in ("upper", "work", "root"):
        os.mkdir(f"{work}/{d}")
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir=/,upperdir={work}/upper,workdir={work}/work", root)
    bound = _needed_mounts(spec["reachable"])
    for point in bound:
        _mount("--rbind", point, root + point)
    for path in spec["reachable"]:
        _make_reachable(root, path)
    for path, text in spec["files"].items():
        Path(root + path).parent.mkdir(parents=True, exist_ok=True)
        Path(root + path).write_text(text)
        os.chmod(root + path, 0o644)
    for path, target in spec["links"].items():
        Path(root + path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(root + path) and not os.path.islink(root + path):
            shutil.rmtree(root + path)
        elif os.path.lexists(root + path):
            os.unlink(root + path)
        os.symlink(target, root + path)
    for src, dst, read_only in spec["volumes"]:
        target = Path(root + dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(src):
            target.mkdir(exist_ok=True)
        else:
            target.touch()
        _mount("--bind", src, str(target))
        if read_only:
            _mount("-o", "remount,bind,ro", str(target))
    # runc keeps an existing mount point's mode for a tmpfs; a missing one is
    # made 0755 and the tmpfs gets the kernel's default (1777).
    tmpfs = []
    for entry in spec["tmpfs"]:
        point, _, opts = entry.partition(":")
        inside = root + point
        mode = f"mode={stat.S_IMODE(os.stat(inside).st_mode):04o}" if os.path.isdir(inside) else ""
        os.makedirs(inside, mode=0o755, exist_ok=True)
        tmpfs.append((inside, ",".join(o for o in (mode, opts) if o)))
    _mount("-t", "proc", "proc", f"{root}/proc")
    _mount("--rbind", "/dev", f"{root}/dev")
    if spec["read_only"]:
        for point in ["", *bound]:
            _mount("-o", "remount,bind,ro", root + point)
    for inside, opts in tmpfs:
        _mount("-t", "tmpfs", *(["-o", opts] if opts else []), "tmpfs", inside)
    # The image's venv links to this test's Python; a tmpfs over one of its
    # parents (a checkout under /tmp) would hide it, which the real image,
    # with its venv under /opt, never sees.
    for path in spec["reachable"]:
        if any(path == p or path.startswith(p + "/") for p in (t[len(root):] for t, _ in tmpfs)):
            if os.path.isdir(path):
                os.makedirs(root + path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(root + path), exist_ok=True)
                Path(root + path).touch()
            _mount("--bind", path, root + path)
            _mount("-o", "remount,bind,ro", root + path)
    os.chroot(root)
    os.chdir("/")
    uid, gid = spec["user"]
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":
    try:
        _setup_and_exec(json.loads(Path(sys.argv[1]).read_text()))
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"container: {exc}", file=sys.stderr)
        sys.exit(125)
