"""A lease on a host, so two runs never drive the same VM.

The lease is a file in the host's work dir: `RUN_ID EXPIRY HOLDER`, changed only under
`flock` on the host. The controller renews it while it runs; a lease whose holder died is
taken over once it has expired, with a message. The same run (after `resume`) takes its own
lease back at once.
"""

from __future__ import annotations

import os
import posixpath
import socket
import threading
from dataclasses import dataclass

from .deadline import Deadline
from .errors import UserError
from .remote.base import Remote

# $1 lease file, $2 run id, $3 ttl seconds, $4 holder ("controller-host:pid"), $5 the run id
# of a lease known to be dead (its controller is gone), taken over before expiry. Prints a status.
_ACQUIRE = r"""
f=$1; id=$2; ttl=$3; who=$4; dead=${5:-}
mkdir -p "$(dirname "$f")" || exit 2
exec 9>>"$f.lock" || exit 2
flock -w 10 9 || { echo "busy"; exit 3; }
now=$(date +%s)
if [ -s "$f" ]; then
  read -r owner exp holder < "$f"
  if [ "$owner" != "$id" ] && [ "$owner" != "$dead" ] && [ "${exp:-0}" -gt "$now" ]; then
    echo "held $owner $exp $holder"; exit 3
  fi
  [ "$owner" != "$id" ] && echo "took-over $owner $exp $holder"
fi
printf '%s %s %s\n' "$id" "$((now + ttl))" "$who" > "$f.new" && mv -f "$f.new" "$f" && echo "ok"
"""

_RELEASE = r"""
f=$1; id=$2
exec 9>>"$f.lock" || exit 0
flock -w 10 9 || exit 0
[ -s "$f" ] && read -r owner rest < "$f" && [ "$owner" = "$id" ] && rm -f "$f"
exit 0
"""


class LeaseHeld(UserError):
    pass


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


@dataclass
class Lease:
    host: Remote
    path: str
    run_id: str
    ttl: int = 300

    @classmethod
    def on(cls, host: Remote, work_dir: str, run_id: str, ttl: int = 300) -> "Lease":
        return cls(host, posixpath.join(work_dir, "lease"), run_id, ttl)

    def acquire(self) -> str | None:
        """Take or renew the lease; returns a note when a stale lease was taken over.

        A lease held by a controller on this machine whose process is gone (a run killed with
        SIGKILL, then not resumed) is taken over at once rather than after its expiry."""
        res = self._try()
        lines = res.stdout.strip().splitlines()
        why = "expired"
        if res.exit_status == 3 and lines and lines[-1].startswith("held"):
            _, owner, exp, *holder = lines[-1].split()
            if holder and _dead_here(holder[0]):
                res = self._try(dead=owner)
                lines = res.stdout.strip().splitlines()
                why = "dead (its controller is gone)"
        if res.exit_status == 3 and lines and lines[-1].startswith("held"):
            _, owner, exp, *holder = lines[-1].split()
            raise LeaseHeld(
                f"{self.host.name} is leased by run {owner} (controller {' '.join(holder) or '?'}) "
                f"until epoch {exp}: another run drives this VM. Wait for it, or stop it."
            )
        if not res.ok:
            raise LeaseHeld(f"{self.host.name}: could not take the lease at {self.path}: "
                            f"{(res.stderr or res.stdout).strip()}")
        for line in lines:
            if line.startswith("took-over"):
                _, owner, exp, *holder = line.split()
                return f"took over the {why} lease of run {owner} ({' '.join(holder)}) on {self.host.name}"
        return None

    def _try(self, dead: str = ""):
        who = f"{socket.gethostname()}:{os.getpid()}"
        return self.host.run(
            ["sh", "-c", _ACQUIRE, "sh", self.path, self.run_id, str(self.ttl), who, dead],
            deadline=Deadline.after(30),
        )

    def release(self) -> None:
        self.host.run(["sh", "-c", _RELEASE, "sh", self.path, self.run_id], deadline=Deadline.after(30))


class LeaseKeeper:
    """Renews a lease every ttl/3 seconds in a thread until stopped."""

    def __init__(self, lease: Lease, on_error):
        self.lease = lease
        self.on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.lease.ttl / 3):
            try:
                self.lease.acquire()
            except Exception as e:  # noqa: BLE001 - reported; the next renewal tries again
                self.on_error(f"lease renewal failed: {e}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
