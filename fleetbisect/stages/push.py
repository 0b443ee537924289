"""Push stage: artifacts to the host, content-addressed, nothing half-written.

Each artifact lands at `<work_dir>/blobs/<sha256>`: uploaded to `staging/` under a unique name
and renamed into place, so a blob that exists is complete, and an unchanged artifact (same
hash) costs one `test -e` and no transfer at all.

A disk image (artifact `image`) may travel encoded (stages/image.py `encode`: a raw image as a
qcow2 without its zero blocks, or with compressed clusters): its blob is named after the
original's sha256 plus the encoding (`<sha256>.sparse`), made only when that blob is missing,
and read as it is by the host's `qemu-img convert`.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..deadline import Deadline
from ..remote.base import Remote
from . import image as disk_image
from .build import sha256_file

KEEP_BLOBS = 12  # most recently used blobs kept on the host; older ones are pruned
KEEP_IMAGE_BLOBS = 2  # of disk images (GBs each: a dozen could fill the host), counted apart


@dataclass(frozen=True)
class PushResult:
    remote_paths: dict[str, str]  # artifact name -> path on the host
    uploaded: dict[str, int]  # artifact name -> bytes sent (absent when unchanged)
    seconds: float


class HashCache:
    """sha256 of local files, remembered by (path, size, mtime) so a step hashes only what changed."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._known:
            self._known[key] = sha256_file(path)
        return self._known[key]


def push(
    host: Remote,
    work_dir: str,
    artifacts: dict[str, Path],
    deadline: Deadline,
    hashes: HashCache | None = None,
    image_send: str = "sparse",
) -> PushResult:
    """`image_send`: how the `image` artifact travels (the playbook's image.send)."""
    started = time.monotonic()
    hashes = hashes or HashCache()
    blobs = posixpath.join(work_dir, "blobs")
    staging = posixpath.join(work_dir, "staging")
    send = disk_image.encoding(image_send) if "image" in artifacts else "plain"
    digests = {name: hashes(path) + (disk_image.blob_suffix(send) if name == "image" else "")
               for name, path in artifacts.items()}

    # One round trip: make the dirs, report which blobs exist and mark them used (mtime), and
    # prune old blobs so a long run cannot fill the host's disk, never the ones this step uses
    # (image blobs carry a suffix, `<sha256>.sparse`, and are counted apart).
    keep = sorted(set(digests.values()))
    script = (
        'mkdir -p "$1" "$2" && b=$1 && shift 2 && mi=0 && mp=0 && for h; do '
        'if [ -e "$b/$h" ]; then touch "$b/$h" && echo "$h"; '
        'else case $h in *.*) mi=$((mi + 1));; *) mp=$((mp + 1));; esac; fi; done; '
        # the blobs about to be uploaded count against the limits too
        f'cd "$b" && ls -1t | awk -v ki=$(({KEEP_IMAGE_BLOBS} - mi)) -v kp=$(({KEEP_BLOBS} - mp)) '
        "'/\\./ { if (++i > ki) print; next } { if (++n > kp) print }' | "
        'while read -r f; do case " $* " in *" $f "*) ;; *) rm -f -- "$f";; esac; done; true'
    )
    present = set(
        host.run(
            ["sh", "-c", script, "sh", blobs, staging, *keep],
            deadline=deadline.sub(60),
            check=True,
        ).stdout.split()
    )
    uploaded: dict[str, int] = {}
    moves: list[str] = []  # part, blob, part, blob...: renamed into place in one round trip
    for name, path in artifacts.items():
        digest = digests[name]
        if digest in present:
            continue
        part = posixpath.join(staging, f"{digest}.{os.getpid()}.part")
        if name == "image" and send != "plain":
            with tempfile.TemporaryDirectory(prefix="fleetbisect-image-") as tmp:
                stats = host.put(disk_image.encode(path, send, Path(tmp), deadline), part, deadline=deadline)
        else:
            stats = host.put(path, part, deadline=deadline)
        moves += [part, posixpath.join(blobs, digest)]
        present.add(digest)
        uploaded[name] = stats.bytes
    rename = getattr(host, "rename", None)  # an SSH host renames over SFTP: no command round trip
    if moves and rename is not None:
        for part, blob in zip(moves[::2], moves[1::2], strict=True):
            rename(part, blob, deadline=deadline.sub(60))
    elif moves:
        host.run(["sh", "-c", 'while [ $# -gt 0 ]; do mv -f "$1" "$2" || exit; shift 2; done', "sh", *moves],
                 deadline=deadline.sub(60), check=True)
    return PushResult(
        {name: posixpath.join(blobs, digests[name]) for name in artifacts},
        uploaded,
        time.monotonic() - started,
    )
