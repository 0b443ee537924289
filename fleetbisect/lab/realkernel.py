"""A real kernel tree for the lab: Debian's linux-source-6.1, with a short history on top.

    repo = ensure_real_repo()        # cached: ~/.cache/fleetbisect/lab/realkernel-v1-<version>/
    git clone --shared --no-checkout repo.path linux   # what a run bisects (cheap: shared objects)

The tree is the real source of `linux-source-6.1` (`/usr/src/linux-source-6.1.tar.xz`, installed
by .ci/setup), committed once as "Linux 6.1.N". On top of it, a history of HISTORY commits makes
small real C changes; two of them matter:
- "virtio_net: prepare the rx path for byte accounting" calls a function that does not exist:
  the build fails (the next commit fixes it), so the bisect must skip it;
- "virtio_net: account rx bytes against the NAPI budget" (`Seeded-regression: true`) makes
  receive_buf() drop every frame once the device has received RX_BUDGET_MB MiB: the guest's
  network stops after a few MB with no error, the field case's failure.

The kernel config (`lab.config` in the cache) is `tinyconfig` + `kvm_guest.config` + what the
lab guest needs (virtio-net, virtio-rng, initramfs, serial console, devtmpfs, multi-user, ...):
every driver the guest uses is built in, so the lab's initramfs boots it without modules. The
whole repository is built once per cache directory, in a temporary directory renamed into
place, under a lock (as lab/image.py does).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import InfraError
from .cpio import CpioWriter
from .image import LabAssets, build_once, cache_root
from .kernelrepo import _Git

RECIPE = "realkernel-v1"
PACKAGE = "linux-source-6.1"
SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
RX_BUDGET_MB = 4
CONFIG_ON = (
    "64BIT BLK_DEV_INITRD RD_GZIP KERNEL_GZIP DEVTMPFS DEVTMPFS_MOUNT TTY SERIAL_8250 SERIAL_8250_CONSOLE "
    "PRINTK EARLY_PRINTK BINFMT_ELF BINFMT_SCRIPT NET INET UNIX PACKET NETDEVICES NET_CORE ETHERNET "
    "PCI VIRTIO VIRTIO_PCI VIRTIO_NET HW_RANDOM HW_RANDOM_VIRTIO PROC_FS PROC_SYSCTL SYSFS SYSCTL TMPFS "
    "SHMEM MULTIUSER FUTEX EPOLL SIGNALFD TIMERFD EVENTFD POSIX_TIMERS FILE_LOCKING UNIX98_PTYS MAGIC_SYSRQ"
).split()
CONFIG_OFF = "LOCALVERSION_AUTO KERNEL_XZ IPV6 WIRELESS WLAN".split()
INITRD = ".fb-initramfs.img"  # in the tree, ignored by the kernel's .gitignore (`.*`)


@dataclass(frozen=True)
class RealRepo:
    path: Path
    config: Path  # the lab's kernel config
    shas: list[str]
    culprit: str
    broken: str  # the commit that does not compile
    version: str  # e.g. 6.1.192

    @property
    def good(self) -> str:
        return self.shas[0]

    @property
    def bad(self) -> str:
        return self.shas[-1]


def ensure_real_repo(cache_dir: Path | None = None) -> RealRepo:
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if not SOURCE.is_file():
        raise InfraError(f"the real-kernel lab needs {SOURCE}: apt-get install {PACKAGE} (.ci/setup does)")
    final = root / f"{RECIPE}-{_package_version()}"
    build_once(root, final, _make)
    return _load(final)


def _load(d: Path) -> RealRepo:
    g = _Git(d / "linux", 0)
    shas = g("rev-list", "--reverse", "HEAD").split()
    culprit = g("log", "--format=%H", "--grep=^Seeded-regression: true").split()
    broken = g("log", "--format=%H", "--grep=^Seeded-build-failure: true").split()
    version = (d / "version").read_text().strip()
    return RealRepo(d / "linux", d / "lab.config", shas, culprit[0], broken[0], version)


def _package_version() -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True)
    return proc.stdout.strip() or f"{SOURCE.stat().st_size}-{SOURCE.stat().st_mtime_ns}"


def _run(argv: list[str], cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InfraError(f"real-kernel lab: `{shlex.join(argv)}` failed: {(proc.stderr or proc.stdout)[-800:]}")
    return proc.stdout


def _make(d: Path) -> None:
    _run(["tar", "-xf", str(SOURCE)], cwd=d)
    (top,) = [p for p in d.iterdir() if p.is_dir()]
    tree = top.rename(d / "linux")
    version = _run(["make", "-s", "kernelversion"], cwd=tree).strip()
    (d / "version").write_text(version + "\n")
    ignore = tree / ".gitignore"  # Debian's tarball ignores its whole top level: upstream's again
    text = ignore.read_text()
    cut = text.find("# Debian packaging")
    if cut >= 0:
        ignore.write_text(text[:text.rfind("\n#\n", 0, cut) + 1])
    g = _Git(tree, 0)
    g("init", "-q", "-b", "master")
    g("config", "core.looseCompression", "1")  # 70k files: fast in, the run's clones share them
    g("config", "gc.auto", "0")  # no packing of 1 GB behind the lab's back (it would take the cores)
    g.commit(f"Linux {version}", body=f"Imported from Debian's {PACKAGE} ({_package_version()}).", all_files=True)
    _run(["make", "-s", "tinyconfig"], cwd=tree)
    _run(["make", "-s", "kvm_guest.config"], cwd=tree)
    argv = ["scripts/config"]
    for opt in CONFIG_ON:
        argv += ["-e", opt]
    for opt in CONFIG_OFF:
        argv += ["-d", opt]
    _run(argv, cwd=tree)
    _run(["make", "-s", "olddefconfig"], cwd=tree)
    shutil.copyfile(tree / ".config", d / "lab.config")
    _run(["git", "clean", "-fdxq"], cwd=tree)
    for subject, edit, body in HISTORY:
        edit(tree)
        g.commit(subject, body=body, all_files=True)


def _comment(rel: str, text: str):
    """An edit that adds a comment line under the file's first line (the SPDX tag)."""
    def edit(tree: Path) -> None:
        path = tree / rel
        first, rest = path.read_text().split("\n", 1)
        path.write_text(f"{first}\n/* {text} */\n{rest}")
    return edit


VIRTIO_NET = "drivers/net/virtio_net.c"
BROKEN = ("\nstatic int __maybe_unused virtnet_rx_account_prepare(void)\n"
          "{\n\treturn virtnet_rx_account_init();\n}\n")


def _break(tree: Path) -> None:
    path = tree / VIRTIO_NET
    path.write_text(path.read_text() + BROKEN)


def _fix(tree: Path) -> None:
    path = tree / VIRTIO_NET
    path.write_text(path.read_text().replace(BROKEN, ""))


def _regress(tree: Path) -> None:
    """receive_buf() drops every frame once RX_BUDGET_MB MiB came in: the link goes silent."""
    path = tree / VIRTIO_NET
    src = path.read_text()
    head = "static void receive_buf(struct virtnet_info *vi, struct receive_queue *rq,"
    check = "\tif (unlikely(!skb))\n\t\treturn;\n"
    start = src.index(head)
    at = src.index(check, start) + len(check)
    src = (src[:at] + "\n\t/* Account received bytes against the NAPI budget of the device. */\n"
           "\tif (unlikely(atomic64_add_return(skb->len, &virtnet_rx_budget_used) >\n"
           "\t\t     VIRTNET_RX_BUDGET_BYTES))\n\t\tgoto frame_err;\n" + src[at:])
    src = (src[:start] + f"#define VIRTNET_RX_BUDGET_BYTES ({RX_BUDGET_MB}ULL << 20)\n"
           "static atomic64_t virtnet_rx_budget_used = ATOMIC64_INIT(0);\n\n" + src[start:])
    path.write_text(src)


HISTORY = [
    ("virtio_net: document the mergeable buffer layout",
     _comment(VIRTIO_NET, "Mergeable buffers: header first, then data, one page fragment each."), ""),
    ("net: core: say why backlog drops are counted per cpu",
     _comment("net/core/dev.c", "Backlog drops are counted per cpu: no shared cache line."), ""),
    ("sched/core: clarify the wakeup ordering comment",
     _comment("kernel/sched/core.c", "Wakeups: the waker's store is ordered before the wakee's load."), ""),
    ("virtio_ring: explain the packed ring wrap counter",
     _comment("drivers/virtio/virtio_ring.c", "Packed ring: the wrap counter flips at each lap."), ""),
    ("virtio_net: prepare the rx path for byte accounting", _break,
     "Add the helper the rx byte accounting will use.\n\nSeeded-build-failure: true"),
    ("virtio_net: fix the build after the previous commit", _fix, "The helper is not needed yet."),
    ("mm/slob: note the page order of large allocations",
     _comment("mm/slob.c", "Large allocations go straight to the page allocator."), ""),
    ("x86/setup: spell out the e820 sanity check",
     _comment("arch/x86/kernel/setup.c", "The e820 map is sanitized before memblock sees it."), ""),
    ("virtio_net: account rx bytes against the NAPI budget", _regress,
     "Count the bytes each device receives so that busy queues yield earlier.\n\nSeeded-regression: true"),
    ("tcp: comment the retransmit timer backoff",
     _comment("net/ipv4/tcp_output.c", "The RTO backs off exponentially up to TCP_RTO_MAX."), ""),
    ("virtio_net: reword the short packet comment",
     _comment(VIRTIO_NET, "A packet shorter than the header and an ethernet header is dropped."), ""),
    ("fs/namei: comment the RCU walk fast path",
     _comment("fs/namei.c", "RCU walk first; ref walk only when it cannot go on."), ""),
    ("init/initramfs: note the unpack order",
     _comment("init/initramfs.c", "The built-in image is unpacked before the bootloader's."), ""),
    ("printk: explain the console lock handoff",
     _comment("kernel/printk/printk.c", "The console lock is handed to a waiter, never dropped in between."), ""),
]


# --- what a run of the real-kernel lab uses --------------------------------------------------------

def guest_initramfs(assets: LabAssets, dest: Path) -> Path:
    """The lab's initramfs for a kernel with virtio built in: the base image plus an overlay
    whose /init (a later cpio member replaces an earlier one) is the lab's without the loading
    of Debian's modules, which a kernel built here could not take."""
    from .image import _init

    init = "\n".join(ln for ln in _init().splitlines() if "insmod" not in ln) + "\n"
    overlay = CpioWriter()
    overlay.add_file("init", init.encode(), 0o755)
    tmp = dest.with_suffix(".overlay")
    overlay.write_gz(tmp)
    dest.write_bytes(assets.base_initramfs.read_bytes() + tmp.read_bytes())
    tmp.unlink()
    return dest


def write_playbook(path: Path, repo: RealRepo, initramfs: Path, *, ahead: int = 0, jobs: int = 2) -> Path:
    """The real-kernel lab's playbook: `make bzImage` from the lab config, the stamped release
    checked with `uname -r` in the guest, scp-stress across the budget."""
    data = {
        "name": "lab-real-kernel",
        "description": "a real 6.1 kernel whose virtio-net stops receiving after a few MB",
        "build": {
            "command": f"make -j{jobs} bzImage && cp {shlex.quote(str(initramfs))} {INITRD}",
            "config": str(repo.config),
            "timeout": "30m",
            "ahead": ahead,
            "ahead_min_free": "4G",
        },
        "artifacts": {"kernel": "arch/x86/boot/bzImage", "initrd": INITRD},
        "push": {"timeout": "2m"},
        "boot": {"cmdline": "console=ttyS0 panic=-1", "memory": 256, "cpus": 1, "timeout": "60s"},
        "verify": {"command": "uname -r"},
        "reproducer": {"kind": "scp-stress", "size": "1M", "iterations": 3 * RX_BUDGET_MB, "timeout": "8s"},
        "policy": {"retries": 2},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def clone(repo: RealRepo, dest: Path) -> Path:
    """A repository to bisect that shares the cached one's objects (no checkout: runs add their
    own worktrees)."""
    _run(["git", "clone", "-q", "--shared", "--no-checkout", str(repo.path), str(dest)], cwd=dest.parent)
    return dest


def demo(base: Path, ui, *, ahead: int = 0) -> int:
    """`fleetbisect demo --real-kernel`: bisect the real-kernel lab end to end on a loopback VM
    host, and check the culprit and that every guest ran the kernel its step built."""
    from ..config.inventory import load_inventory
    from ..config.playbook import load_playbook
    from ..errors import UserError
    from ..report import answer_line
    from ..run import start_run
    from ..stages.build import localversion
    from .demo import write_lab_inventory
    from .image import ensure_assets
    from .vmhost import LabHost

    base = base.resolve()
    if (base / "linux").exists() or (base / "run").exists():
        raise UserError(f"{base} already holds a demo: pass a new --dir (or none for a fresh one)")
    base.mkdir(parents=True, exist_ok=True)
    ui.step("lab: preparing the guest initramfs (cached after the first time)")
    assets = ensure_assets()
    ui.step(f"lab: a git repository of Debian's {PACKAGE} with a seeded regression (made once, cached)")
    repo = ensure_real_repo()
    src = clone(repo, base / "linux")
    playbook_path = write_playbook(base / "playbook.yaml", repo, guest_initramfs(assets, base / "initramfs.img"),
                                   ahead=ahead)
    with LabHost.start(base / "host", name="lab-host") as host:
        ui.step(f"lab: VM host lab-host is sshd on 127.0.0.1:{host.port}; the first build of the "
                "kernel takes minutes, the next ones seconds")
        inventory = write_lab_inventory(base / "inventory.yaml", [host], assets)
        report = start_run(repo=src, good=repo.good, bad=repo.bad, host=load_inventory([inventory]).host("lab-host"),
                           inventory=[inventory], playbook=load_playbook(playbook_path),
                           playbook_path=playbook_path, run_dir=base / "run", ui=ui)
    found = report.status == "found" and report.culprit == repo.culprit
    booted = [s for s in report.steps if s.verdict.value in ("good", "bad")]
    stamped = bool(booted) and all(s.release == f"{repo.version}{localversion(s.commit)}" for s in booted)
    if found:
        ui.good(f"found the seeded regression in {len(report.steps)} steps: {report.culprit[:12]} "
                f"{report.culprit_subject}")
    else:
        ui.error(f"expected the seeded regression {repo.culprit[:12]}, the run says: {report.message}")
    if stamped:
        ui.good(f"every tested guest ran the kernel its step built ({repo.version}-fb<commit>, checked with uname -r)")
    else:
        ui.error("a tested step has no stamped release of its own")
    print(f"run directory: {report.run_dir}")
    print(answer_line(report.status, report.culprit, report.culprit_subject, report.message))
    return 0 if found and stamped else 1
