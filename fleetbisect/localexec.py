"""Local commands with a deadline, their output masked before it touches the disk.

The command writes into a pipe that this process reads and writes, masked, into the log: the
log never holds a secret, not even while the build runs or after the controller was killed.
Its whole process group goes when the deadline passes, on Ctrl-C, and when the controller
dies: the command runs under a tiny `sh` guard that the kernel signals when its parent dies
(PR_SET_PDEATHSIG, set by `setpriv`) and that then kills the group. A pid file (`pidfile`) names the group, so
that a resumed run can kill a build the guard could not (`kill_orphan_build`).
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Mapping

from .deadline import Deadline
from .masking import MaskedFile

# The guard: run the command in the background, wait for it, and when the kernel says our
# parent died (SIGHUP via PR_SET_PDEATHSIG), kill the whole process group, itself included.
GUARD = '[ "$PPID" = "$1" ] || exit 1; shift; trap "kill -s KILL 0" HUP; "$@" & wait $!'
GRACE = 10.0  # after SIGTERM at the deadline, before SIGKILL
DRAIN = 2.0  # after the command exited, output still held by something it left behind
TOKEN_VAR = "FLEETBISECT_BUILD_TOKEN"  # marks the processes of one build, for the orphan killer
# The kernel signals the guard when the controller dies (PR_SET_PDEATHSIG), set by util-linux's
# `setpriv` before it execs the guard. Not a preexec_fn: with one, CPython runs the at-fork
# handlers in the controller, and a Ctrl-C landing in them is swallowed ("Exception ignored in
# _releaseLock"): the controller then waits out the build instead of stopping.
SETPRIV = shutil.which("setpriv")


def _guarded(argv: list[str]) -> list[str]:
    """argv under the guard; the guard exits at once if its parent (we) is already gone."""
    guard = ["/bin/sh", "-c", GUARD, "fleetbisect-guard", str(os.getpid()), *argv]
    return [SETPRIV, "--pdeathsig", "HUP", "--", *guard] if SETPRIV else guard


def run_logged(
    argv: list[str], cwd: Path | None, env: Mapping[str, str], log: MaskedFile, deadline: Deadline,
    pidfile: Path | None = None, nice: int = 0,
) -> int | None:
    """Run argv with its output masked into `log`; kill its process group at the deadline (and
    on Ctrl-C). Returns the exit status, or None when the deadline passed. `nice`: run it at
    that niceness (`nice -n`)."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    env = dict(env)
    env[TOKEN_VAR] = token = secrets.token_hex(8)
    proc = subprocess.Popen(
        (["nice", "-n", str(nice)] if nice else []) + _guarded(argv), cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    reaped = False
    try:
        if pidfile is not None:
            _write_pidfile(pidfile, proc.pid, token)
        fd = proc.stdout.fileno()
        if not _pump(fd, proc, log, deadline):  # the deadline passed
            _killpg(proc, signal.SIGTERM)
            _pump(fd, proc, log, Deadline.after(GRACE))
            _killpg(proc, signal.SIGKILL)  # before reaping: the group id cannot be recycled yet
            proc.wait()
            reaped = True
            return None
        status = proc.wait()
        reaped = True
        return status
    finally:
        if not reaped:  # Ctrl-C or another exception while running
            _killpg(proc, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        log.flush()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def _pump(fd: int, proc: subprocess.Popen, log: MaskedFile, deadline: Deadline) -> bool:
    """Copy the command's output into the log until the command exited and its output ended
    (True), or the deadline passed (False). A silent command never blocks the deadline."""
    drain: Deadline | None = None
    while True:
        if drain is None and _exited(proc):
            drain = Deadline.after(DRAIN)  # something it started may hold the pipe open
        wait = min(deadline.remaining(), drain.remaining() if drain else 1.0, 1.0)
        if wait <= 0:
            return drain is not None
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            data = os.read(fd, 1 << 16)
            if not data:
                return True
            log.write(data)
            log.flush()  # on disk as it comes (masked): a live log, and nothing lost to a kill
            if drain is not None:
                drain = Deadline.after(DRAIN)


def _exited(proc: subprocess.Popen) -> bool:
    """Has the command exited? Without reaping it, so its pid stays ours until we kill."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- orphaned builds --------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _pgrp(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[2])


def _write_pidfile(path: Path, pid: int, token: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid} {_start_time(pid) or '-'} {token}\n")
    tmp.replace(path)


def kill_orphan(pidfile: Path, sig: int = signal.SIGKILL) -> list[int]:
    """Kill what is left of the command a pid file names, if it is still running: its group
    when the leader is the very process recorded (same start time: a recycled pid is never
    killed), else the group's processes that carry the command's token. Returns the pids
    signalled (the leader's for a whole group) and removes the pid file (not for a `sig` other
    than SIGKILL: SIGTERM asks, and a build that does not stop is killed after it)."""
    try:
        pid_s, start, token = pidfile.read_text().split()
        pgid = int(pid_s)
    except (OSError, ValueError):
        return []
    killed = []
    if start != "-" and _start_time(pgid) == start:
        try:
            os.killpg(pgid, sig)
            killed.append(pgid)
        except ProcessLookupError:
            pass
    else:  # the leader is gone; what it started may live on in its group
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _pgrp(int(entry.name)) == pgid and _carries(int(entry.name), token):
                try:
                    os.kill(int(entry.name), sig)
                    killed.append(int(entry.name))
                except ProcessLookupError:
                    pass
    if sig == signal.SIGKILL:
        pidfile.unlink(missing_ok=True)
    return killed


def _carries(pid: int, token: str) -> bool:
    try:
        return f"{TOKEN_VAR}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
