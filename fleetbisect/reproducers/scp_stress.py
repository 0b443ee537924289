"""scp-stress: copy a large file into the guest N times, each under a timeout.

The field's failure: after some GiB the guest's network stops; the transfer stalls with no
error. A transfer that misses its deadline is a hang (if the host still answers).
"""

from __future__ import annotations

import json
import os

from ..deadline import Deadline
from ..masking import open_masked
from ..remote.base import RemoteError, TransferTimedOut
from ..verdict import Outcome, OutcomeKind
from . import ReproContext, guest_lost

BLOCK = 1 << 20


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
