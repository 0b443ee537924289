"""scp-stress: copy a large file into the guest N times, each under a timeout.

The field's failure: after some GiB the guest's network stops; the transfer stalls with no
error. A transfer that misses its deadline is a hang (if the host still answers).
"""

from __future__ import annotations

import json
import os
import re

from ..deadline import Deadline
from ..masking import open_masked
from ..remote.base import Remote, RemoteError, TransferTimedOut
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost

BLOCK = 1 << 20

# $1 dest, $2 bytes. Prints why the guest cannot hold the file there, or nothing. Read-only,
# but for a probe file created and removed next to the destination.
_PREFLIGHT = r"""
d=$1; size=$2
case "$d" in /*) ;; *) echo "dest $d is not an absolute path"; exit 0;; esac
if [ -e "$d" ] && [ ! -f "$d" ]; then echo "dest $d exists and is not a regular file: a copy there proves nothing"; exit 0; fi
dir=$(dirname "$d")
[ -d "$dir" ] || { echo "the directory $dir does not exist in the guest"; exit 0; }
probe="$dir/.fleetbisect-probe.$$"
if ! : > "$probe" 2>/dev/null; then echo "cannot create files in $dir (read-only or not permitted)"; exit 0; fi
rm -f "$probe"
set -- $(df -Pk "$dir" 2>/dev/null | awk 'NR==2 {print $2, $4}')
have=0; [ -f "$d" ] && have=$(($(wc -c < "$d") / 1024))
if [ "${1:-0}" -gt 0 ] && [ $(( (${2:-0} + have) * 1024 )) -lt "$size" ]; then
  echo "only $(( ${2:-0} + have )) KiB free for $d in the guest, the file is $((size / 1024)) KiB"
fi
"""

# What a write into the guest says when the guest's environment, not its kernel, refused it.
_ENVIRONMENT = re.compile(
    r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|"
    r"Operation not permitted|No such file or directory|Is a directory|bytes written, expected",
    re.IGNORECASE,
)


def preflight(spec, guest: Remote, deadline: Deadline) -> str | None:
    """Why `dest` cannot receive `size` bytes in this guest, or None."""
    res = guest.run(["sh", "-c", _PREFLIGHT, "sh", spec.dest, str(spec.size)], deadline=deadline)
    problem = res.stdout.strip()
    if not res.ok and not problem:
        problem = f"the preflight exited {res.exit_status}: {res.stderr.strip()[-200:]}"
    return problem or None


def environment_fault(spec, ctx: ReproContext, error: str) -> str | None:
    """Why a failed transfer is the guest's environment's fault (a full or read-only disk, a
    missing directory), or None when the guest cannot say (it is gone: the kernel's business)."""
    try:
        problem = preflight(spec, ctx.guest, Deadline.after(15))
    except RemoteError:
        problem = None  # the guest stopped answering: not an environment question
    if problem:
        return problem
    m = _ENVIRONMENT.search(error)
    return f"the guest's filesystem refused the write ({m.group(0)})" if m else None


class PatternSource:
    """`size` bytes of incompressible data without holding them in memory."""

    def __init__(self, size: int, block: bytes | None = None):
        self.left = size
        self.block = block or os.urandom(BLOCK)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.pos)
            out += self.block[self.pos : self.pos + take]
            self.pos = (self.pos + take) % len(self.block)
        self.left -= n
        return bytes(out)


def run(spec, ctx: ReproContext) -> list[Outcome]:
    block = os.urandom(BLOCK)
    iterations = []
    total = 0
    log_path = ctx.log_path
    with open_masked(log_path, "w") as log:

        def record(entry: dict) -> None:
            iterations.append(entry)
            log.write(json.dumps(entry) + "\n")
            log.flush()

        for i in range(1, spec.iterations + 1):
            deadline = Deadline.after(spec.timeout)
            try:
                stats = ctx.guest.put_stream(
                    PatternSource(spec.size, block), spec.size, spec.dest, deadline=deadline
                )
            except TransferTimedOut as e:
                total += e.bytes_done
                record({"iteration": i, "bytes": e.bytes_done, "timed_out": True})
                return [guest_lost(
                    ctx,
                    f"transfer {i}/{spec.iterations} stalled: no completion within "
                    f"{spec.timeout:.0f}s after {total / 1e6:.1f} MB in all",
                    OutcomeKind.HANG,
                    {"iterations": iterations, "bytes_total": total},
                )]
            except RemoteError as e:
                record({"iteration": i, "error": str(e)})
                fault = environment_fault(spec, ctx, str(e))
                if fault:
                    return [Outcome(
                        OutcomeKind.INFRA_ERROR,
                        f"transfer {i}/{spec.iterations} failed in the guest's environment, not its "
                        f"kernel: {fault}",
                        {"iterations": iterations, "bytes_total": total, "error": str(e)},
                        (ctx.log_name,),
                    )]
                return [guest_lost(
                    ctx,
                    f"transfer {i}/{spec.iterations} failed: {e}",
                    OutcomeKind.FAIL,
                    {"iterations": iterations, "bytes_total": total},
                )]
            total += stats.bytes
            record({
                "iteration": i, "bytes": stats.bytes, "seconds": round(stats.seconds, 3),
                "mb_per_s": round(stats.mb_per_s, 1),
            })
            ctx.log(f"transfer {i}/{spec.iterations}: {stats.bytes / 1e6:.1f} MB at {stats.mb_per_s:.1f} MB/s")
    return [Outcome(
        OutcomeKind.PASS,
        f"{spec.iterations} transfers, {total / 1e6:.1f} MB in all",
        {"iterations": iterations, "bytes_total": total},
        (ctx.log_name,),
    )]
