"""Process hygiene of a freshly forked worker, and dropping privileges.

Everything a worker does to its own process before it runs user code: close
what is not its own, die with the master, arm a deadline the kernel enforces,
ignore the terminal's signals; and the one place where a process gives up
root (``drop_privileges``) and where a user name becomes ids (``lookup_user``).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import signal
from collections.abc import Callable
from typing import Final

from .errors import ConfigError, ExitCode

PR_SET_PDEATHSIG: Final = 1


def close_foreign_fds(keep: set[int]) -> None:
    """Close every fd of this process not in ``keep`` (what the master held is not ours)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def die_with_master(master_pid: int) -> None:
    """SIGTERM us when the master dies, even by kill -9.

    Called after dropping privileges: a credential change clears the setting.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the pipe EOF still tells us
    if os.getppid() != master_pid:
        os._exit(ExitCode.ERROR)


def arm_backstop(seconds: float) -> None:
    """Die by SIGALRM in ``seconds`` unless an earlier deadline is already armed.

    The graceful stop runs in the reactor; a reactor blocked in user code
    never gets there, and an orphan has nobody to KILL it. The kernel timer
    needs no Python code to run.
    """
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    if left == 0 or left > seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)


def ignore_group_signals() -> None:
    """A terminal (or ``timeout``) signals the whole process group; the master
    alone decides what Ctrl-C, hangup and TTIN/TTOU mean."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)


def user_problems(user: str | None, group: str | None,
                  label: Callable[[str], str] = str) -> tuple[tuple[int, int] | None, list[str]]:
    """(uid, gid) for ``--user``/``--group`` (None when neither is given), and every
    problem with them, each naming its setting through ``label``.

    ``group`` defaults to the user's primary group. Only root can become
    another user.
    """
    if user is None and group is None:
        return None, []
    problems = []
    if os.geteuid() != 0:
        key = "user" if user is not None else "group"
        problems.append(f"{label(key)}: only a master started as root can run its workers as "
                        f"another user or group (this runs as uid {os.geteuid()})")
    uid, gid = 0, 0
    try:
        pw = pwd.getpwnam(user) if user is not None else pwd.getpwuid(0)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        problems.append(f"{label('user')}: no such user {user!r}")
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            problems.append(f"{label('group')}: no such group {group!r}")
    return (uid, gid), problems


def lookup_user(user: str | None, group: str | None,
                label: Callable[[str], str] = str) -> tuple[int, int] | None:
    """(uid, gid) for ``--user``/``--group``, or None; ConfigError listing every problem."""
    run_as, problems = user_problems(user, group, label)
    if problems:
        raise ConfigError(problems)
    return run_as


def drop_privileges(run_as: tuple[int, int] | None) -> None:
    """Become (uid, gid) for good, supplementary groups included; no-op for None.

    Group first: once the uid is not root, the gid can no longer change.
    """
    if run_as is None:
        return
    uid, gid = run_as
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
