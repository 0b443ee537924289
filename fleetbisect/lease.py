"""A lease on a host, so two controllers never drive the same VM.

The lease is a file in the host's work dir, one line, changed only under `flock` on the host:

    RUN_ID EXPIRY CONTROLLER_HOST:PID TOKEN

The token is random per controller (per `run`/`resume` process, per `step` invocation): it,
not the run id, says whose lease it is, so a second `resume` of the same run while the first
still drives the VM is refused like any other run. The holder renews the lease every ttl/3; a
lease whose holder died is taken over once it has expired, or at once when its controller ran on
this machine and its process is gone. A lease line without a token (written by an older
fleetbisect) is read as held by someone else.

A renewal that fails (the lease taken over, the host gone) is not a warning: the holder no
longer knows that it alone drives the VM, so `LeaseKeeper.lost` is set and `check()` raises.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .deadline import Deadline
from .errors import InfraError, UserError
from .remote.base import Remote

# $1 lease file, $2 run id, $3 ttl seconds, $4 holder ("controller-host:pid"), $5 token,
# $6 "holder/token" of a lease known to be dead (its controller is gone), taken over before
# expiry. Prints a status; the lease is ours when its token is ours.
_ACQUIRE = r"""
f=$1; id=$2; ttl=$3; who=$4; token=$5; dead=${6:-}
mkdir -p "$(dirname "$f")" || exit 2
exec 9>>"$f.lock" || exit 2
flock -w 10 9 || { echo "busy"; exit 3; }
now=$(date +%s)
if [ -s "$f" ]; then
  read -r owner exp holder tok rest < "$f"
  if [ "$tok" != "$token" ] && [ "$holder/$tok" != "$dead" ] && [ "${exp:-0}" -gt "$now" ]; then
    echo "held $owner $exp $holder $tok"; exit 3
  fi
  [ "$tok" != "$token" ] && echo "took-over $owner $exp $holder $tok"
fi
printf '%s %s %s %s\n' "$id" "$((now + ttl))" "$who" "$token" > "$f.new" && mv -f "$f.new" "$f" && echo "ok"
"""

_RELEASE = r"""
f=$1; token=$2
exec 9>>"$f.lock" || exit 0
flock -w 10 9 || exit 0
[ -s "$f" ] && read -r owner exp holder tok rest < "$f" && [ "$tok" = "$token" ] && rm -f "$f"
exit 0
"""


TTL = 300  # seconds a lease lasts unless renewed (every TTL/3)


class LeaseHeld(UserError):
    pass


class LeaseLost(InfraError):
    """The lease could not be renewed: another controller may drive the VM now."""


def _dead_here(holder: str) -> bool:
    """True when `holder` ("host:pid") names a process on this machine that no longer runs."""
    name, _, pid = holder.rpartition(":")
    if name != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def new_token() -> str:
    return secrets.token_hex(8)


@dataclass
class Lease:
    host: Remote
    path: str
    run_id: str
    ttl: int = TTL
    token: str = field(default_factory=new_token)

    @classmethod
    def on(cls, host: Remote, work_dir: str, run_id: str, ttl: int | None = None,
           token: str | None = None) -> "Lease":
        return cls(host, posixpath.join(work_dir, "lease"), run_id, ttl or TTL, token or new_token())

    @property
    def holder(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> str | None:
        """Take or renew the lease; returns a note when a stale lease was taken over.

        A lease held by a controller on this machine whose process is gone (a run killed with
        SIGKILL, then not resumed) is taken over at once rather than after its expiry."""
        res = self._try()
        lines = res.stdout.strip().splitlines()
        why = "expired"
        if res.exit_status == 3 and lines and lines[-1].startswith("held"):
            _, owner, exp, *rest = lines[-1].split()
            holder, tok = (rest + ["", ""])[:2]
            if holder and _dead_here(holder):
                res = self._try(dead=f"{holder}/{tok}")
                lines = res.stdout.strip().splitlines()
                why = "dead (its controller is gone)"
        if res.exit_status == 3 and lines and lines[-1].startswith("held"):
            _, owner, exp, *rest = lines[-1].split()
            holder = rest[0] if rest else "?"
            same = " (the same run, driven by another controller)" if owner == self.run_id else ""
            raise LeaseHeld(
                f"{self.host.name} is leased by run {owner}{same} (controller {holder}) until epoch "
                f"{exp}: another controller drives this VM. Wait for it, or stop it."
            )
        if not res.ok:
            raise LeaseHeld(f"{self.host.name}: could not take the lease at {self.path}: "
                            f"{(res.stderr or res.stdout).strip()}")
        for line in lines:
            if line.startswith("took-over"):
                _, owner, exp, *rest = line.split()
                return f"took over the {why} lease of run {owner} ({rest[0] if rest else '?'}) on {self.host.name}"
        return None

    def _try(self, dead: str = ""):
        return self.host.run(
            ["sh", "-c", _ACQUIRE, "sh", self.path, self.run_id, str(self.ttl), self.holder, self.token, dead],
            deadline=Deadline.after(30),
        )

    def release(self) -> None:
        self.host.run(["sh", "-c", _RELEASE, "sh", self.path, self.token], deadline=Deadline.after(30))


class LeaseKeeper:
    """Renews a lease every ttl/3 seconds in a thread until stopped.

    The first renewal that fails ends the keeping: `lost` says why (None while the lease is
    held), `check()` raises LeaseLost, and `on_lost(message)` is called once from the thread
    (to tell the user, to cut a connection). `on_renewed()` is called after each renewal."""

    def __init__(self, lease: Lease, on_lost: Callable[[str], None] | None = None,
                 on_renewed: Callable[[], None] | None = None, interval: float | None = None,
                 reconnect: Callable[[], Remote] | None = None):
        self.lease = lease
        # For a host that reboots during a step (a bare-metal box): a renewal that fails for the
        # connection is tried again on a new one until the lease would expire (it is ours until
        # then); a lease another controller holds by then is lost as always.
        self.reconnect = reconnect
        self._renewed_at = time.monotonic()
        self.on_lost = on_lost
        self.on_renewed = on_renewed
        self.interval = lease.ttl / 3 if interval is None else interval
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._renew()
            except Exception as e:  # noqa: BLE001 - any failure: we no longer know we hold it
                if self._stop.is_set():
                    return  # stopping: the run is over, a renewal racing the release is moot
                self.lost = f"lost the lease on {self.lease.host.name}: {e}"
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                return
            if self.on_renewed is not None:
                self.on_renewed()

    def _renew(self) -> None:
        try:
            self.lease.acquire()
        except LeaseHeld:
            raise
        except Exception:
            if self.reconnect is None:
                raise
            self._renew_again()
        self._renewed_at = time.monotonic()

    def _renew_again(self) -> None:
        expires = self._renewed_at + self.lease.ttl - 10
        while not self._stop.is_set():
            try:
                conn = self.reconnect()
            except Exception:  # noqa: BLE001 - the host is still down: try again until expiry
                if time.monotonic() >= expires:
                    raise
                self._stop.wait(5)
                continue
            old, self.lease.host = self.lease.host, conn
            try:
                old.close()
            except Exception:  # noqa: BLE001 - the old connection is dead anyway
                pass
            self.lease.acquire()
            return

    def check(self) -> None:
        """Raise LeaseLost once the lease is lost: call it before anything that drives the VM
        or records a verdict."""
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
