"""scp-stress: copy a large file into the guest N times, each under a timeout.

The field's failure: after some GiB the guest's network stops; the transfer stalls with no
error. A transfer that moves no byte for `stall` seconds, or misses its deadline, is a hang (if
the host still answers). Each transfer's bytes-over-time go into the reproducer log (one JSON
line per transfer) and, for the one that stopped, into the outcome: where it stopped, and when
the answer came. How the bytes travel (`method`, `source`) is transfer.py's and host_source.py's.
"""

from __future__ import annotations

import json
import os
import time

from ..deadline import Deadline
from ..masking import open_masked
from ..remote.base import Remote, RemoteError, TransferStats, TransferTimedOut
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost, transfer
from .transfer import BLOCK
from .watch import Watch

# $1 dest, $2 bytes. Prints why the guest cannot hold the file there, or nothing. Read-only,
# but for a probe file created and removed next to the destination.
_PREFLIGHT = r"""
d=$1; size=$2; method=$3
case "$d" in /*) ;; *) echo "dest $d is not an absolute path"; exit 0;; esac
if [ "$method" != sftp ] && ! command -v scp >/dev/null 2>&1; then
  echo "the guest has no scp for method: $method (method: sftp uses its sftp-server, or cat)"; exit 0
fi
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

def preflight(spec, guest: Remote, deadline: Deadline) -> str | None:
    """Why `dest` cannot receive `size` bytes in this guest, or None."""
    method = "openssh-scp" if spec.source == "host" else spec.method
    res = guest.run(["sh", "-c", _PREFLIGHT, "sh", spec.dest, str(spec.size), method], deadline=deadline)
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
    m = transfer.ENVIRONMENT.search(error)
    return f"the guest's filesystem refused the write ({m.group(0)})" if m else None


def _via_host(ctx: ReproContext) -> Remote | None:
    """The host connection when the guest is reached through it (OpenSSH then jumps through it)."""
    guest_cfg = getattr(getattr(ctx.target, "config", None), "guest", None)
    return ctx.host if getattr(guest_cfg, "via", None) == "host" else None


def run(spec, ctx: ReproContext) -> list[Outcome]:
    if spec.source == "host":
        from . import host_source

        copy = host_source.prepare(spec, ctx)
    else:
        block = os.urandom(BLOCK)
        via = _via_host(ctx)

        def copy(deadline: Deadline, watch: Watch) -> TransferStats:
            return transfer.put(spec.method, ctx.guest, spec.size, spec.dest, deadline, watch, block, via)

    iterations = []
    total = 0
    with open_masked(ctx.log_path, "w") as log:

        def record(entry: dict) -> None:
            iterations.append(entry)
            log.write(json.dumps(entry) + "\n")
            log.flush()

        def details(extra: dict | None = None) -> dict:
            return {"iterations": iterations, "bytes_total": total, "method": spec.method,
                    "source": spec.source, "stall": spec.stall, **(extra or {})}

        for i in range(1, spec.iterations + 1):
            deadline = Deadline.after(spec.timeout)
            watch = Watch(spec.stall, deadline=deadline)
            try:
                with watch:
                    stats = copy(deadline, watch)
            except RemoteError as e:
                total += watch.done
                evidence = watch.evidence()
                if watch.stalled or watch.timed_out or isinstance(e, TransferTimedOut):
                    why = (f"no byte moved for {spec.stall:g}s" if watch.stalled
                           else f"no completion within {spec.timeout:.0f}s")
                    record({"iteration": i, "bytes": watch.done, "timed_out": watch.timed_out or not watch.stalled,
                            "stalled": watch.stalled, **evidence})
                    out = guest_lost(
                        ctx,
                        f"transfer {i}/{spec.iterations} stalled: {why}, {watch.done / 1e6:.1f} MB into it "
                        f"(last byte at {evidence['last_progress_s']:.1f}s), {total / 1e6:.1f} MB in all",
                        OutcomeKind.HANG, details(),
                    )
                    # when the reproducer gave its answer, on the transfer's clock: the evidence
                    # shows it came `stall` seconds after the last byte, not at the timeout
                    out.details["ended_s"] = round(time.monotonic() - watch.started, 3)
                    log.write(json.dumps({"iteration": i, "ended_s": out.details["ended_s"]}) + "\n")
                    return [out]
                record({"iteration": i, "bytes": watch.done, "error": str(e), **evidence})
                fault = environment_fault(spec, ctx, str(e))
                if fault:
                    return [Outcome(
                        OutcomeKind.INFRA_ERROR,
                        f"transfer {i}/{spec.iterations} failed in the guest's environment, not its "
                        f"kernel: {fault}",
                        details({"error": str(e)}), (ctx.log_name,),
                    )]
                return [guest_lost(ctx, f"transfer {i}/{spec.iterations} failed: {e}", OutcomeKind.FAIL, details())]
            total += stats.bytes
            record({
                "iteration": i, "bytes": stats.bytes, "seconds": round(stats.seconds, 3),
                "mb_per_s": round(stats.mb_per_s, 1), "samples": watch.evidence()["samples"],
            })
            ctx.log(f"transfer {i}/{spec.iterations}: {stats.bytes / 1e6:.1f} MB at {stats.mb_per_s:.1f} MB/s")
    # the log keeps every transfer's samples; the outcome keeps the rates (report.json stays small)
    for entry in iterations:
        entry.pop("samples", None)
    return [Outcome(
        OutcomeKind.PASS,
        f"{spec.iterations} transfers ({spec.method}), {total / 1e6:.1f} MB in all",
        details(), (ctx.log_name,),
    )]
