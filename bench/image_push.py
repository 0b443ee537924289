"""Disk image push: a plain upload against compressed and sparse-aware ones, in the same run.

    .venv/bin/python bench/image_push.py [--virtual-mib 1024] [--data-mib 96] [--runs 3]

Builds a disk image the way a distribution build leaves one: an ext4 filesystem of
`--virtual-mib` made with `mkfs.ext4 -d` from `--data-mib` of real files (this machine's
/usr/lib and /usr/share: binaries, libraries, text), as a raw sparse file and as the qcow2
`qemu-img convert` makes of it (what `nix build .#qemuImage` hands over). Starts a lab sshd on
loopback (fleetbisect.lab.vmhost.LabHost) and, for each artifact, times every method end to
end, from the file on the controller to a raw disk on the host that a VM can boot (converted
with `qemu-img convert -O raw` and resized, as stages/image.py does):

    plain           upload the file as it is, convert on the host (the baseline)
    zstd -1         compress to a file, upload, `zstd -d` on the host, convert
    gzip -1         the same with gzip
    zstd -1 | ssh   compress and decompress in one pipeline through OpenSSH's ssh
    qcow2           (raw only) `qemu-img convert -O qcow2` locally: zero blocks are not sent,
                    and the host's raw conversion reads the qcow2 directly
    qcow2 + zstd    (qemu-img convert -c -o compression_type=zstd) compressed clusters
    tar --sparse    (raw only) `tar -cS | ssh tar -xS`: holes are not sent

Methods run interleaved `--runs` times; the table shows median seconds, bytes sent, the ratio
to plain (>1: faster than plain), and each method's phases (local, upload, host). Loopback
moves ~300-700 MB/s, far faster than the LANs and WANs real VM hosts sit behind, so the table
also shows what each sequential method would take on a 1 Gbit/s (110 MB/s) and a 100 Mbit/s
(11 MB/s) link: its measured local and host phases plus bytes / link speed (computed, not
measured; the pipeline methods have no separable phases and are left out there). Exits 1 when
an upload came out different from the source. Everything lives in one temporary directory.

Measured (1024 MiB ext4 holding 126 MiB of files, median of 3, 2 busy cores, load ~7): raw
artifact: plain 15.7 s; qcow2 made locally 3.9 s (4.05x; computed 4.7x at 1 Gbit/s, 7.3x at
100 Mbit/s); qcow2 + zstd 3.30x (12.1x at 100 Mbit/s); zstd -1 2.57x; tar --sparse 3.01x;
gzip -1 0.37x. qcow2 artifact: plain 3.45 s is fastest here and at 1 Gbit/s; compressed
clusters pay below that (1.64x at 100 Mbit/s). Hence `image.send: sparse` (raw goes as a
local qcow2, qcow2 as it is) by default and `compressed` for slow links. qemu-img finds zero
blocks by content, so a raw image written without holes is sparse-sent too; tar --sparse sees
only the holes the filesystem has.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetbisect.deadline import Deadline  # noqa: E402
from fleetbisect.lab.vmhost import LabHost  # noqa: E402
from fleetbisect.remote import openssh  # noqa: E402
from fleetbisect.remote.ssh import SSHRemote  # noqa: E402

LINKS = {"1 Gbit/s": 110e6, "100 Mbit/s": 11e6}
SOURCES = ("/usr/lib", "/usr/share")


def fill(src: Path, budget: int) -> int:
    """Copy regular files from SOURCES into `src` until `budget` bytes; returns bytes copied."""
    done = 0
    for root in SOURCES:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                size = path.stat().st_size
                if size == 0 or done + size > budget:
                    continue
                dest = src / path.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(path, dest)
                except OSError:
                    continue
                done += size
                if done >= budget * 0.98:
                    return done
    return done


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(argv, check=True, stderr=subprocess.PIPE, **kw)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Bench:
    def __init__(self, host: LabHost, remote: SSHRemote, work: Path, virtual: int):
        self.host, self.remote, self.work, self.virtual = host, remote, work, virtual
        self.remote_dir = work / "remote"
        self.remote_dir.mkdir()
        cfg_dir = work / "ssh"
        cfg_dir.mkdir()
        cfg = cfg_dir / "ssh_config"
        cfg.write_text(openssh.ssh_config(remote.params, remote.endpoint, cfg_dir / "known_hosts"))
        self.ssh = ["ssh", "-F", str(cfg), "-c", openssh.CIPHERS, openssh.TARGET]

    def host_run(self, argv: list[str]) -> None:
        self.remote.run(argv, deadline=Deadline.after(600), check=True)

    def put(self, local: Path, name: str) -> str:
        dest = str(self.remote_dir / name)
        self.remote.put(local, dest, deadline=Deadline.after(600))
        return dest

    def to_disk(self, blob: str, fmt: str | None = None) -> str:
        """What stages/image.py does on the host: convert to raw and resize."""
        disk = str(self.remote_dir / "disk.raw")
        self.host_run(["qemu-img", "convert", *(["-f", fmt] if fmt else []), "-O", "raw", blob, disk])
        self.host_run(["qemu-img", "resize", "-f", "raw", disk, str(self.virtual + (64 << 20))])
        return disk

    def pipe(self, producer: list[str], consumer: list[str]) -> None:
        prod = subprocess.Popen(producer, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        try:
            run([*self.ssh, shlex.join(consumer)], stdin=prod.stdout)
        finally:
            prod.stdout.close()
            if prod.wait() != 0:
                raise RuntimeError(f"{producer[0]} exited {prod.returncode}")

    def methods(self, kind: str) -> dict:
        """name -> fn(src) -> (phases {local, upload, host}, bytes sent, disk path on host)."""
        tmp = self.work / "local"
        rdir = self.remote_dir

        def plain(src):
            t0 = time.monotonic()
            blob = self.put(src, "blob")
            t1 = time.monotonic()
            disk = self.to_disk(blob)
            return {"local": 0.0, "upload": t1 - t0, "host": time.monotonic() - t1}, src.stat().st_size, disk

        def compressed(argv, ext, decomp):
            def method(src):
                t0 = time.monotonic()
                packed = tmp.with_suffix(ext)
                with open(packed, "wb") as out:
                    run([*argv, str(src)], stdout=out)
                t1 = time.monotonic()
                blob = self.put(packed, "blob" + ext)
                t2 = time.monotonic()
                self.host_run(["sh", "-c", decomp, "sh", blob, str(rdir / "blob")])
                disk = self.to_disk(str(rdir / "blob"))
                t3 = time.monotonic()
                sent = packed.stat().st_size
                packed.unlink()
                return {"local": t1 - t0, "upload": t2 - t1, "host": t3 - t2}, sent, disk
            return method

        def zstd_pipe(src):
            t0 = time.monotonic()
            self.pipe(["zstd", "-1", "-T0", "-q", "-c", str(src)],
                      ["sh", "-c", 'zstd -d -q -f -o "$1"', "sh", str(rdir / "blob")])
            disk = self.to_disk(str(rdir / "blob"))
            return {"pipeline": time.monotonic() - t0}, None, disk

        def qcow2(extra, ext):
            def method(src):
                t0 = time.monotonic()
                packed = tmp.with_suffix(ext)
                run(["qemu-img", "convert", "-O", "qcow2", *extra, str(src), str(packed)])
                t1 = time.monotonic()
                blob = self.put(packed, "blob" + ext)
                t2 = time.monotonic()
                disk = self.to_disk(blob, "qcow2")
                t3 = time.monotonic()
                sent = packed.stat().st_size
                packed.unlink()
                return {"local": t1 - t0, "upload": t2 - t1, "host": t3 - t2}, sent, disk
            return method

        def tar_sparse(src):
            t0 = time.monotonic()
            self.pipe(["tar", "-cSf", "-", "-C", str(src.parent), src.name],
                      ["tar", "-xSf", "-", "-C", str(rdir)])
            disk = self.to_disk(str(rdir / src.name))
            return {"pipeline": time.monotonic() - t0}, None, disk

        methods = {
            "plain": plain,
            "zstd -1": compressed(["zstd", "-1", "-T0", "-q", "-c"], ".zst", 'zstd -d -q -f -o "$2" "$1"'),
            "gzip -1": compressed(["gzip", "-1", "-c"], ".gz", 'gzip -d -c "$1" > "$2"'),
            "zstd -1 | ssh": zstd_pipe,
        }
        if kind == "raw":
            methods["qcow2"] = qcow2([], ".qcow2")
        methods["qcow2 + zstd"] = qcow2(["-c", "-o", "compression_type=zstd"], ".zqcow2")
        if kind == "raw":
            methods["tar --sparse"] = tar_sparse
        return methods


def clear(remote_dir: Path) -> None:
    for p in remote_dir.iterdir():
        p.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--virtual-mib", type=int, default=1024, help="the filesystem's size")
    ap.add_argument("--data-mib", type=int, default=96, help="real files written into it")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to put the temporary directory")
    args = ap.parse_args(argv)
    virtual = args.virtual_mib << 20
    work = Path(tempfile.mkdtemp(prefix="fleetbisect-imgbench-", dir=args.dir))
    failures: list[str] = []
    try:
        tree = work / "tree"
        data = fill(tree, args.data_mib << 20)
        raw = work / "image.raw"
        run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(raw), f"{args.virtual_mib}M"])
        shutil.rmtree(tree)
        qcow = work / "image.qcow2"
        run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)])
        allocated = raw.stat().st_blocks * 512
        print(f"image: ext4 of {args.virtual_mib} MiB holding {data / 2**20:.0f} MiB of files; "
              f"raw file {raw.stat().st_size / 2**20:.0f} MiB ({allocated / 2**20:.0f} MiB allocated), "
              f"qcow2 {qcow.stat().st_size / 2**20:.0f} MiB", flush=True)
        expected = {"raw": None, "qcow2": None}
        with LabHost.start(work / "host", name="bench-host") as host:
            remote = SSHRemote.connect(host.ssh_params(), deadline=Deadline.after(15))
            try:
                b = Bench(host, remote, work, virtual)
                for kind, src in (("raw", raw), ("qcow2", qcow)):
                    methods = b.methods(kind)
                    results: dict[str, list[tuple[dict, int | None]]] = {m: [] for m in methods}
                    for r in range(1, args.runs + 1):
                        for name, fn in methods.items():
                            clear(b.remote_dir)
                            phases, sent, disk = fn(src)
                            digest = sha256(Path(disk))
                            if expected[kind] is None:
                                expected[kind] = digest
                            elif digest != expected[kind]:
                                failures.append(f"{kind} via {name}: the disk on the host differs")
                            results[name].append((phases, sent))
                            print(f"  {kind} run {r}: {name:<14} {sum(phases.values()):7.2f}s "
                                  + " ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
                    table(kind, src, results)
            finally:
                remote.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for problem in failures:
        print(f"FAIL: {problem}")
    return 1 if failures else 0


def table(kind: str, src: Path, results: dict) -> None:
    size = src.stat().st_size
    med = {}
    for name, runs in results.items():
        phases = {k: statistics.median(p[k] for p, _ in runs) for k in runs[0][0]}
        med[name] = (statistics.median(sum(p.values()) for p, _ in runs), phases, runs[0][1])
    base = med["plain"][0]
    print(f"\n{kind} artifact ({size / 2**20:.0f} MiB file) -> raw disk on a loopback host, "
          f"median of {len(next(iter(results.values())))} runs")
    links = "".join(f" {'@' + n:>18}" for n in LINKS)
    print(f"{'method':<15} {'seconds':>8} {'vs plain':>9} {'MiB sent':>9}  {'phases (local/upload/host)':<28}{links}")
    modeled_base = {n: med["plain"][1]["local"] + med["plain"][1]["host"] + size / bps for n, bps in LINKS.items()}
    for name, (total, phases, sent) in med.items():
        shown = " / ".join(f"{v:.2f}" for v in phases.values())
        cols = ""
        for n, bps in LINKS.items():
            if sent is None:
                cols += f" {'-':>18}"
            else:
                t = phases["local"] + phases["host"] + sent / bps
                cols += f" {t:8.2f}s {modeled_base[n] / t:7.2f}x"
        sent_s = f"{sent / 2**20:9.1f}" if sent is not None else f"{'(stream)':>9}"
        print(f"{name:<15} {total:8.2f} {base / total:8.2f}x {sent_s}  {shown:<28}{cols}")
    print("(@link columns: measured local and host phases + bytes sent / link speed, and the ratio "
          "to plain at that speed; computed, not measured)")


if __name__ == "__main__":
    sys.exit(main())
