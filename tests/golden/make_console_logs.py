#!/usr/bin/env python3
"""Produce the REAL serial-console golden logs in tests/golden/console/ with QEMU (TCG).

Not part of the test run: the unit tests only read the files this script wrote. Run it by hand
when the classifier needs new real material. It needs apt-get (download only), dpkg-deb,
cpio, busybox-static and qemu-system-x86_64; network access only to the Debian archive.

    .venv/bin/python tests/golden/make_console_logs.py [--work DIR] [--only NAME ...]
    .venv/bin/python tests/golden/make_console_logs.py --module   # + the cases needing fbcrash.ko
    FLEETBISECT_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_console.py -k golden

It fetches Debian's cloud kernel (the package `linux-image-cloud-amd64` depends on) into a
work directory (`apt-get download`, `dpkg -x`), builds one tiny busybox initramfs per case with
the system `cpio -o -H newc`, boots it with `-accel tcg` (no KVM: it is broken on these
machines), waits for the case's stop condition or timeout, and always kills QEMU by its PID.
The middle of the boot (driver chatter) is dropped from each log to keep the files small; what
is kept is byte for byte what QEMU wrote (`\\r\\n` line ends and SeaBIOS escape codes included).

Userspace alone gives: a panic without an initramfs, a sysrq crash, init exiting, a clean boot
(quiet and verbose), a panic=1 reboot loop, and a real hung task (a FUSE mount nobody serves).
`--module` builds `fbcrash.ko`, a tiny out-of-tree module (gcc plus the matching linux-headers
and linux-kbuild packages, also fetched with `apt-get download`), for a real soft lockup, RCU
stall, WARNING, kernel BUG, general protection fault, NULL dereference and oops-then-panic.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository, for fleetbisect.console
OUT = HERE / "console"

BANNER = re.compile(rb"Linux version \d")
END_PANIC = re.compile(rb"---\[ end Kernel panic")


@dataclass
class Case:
    name: str
    init: str | None  # /init shell script; None: no initramfs at all
    stop: re.Pattern | None = END_PANIC  # stop QEMU when the console matches; None: wait for exit
    stop_count: int = 1  # ... this many times
    append: str = ""
    reboot: bool = False  # drop -no-reboot so that a panic=N reboot boots again
    timeout: float = 60.0
    module: bool = False  # needs fbcrash.ko in the initramfs
    smp: int = 1
    trim: bool = True  # drop the middle of the boot (see trim())
    grace: float = 0.5  # keep reading this long after the stop condition


PRELUDE = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
"""

CASES = [
    Case("panic-no-rootfs", init=None),
    Case("init-exit", init=PRELUDE + "echo 'init: giving up'\nexit 3\n"),
    Case(
        "sysrq-crash",
        init=PRELUDE + "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 100\n",
    ),
    Case(
        "clean-boot",
        init=PRELUDE + 'echo "FLEETBISECT-READY $(uname -r)" > /dev/ttyS0\npoweroff -f\n',
        stop=None,
        append="quiet",
    ),
    # The whole of a normal verbose boot, untrimmed: the guard against false positives.
    Case(
        "clean-boot-verbose",
        init=PRELUDE + 'echo "FLEETBISECT-READY $(uname -r)" > /dev/ttyS0\npoweroff -f\n',
        stop=None,
        trim=False,
    ),
    Case(
        "reboot-loop",
        init=PRELUDE + "echo 'init: giving up'\nexit 1\n",
        stop=BANNER,
        stop_count=2,
        append="panic=1",
        reboot=True,
        grace=1.0,
    ),
    # A task in D state: a FUSE mount whose daemon never answers. `ls` waits for the answer
    # (killable: the hung-task detector ignores it) while holding the directory lock; `mkdir`
    # then blocks on that lock uninterruptibly, which the detector reports after 2 s.
    Case(
        "hung-task",
        init=PRELUDE
        + "insmod /fuse.ko\n"
        + "mkdir -p /mnt\n"
        + "exec 3<>/dev/fuse\n"
        + "mount -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 fuse /mnt\n"
        + "echo 2 > /proc/sys/kernel/hung_task_timeout_secs\n"
        + "ls /mnt/x &\nsleep 1\nmkdir /mnt/y &\n"
        + "sleep 100\n",
        stop=re.compile(rb"blocked for more than.*\n(?:.*\n){5,}?.*</TASK>"),
        timeout=60.0,
        grace=1.0,
    ),
    # Cases that need the test module (--module).
    Case(
        "soft-lockup",
        init=PRELUDE
        + "echo 1 > /proc/sys/kernel/watchdog_thresh\n"
        + "insmod /fbcrash.ko mode=spin seconds=8\nsleep 100\n",
        stop=re.compile(rb"fbcrash: done"),
        module=True,
        timeout=120.0,
    ),
    Case(
        "rcu-stall",
        init=PRELUDE
        + "echo 3 > /sys/module/rcupdate/parameters/rcu_cpu_stall_timeout\n"
        + "echo 0 > /proc/sys/kernel/soft_watchdog\n"
        + "insmod /fbcrash.ko mode=stall seconds=8\nsleep 100\n",
        stop=re.compile(rb"fbcrash: grace period over"),
        module=True,
        smp=2,  # the grace-period kthread runs on the other CPU while CPU 0 spins
        timeout=120.0,
    ),
    Case(
        "gpf",
        init=PRELUDE + "insmod /fbcrash.ko mode=gpf\necho 'init: still alive'\nsleep 100\n",
        stop=re.compile(rb"init: still alive"),
        module=True,
    ),
    Case(
        "kernel-bug",
        init=PRELUDE + "insmod /fbcrash.ko mode=bug\necho 'init: still alive'\nsleep 100\n",
        stop=re.compile(rb"init: still alive"),
        module=True,
    ),
    Case(
        "warning",
        init=PRELUDE + "insmod /fbcrash.ko mode=warn\necho 'init: still alive'\nsleep 100\n",
        stop=re.compile(rb"init: still alive"),
        module=True,
    ),
    Case(
        "null-deref",
        init=PRELUDE + "insmod /fbcrash.ko mode=null\necho 'init: still alive'\nsleep 100\n",
        stop=re.compile(rb"init: still alive"),
        module=True,
    ),
    Case(
        "oops-then-panic",
        init=PRELUDE
        + "echo 1 > /proc/sys/kernel/panic_on_oops\n"
        + "insmod /fbcrash.ko mode=null\nsleep 100\n",
        module=True,
    ),
]

MODULE_C = r"""
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/bug.h>
#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/poison.h>
#include <linux/preempt.h>
#include <linux/rcupdate.h>

static char *mode = "warn";
module_param(mode, charp, 0);
static int seconds = 5;
module_param(seconds, int, 0);

struct fbcrash_ring { int *slots; int head; };
struct fbcrash_node { struct fbcrash_node *next; int v; };

static struct rcu_head fbcrash_rcu;

static void fbcrash_rcu_cb(struct rcu_head *head)
{
	pr_info("fbcrash: grace period over\n");
}

static noinline void fbcrash_spin(int secs)
{
	unsigned long end = jiffies + secs * HZ;

	preempt_disable();
	while (time_before(jiffies, end))
		cpu_relax();
	preempt_enable();
}

static noinline int fbcrash_ring_push(struct fbcrash_ring *ring, int v)
{
	ring->slots[ring->head] = v;
	return ++ring->head;
}

static noinline int fbcrash_list_sum(struct fbcrash_node *n)
{
	int sum = 0;

	for (; n; n = n->next)
		sum += n->v;
	return sum;
}

static noinline void fbcrash_check_state(int state)
{
	WARN_ON(state != 0);
}

static noinline void fbcrash_must_be_zero(int state)
{
	BUG_ON(state != 0);
}

static int __init fbcrash_init(void)
{
	static struct fbcrash_ring *volatile ring;
	static struct fbcrash_node node = { .next = LIST_POISON1, .v = 1 };

	if (!strcmp(mode, "spin")) {
		fbcrash_spin(seconds);
	} else if (!strcmp(mode, "stall")) {
		call_rcu(&fbcrash_rcu, fbcrash_rcu_cb);
		fbcrash_spin(seconds);
	} else if (!strcmp(mode, "warn")) {
		fbcrash_check_state(seconds);
	} else if (!strcmp(mode, "null")) {
		fbcrash_ring_push(ring, seconds);
	} else if (!strcmp(mode, "gpf")) {
		pr_info("fbcrash: sum %d\n", fbcrash_list_sum(&node));
	} else if (!strcmp(mode, "bug")) {
		fbcrash_must_be_zero(seconds);
	}
	pr_info("fbcrash: done\n");
	return 0;
}

static void __exit fbcrash_exit(void) {}

module_init(fbcrash_init);
module_exit(fbcrash_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("fleetbisect console golden-log generator");
"""


def sh(*argv: str, cwd: Path | None = None) -> None:
    subprocess.run(argv, check=True, cwd=cwd)


def fetch(work: Path, package: str) -> Path:
    """apt-get download + dpkg -x into work/root; returns the .deb path."""
    debs = list(work.glob(f"{package}_*.deb"))
    if not debs:
        sh("apt-get", "download", package, cwd=work)
        debs = list(work.glob(f"{package}_*.deb"))
    sh("dpkg", "-x", str(debs[0]), str(work / "root"))
    return debs[0]


def kernel_package() -> str:
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"], check=True, capture_output=True, text=True
    ).stdout
    m = re.search(r"Depends: (linux-image-[\w.-]+-cloud-amd64)", out)
    if not m:
        raise SystemExit("cannot find the kernel package linux-image-cloud-amd64 depends on")
    return m.group(1)


def prepare_kernel(work: Path) -> tuple[Path, str]:
    pkg = kernel_package()
    kver = pkg.removeprefix("linux-image-")
    vmlinuz = work / "root" / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.exists():
        fetch(work, pkg)
    return vmlinuz, kver


def build_module(work: Path, kver: str) -> Path:
    ko = work / "mod" / "fbcrash.ko"
    if ko.exists():
        return ko
    common = kver.removesuffix("-cloud-amd64") + "-common"
    major = ".".join(kver.split(".")[:2])
    for pkg in (f"linux-headers-{kver}", f"linux-headers-{common}", f"linux-kbuild-{major}"):
        fetch(work, pkg)
    root = work / "root"
    kdir = root / "usr" / "src" / f"linux-headers-{kver}"
    # The arch headers' Makefile includes the common one by absolute path (/usr/src/...):
    # point it into our unpacked tree (the other links in the packages are relative).
    (kdir / "Makefile").write_text(f"include {root}/usr/src/linux-headers-{common}/Makefile\n")
    mod = work / "mod"
    mod.mkdir(exist_ok=True)
    (mod / "fbcrash.c").write_text(MODULE_C)
    (mod / "Makefile").write_text("obj-m := fbcrash.o\n")
    sh("make", "-C", str(kdir), f"M={mod}", "modules")
    return ko


def build_initrd(work: Path, case: Case, kver: str, module: Path | None) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=work))
    for d in ("bin", "proc", "sys", "dev", "mnt", "tmp"):
        (stage / d).mkdir()
    shutil.copy("/bin/busybox", stage / "bin" / "busybox")
    (stage / "bin" / "sh").symlink_to("busybox")
    init = stage / "init"
    init.write_text(case.init or "")
    init.chmod(0o755)
    fuse = next((work / "root" / "lib" / "modules" / kver).rglob("fuse.ko"), None)  # hung-task
    if fuse is not None:
        shutil.copy(fuse, stage / "fuse.ko")
    if module is not None:
        shutil.copy(module, stage / "fbcrash.ko")
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=stage, check=True, capture_output=True
    ).stdout
    cpio = work / f"{case.name}.cpio"
    with open(cpio, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=names, stdout=f, check=True)
    shutil.rmtree(stage)
    return cpio


def run_qemu(work: Path, case: Case, vmlinuz: Path, initrd: Path | None) -> bytes:
    serial = work / f"{case.name}.serial"
    serial.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", str(case.smp),
        "-nographic", "-monitor", "none", "-serial", f"file:{serial}", "-net", "none",
        "-kernel", str(vmlinuz),
        "-append", f"console=ttyS0 {case.append}".strip(),
    ]  # fmt: skip
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    if not case.reboot:
        argv.append("-no-reboot")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + case.timeout
        stopped_at = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                break
            data = serial.read_bytes() if serial.exists() else b""
            if stopped_at is None and case.stop is not None and len(case.stop.findall(data)) >= case.stop_count:
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at >= case.grace:
                break
            time.sleep(0.1)
        else:
            print(f"  {case.name}: timed out after {case.timeout:.0f} s", file=sys.stderr)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return serial.read_bytes()


def trim(raw: bytes, head: int = 25, before: int = 12) -> bytes:
    """Drop the middle of the boot: keep `head` lines, everything from `before` lines ahead of
    the first report the classifier finds to a few lines after the last one, the last `before`
    lines, and the head of any later boot (a reboot loop). The lines in between are simply gone,
    as if the console had lost them; the kept ones are byte for byte what QEMU wrote."""
    from fleetbisect.console import banners, classify

    text = raw.decode("utf-8", "replace")
    lines = raw.split(b"\n")
    findings = classify(text)
    keep = set(range(min(head, len(lines))))
    if findings:
        last = max(f.end for f in findings if f.kind != "reset")
        keep.update(range(max(0, findings[0].line - 1 - before), min(len(lines), last + 5)))
    keep.update(range(max(0, len(lines) - before), len(lines)))
    for line, _ in banners(text)[1:]:
        keep.update(range(max(0, line - 4), min(len(lines), line - 1 + head)))
    return b"\n".join(lines[i] for i in sorted(keep))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work directory (kept); default: a temporary one")
    ap.add_argument("--only", nargs="*", help="case names")
    ap.add_argument("--module", action="store_true", help="also the cases that need fbcrash.ko")
    ap.add_argument("--raw", action="store_true", help="do not trim the logs")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the logs go (default {OUT})")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fb-console-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        generate(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def generate(args: argparse.Namespace, work: Path) -> None:
    vmlinuz, kver = prepare_kernel(work)
    module = build_module(work, kver) if args.module else None
    args.out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        if case.module and module is None:
            continue
        print(f"{case.name}: booting {kver}", file=sys.stderr)
        initrd = None if case.init is None else build_initrd(work, case, kver, module if case.module else None)
        raw = run_qemu(work, case, vmlinuz, initrd)
        data = raw if args.raw or not case.trim else trim(raw)
        (args.out / f"{case.name}.log").write_bytes(data)
        print(f"  {len(raw)} bytes -> {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
