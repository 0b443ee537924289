"""Disk images: the build's image made ready to send (here), and deployed on the host as the
disk a target boots from (there).

    blob = push(...).remote_paths["image"]        # a content-addressed blob, never modified
    dest = deploy_image(host, blob, playbook.image, work_dir, deadline)

On the host, in this order, each command an argv list bounded by the deadline (the Remote wraps
it in `timeout -k`):

    qemu-img info --output=json BLOB       format and virtual size of what was pushed
    mkdir -p DIR; rm -f TMP; df -Pk DIR    free space where DEST lives (a stale TMP freed first)
    qemu-img convert -f FMT -O OUT BLOB TMP
    qemu-img resize -f OUT TMP SIZE        only when `size` is larger than the image
    mv -f TMP DEST                         the previous disk is replaced only now, in one rename

TMP is a fixed name beside DEST (same filesystem, so the rename is atomic; a controller that
died mid-conversion leaves one TMP that the next deploy removes). Not enough space is an
InfraError naming the numbers, never a verdict. A failed conversion removes TMP and leaves DEST
as it was.

Before the push, `encode` turns the local image into what travels (playbook `image.send`):
a raw image becomes a qcow2 without its zero blocks (`sparse`), or a qcow2 with zstd-compressed
clusters (`compressed`); the host's `qemu-img convert` reads either directly, so nothing extra
runs there. bench/image_push.py measures both against a plain upload.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
import subprocess
from pathlib import Path

from ..deadline import Deadline
from ..errors import InfraError
from ..remote.base import Remote

log = logging.getLogger("fleetbisect.image")

INFO_TIMEOUT = 60.0  # qemu-img info, df, mkdir, mv: quick commands
TMP_SUFFIX = ".fleetbisect-tmp"


class ImageError(InfraError):
    """The disk image could not be deployed (no space, a broken image): never a verdict."""


# --- on the controller: what travels -------------------------------------------------------


def encoding(send: str) -> str:
    """The encoding actually used for `send`: without a local qemu-img, the file goes as it is."""
    if send != "plain" and shutil.which("qemu-img") is None:
        log.warning("no qemu-img on this machine: the disk image is sent as it is (image.send: %s)", send)
        return "plain"
    return send


def blob_suffix(send: str) -> str:
    """What an image blob's name adds to the original's sha256: one blob per (content,
    encoding), and the push stage prunes image blobs apart from the small ones."""
    return ".image" if send == "plain" else f".{send}"


def encode_argv(src: Path, src_format: str, send: str, out: Path) -> list[str] | None:
    """The local command making what travels, or None when the file goes as it is."""
    if send == "plain" or (send == "sparse" and src_format != "raw"):
        return None
    extra = ["-c", "-o", "compression_type=zstd"] if send == "compressed" else []
    return ["qemu-img", "convert", "-f", src_format, "-O", "qcow2", *extra, str(src), str(out)]


def local_info(path: Path, deadline: Deadline) -> dict:
    return json.loads(_local(["qemu-img", "info", "--output=json", str(path)], deadline))


def encode(src: Path, send: str, workdir: Path, deadline: Deadline) -> Path:
    """The file to upload for the image `src` (itself, or a qcow2 written in `workdir`)."""
    if send == "plain":
        return src
    out = workdir / "image.qcow2"
    argv = encode_argv(src, local_info(src, deadline)["format"], send, out)
    if argv is None:
        return src
    _local(argv, deadline)
    return out


def _local(argv: list[str], deadline: Deadline) -> str:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=max(1.0, deadline.remaining()))
    except subprocess.TimeoutExpired:
        raise ImageError(f"`{' '.join(argv)}` did not finish within {deadline.seconds:.0f}s") from None
    if proc.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


# --- on the host: the disk the target boots from --------------------------------------------


def dest_path(spec, work_dir: str) -> str:
    return spec.dest or posixpath.join(work_dir, f"disk.{spec.format}")


def tmp_path(dest: str) -> str:
    """Beside DEST (same filesystem: the final rename is atomic), hidden, fixed per DEST."""
    head, tail = posixpath.split(dest)
    return posixpath.join(head, f".{tail}{TMP_SUFFIX}")


def info_argv(blob: str) -> list[str]:
    return ["qemu-img", "info", "--output=json", blob]


def df_argv(directory: str) -> list[str]:
    return ["df", "-Pk", directory]


def convert_argv(blob: str, blob_format: str, out_format: str, tmp: str) -> list[str]:
    return ["qemu-img", "convert", "-f", blob_format, "-O", out_format, blob, tmp]


def resize_argv(tmp: str, out_format: str, size: int) -> list[str]:
    return ["qemu-img", "resize", "-f", out_format, tmp, str(size)]


def parse_info(text: str, blob: str) -> tuple[str, int]:
    """(format, virtual size) from `qemu-img info --output=json`."""
    try:
        info = json.loads(text)
        return str(info["format"]), int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"`qemu-img info` gave no format and virtual size for {blob}: {text.strip()[:200]!r}") from None


def parse_df(text: str, directory: str) -> int:
    """Available bytes from `df -Pk DIR` (POSIX: the 4th field of the 2nd line, in KiB)."""
    lines = text.strip().splitlines()
    try:
        return int(lines[1].split()[3]) * 1024
    except (IndexError, ValueError):
        raise ImageError(f"cannot read the free space of {directory} from df: {text.strip()[:200]!r}") from None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def deploy_image(host: Remote, blob: str, spec, work_dir: str, deadline: Deadline) -> str:
    """Make DEST (spec.dest, default WORK_DIR/disk.FORMAT) a fresh copy of the pushed image:
    converted to spec.format, grown to spec.size. Returns DEST. Raises ImageError (infra)."""
    dest = dest_path(spec, work_dir)
    directory = posixpath.dirname(dest)
    tmp = tmp_path(dest)

    res = host.run(info_argv(blob), deadline=deadline.sub(INFO_TIMEOUT))
    if not res.ok:
        raise ImageError(f"{host.name}: `qemu-img info` cannot read the pushed image {blob}: "
                         f"{(res.stderr or res.stdout).strip()[-300:]}")
    blob_format, virtual = parse_info(res.stdout, blob)
    size = spec.size or virtual
    if size < virtual:
        raise ImageError(f"image.size is {_gib(size)}, smaller than the image's virtual size "
                         f"{_gib(virtual)}: a disk is never shrunk (raise image.size)")

    # The disk may be filled by the guest up to its size: that much must be free, beside the
    # previous disk, which stays until the new one is complete.
    host.run(["mkdir", "-p", directory], deadline=deadline.sub(INFO_TIMEOUT), check=True)
    host.run(["rm", "-f", tmp], deadline=deadline.sub(INFO_TIMEOUT), check=True)
    res = host.run(df_argv(directory), deadline=deadline.sub(INFO_TIMEOUT), check=True)
    free = parse_df(res.stdout, directory)
    if free < size:
        raise ImageError(f"{host.name}: not enough space for the disk image in {directory}: "
                         f"{_gib(size)} needed (image.size, or the image's virtual size), "
                         f"{_gib(free)} free")

    try:
        _checked(host, convert_argv(blob, blob_format, spec.format, tmp), deadline, "convert")
        if size > virtual:
            _checked(host, resize_argv(tmp, spec.format, size), deadline.sub(INFO_TIMEOUT), "resize")
    except BaseException:
        try:
            host.run(["rm", "-f", tmp], deadline=Deadline.after(30))
        except Exception as e:  # noqa: BLE001 - the conversion's error is the one to report
            log.warning("%s: could not remove %s: %s", host.name, tmp, e)
        raise
    host.run(["mv", "-f", tmp, dest], deadline=deadline.sub(INFO_TIMEOUT), check=True)
    return dest


def probes(host: Remote, spec, work_dir: str, deadline: Deadline) -> list:
    """Read-only checks for `fleetbisect check`: qemu-img on the host, and room for the disk
    where it will be (the nearest existing directory of DEST)."""
    from ..targets.base import Check  # targets import this module

    res = host.run(["sh", "-c", "command -v qemu-img"], deadline=deadline.sub(INFO_TIMEOUT))
    checks = [Check("qemu-img", res.ok, res.stdout.strip() if res.ok else
                    "qemu-img not found in PATH on the host: it converts the disk image (Debian: qemu-utils)")]
    directory = posixpath.dirname(dest_path(spec, work_dir))
    nearest = 'd=$1; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"'
    res = host.run(["sh", "-c", nearest, "sh", directory], deadline=deadline.sub(INFO_TIMEOUT))
    if not res.ok:
        return checks + [Check("disk image space", False, f"df failed for {directory}: {res.stderr.strip()[-200:]}")]
    free = parse_df(res.stdout, directory)
    if spec.size and free < spec.size:
        return checks + [Check("disk image space", False, f"{directory}: {_gib(free)} free, "
                               f"image.size needs {_gib(spec.size)}")]
    return checks + [Check("disk image space", True, f"{directory}: {_gib(free)} free"
                           + (f" for {_gib(spec.size)}" if spec.size else ""))]


def _checked(host: Remote, argv: list[str], deadline: Deadline, what: str) -> None:
    res = host.run(argv, deadline=deadline)
    if not res.ok:
        raise ImageError(f"{host.name}: qemu-img {what} failed (exit {res.exit_status}): "
                         f"{(res.stderr or res.stdout).strip()[-300:]}")
