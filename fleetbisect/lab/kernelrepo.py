"""A generated "kernel" git repository with one seeded regression.

    repo = generate_repo(Path("/tmp/linux"), ensure_assets(), commits=210, seed=7)
    git log --grep 'Seeded-regression: true'    # the commit a bisect must find

Every commit builds with `make olddefconfig && make -j2` into what a kernel build leaves:
`arch/x86/boot/bzImage` (the real Debian cloud kernel, committed once), `initramfs.img` (the
lab's base initramfs plus a cpio of this commit's `overlay/`) and
`include/config/kernel.release` (`6.1.0-lab$(LOCALVERSION)`, also written into the guest as
/etc/fleetbisect/release, which is how the ready stage proves the guest runs this very build,
since every commit boots the same Debian kernel).

Since the kernel binary is the same everywhere, a regression lives in the overlay: an init hook
the guest runs at boot. From the culprit on, depending on the scenario:

- net-hang:     a watcher downs eth0 once the guest has received `net_budget_mb` MiB: transfers
                stall with no error, the field's failure.
- panic:        the guest crashes itself through sysrq at boot: a kernel panic on the console.
- oops-warning: a kernel WARNING (with its cut-here block and call trace) lands in the kernel
                log, found by the `dmesg` reproducer.
- boot-slow:    the guest comes up seconds later (a probe waits at boot), caught by `boot-time`.
- console:      the init-as-reproducer prints FAIL instead of PASS on the console.
- flaky:        net-hang, but only on some boots: at boot the guest draws a byte from
                /dev/urandom and arms the watcher with probability `flaky_p` (0.5), as in the
                field, where some boots of a bad kernel hang and others never do.

Extra seeded commits make a real bisect's life harder, as real trees do: a commit whose build
fails (fixed by the next one) and one whose guest boots without an SSH server.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .image import LabAssets

SCENARIOS = ("net-hang", "panic", "oops-warning", "boot-slow", "console", "flaky")

MAKEFILE = r"""# The fleetbisect lab's "kernel". `make olddefconfig && make -j2`, with LOCALVERSION set.
RELEASE := 6.1.0-lab$(LOCALVERSION)
SOURCES := $(shell find arch drivers fs include kernel mm net -name '*.[ch]' | LC_ALL=C sort)

.PHONY: all olddefconfig compile FORCE
all: compile arch/x86/boot/bzImage include/config/kernel.release initramfs.img

olddefconfig:
    @cp lab/defconfig .config
    @echo "  CONFIG  .config"

# "Compiling": a source with an #error line fails the build, like a real one.
compile: .config
    @for f in $(SOURCES); do \
      if grep -n '^#error' "$$f" >/dev/null; then \
        line=$$(grep -n '^#error' "$$f" | head -1 | cut -d: -f1); \
        echo "$$f:$$line:2: error: $$(sed -n "$${line}p" "$$f" | cut -c8-)" >&2; exit 1; \
      fi; \
    done
    @echo "  CC      $(words $(SOURCES)) files"

.config:
    @echo "no .config: run make olddefconfig first" >&2; exit 1

arch/x86/boot/bzImage: lab/bzImage
    @mkdir -p $(@D) && cp $< $@
    @echo "  BUILD   $@"

include/config/kernel.release: FORCE
    @mkdir -p $(@D) && echo "$(RELEASE)" > $@.tmp && mv $@.tmp $@

initramfs.img: FORCE
    @rm -rf .overlay && mkdir .overlay && cp -a overlay/. .overlay/
    @mkdir -p .overlay/etc/fleetbisect && echo "$(RELEASE)" > .overlay/etc/fleetbisect/release
    @cd .overlay && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -n > ../.overlay.cpio.gz
    @cat lab/base-initramfs.img .overlay.cpio.gz > $@.tmp && mv $@.tmp $@
    @rm -rf .overlay .overlay.cpio.gz
    @echo "  GEN     $@ ($(RELEASE))"
"""

GITIGNORE = """\
.config
arch/x86/boot/bzImage
include/config/
initramfs.img
initramfs.img.tmp
.overlay/
.overlay.cpio.gz
"""

SUBSYSTEMS = {
    "net": ["net/core/dev.c", "net/core/skbuff.c", "net/ipv4/tcp_output.c", "include/linux/skbuff.h"],
    "virtio_net": ["drivers/net/virtio_net.c"],
    "virtio": ["drivers/virtio/virtio_ring.c"],
    "mm": ["mm/page_alloc.c", "mm/slub.c"],
    "ext4": ["fs/ext4/inode.c"],
    "sched": ["kernel/sched/core.c", "kernel/sched/fair.c"],
    "x86": ["arch/x86/kernel/setup.c"],
}
VERBS = ["tidy up", "fix a race in", "simplify", "rework", "document", "avoid a warning in",
         "speed up", "annotate", "clean up", "refactor", "correct the locking in", "drop a check in"]
THINGS = ["queue accounting", "the rx path", "error handling", "the refill logic", "stats updates",
          "the fast path", "buffer recycling", "napi polling", "the tx timeout", "page pinning"]

NETBUDGET_HOOK = """#!/bin/sh
# virtio_net: rx budget accounting (seeded regression: the link dies after {mb} MiB)
limit=$(({mb} * 1024 * 1024))
(
  while :; do
    rx=$(cat /sys/class/net/eth0/statistics/rx_bytes 2>/dev/null || echo 0)
    if [ "$rx" -gt "$limit" ]; then ip link set eth0 down; exit 0; fi
    usleep 100000
  done
) &
"""

FLAKY_GATE = """#!/bin/sh
# virtio_net: rx budget accounting, raced against the refill worker (seeded regression: the link
# dies after {mb} MiB, on some boots only; decided here, once per boot)
draw=$(od -An -N1 -tu1 /dev/urandom | tr -d ' ')
[ "$draw" -lt {threshold} ] || exit 0
echo "rx budget armed (draw $draw)" > /dev/kmsg
"""

PANIC_HOOK = """#!/bin/sh
# virtio_net: probe cleanup (seeded regression: the kernel crashes at boot)
echo 1 > /proc/sys/kernel/sysrq
echo c > /proc/sysrq-trigger
"""

WARNING_HOOK = r"""#!/bin/sh
# virtio_net: tx queue watchdog (seeded regression: a kernel WARNING at boot)
w() { echo "<4>$*" > /dev/kmsg; }
w "------------[ cut here ]------------"
w "NETDEV WATCHDOG: eth0 (virtio_net): transmit queue 0 timed out"
w "WARNING: CPU: 0 PID: 0 at net/sched/sch_generic.c:525 dev_watchdog+0x20f/0x250"
w "Modules linked in: virtio_net net_failover failover virtio_pci"
w "CPU: 0 PID: 0 Comm: swapper/0 Not tainted $(uname -r) #1"
w "RIP: 0010:dev_watchdog+0x20f/0x250"
w "Call Trace:"
w " <IRQ>"
w " call_timer_fn+0x27/0x130"
w " __run_timers+0x226/0x2b0"
w " run_timer_softirq+0x2a/0x50"
w " </IRQ>"
w "---[ end trace 0000000000000000 ]---"
"""

CONSOLE_HOOK = """#!/bin/sh
# init as the reproducer: run the test, say PASS or FAIL on the console, power off
echo "FLEETBISECT-READY release=$(cat /etc/fleetbisect/release) uname=$(uname -r)" > /dev/ttyS0
if [ -e /etc/fleetbisect/regressed ]; then
  echo "repro: checksum mismatch after 3 rounds" > /dev/ttyS0
  echo "FLEETBISECT-RESULT: FAIL" > /dev/ttyS0
else
  echo "FLEETBISECT-RESULT: PASS" > /dev/ttyS0
fi
sync
poweroff -f
"""

SLOW_HOOK = """#!/bin/sh
# virtio_net: wait for link negotiation at probe (seeded regression: boot takes {seconds}s longer)
sleep {seconds}
"""
SLOW_SECONDS = 6


@dataclass
class LabRepo:
    path: Path
    good: str
    bad: str
    culprit: str
    shas: list[str] = field(default_factory=list)
    scenario: str = "net-hang"


def generate_repo(
    path: Path,
    assets: LabAssets,
    *,
    commits: int = 210,
    seed: int = 0,
    culprit: int | None = None,
    net_budget_mb: int = 4,
    build_fails: list[int] | None = None,
    no_ssh: list[int] | None = None,
    scenario: str = "net-hang",
    flaky_p: float = 0.5,
) -> LabRepo:
    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r} (valid: {', '.join(SCENARIOS)})")
    if commits < 8:
        raise UserError("a lab repo needs at least 8 commits")
    rng = random.Random(seed)
    if culprit is None:
        culprit = rng.randrange(commits * 3 // 10, commits * 8 // 10)
    if not 0 < culprit < commits - 1:
        raise ValueError("the culprit must be strictly inside the range")
    # Away from the culprit, so that skipping them never leaves the answer ambiguous.
    far = [i for i in range(2, commits - 2) if abs(i - culprit) > 3]
    if build_fails is None:
        build_fails = [rng.choice(far)] if far else []
    if no_ssh is None:
        spare = [i for i in far if all(abs(i - b) > 1 for b in build_fails)]
        no_ssh = [rng.choice(spare)] if spare else []
    # The ends must build and boot (they are what the bisect is told is good and bad), and the
    # culprit must be testable.
    for name, seeded in (("build_fails", build_fails), ("no_ssh", no_ssh)):
        if any(not 0 < i < commits - 1 or i == culprit for i in seeded):
            raise ValueError(f"{name} must name commits strictly inside the range, other than the culprit")

    path = Path(path)
    path.mkdir(parents=True)
    g = _Git(path, seed)
    g("init", "-q", "-b", "master")

    # Commit 0: the tree, the kernel binary and the base initramfs.
    (path / "lab").mkdir()
    (path / "lab" / "bzImage").write_bytes(assets.kernel.read_bytes())
    (path / "lab" / "base-initramfs.img").write_bytes(assets.base_initramfs.read_bytes())
    (path / "lab" / "defconfig").write_text("CONFIG_VIRTIO_NET=m\nCONFIG_LOCALVERSION_AUTO=n\n")
    (path / "Makefile").write_text(re.sub(r"^    ", "\t", MAKEFILE, flags=re.MULTILINE))  # recipes: tabs
    (path / ".gitignore").write_text(GITIGNORE)
    (path / "overlay" / "etc" / "fleetbisect" / "init.d").mkdir(parents=True)
    (path / "overlay" / "README").write_text("Files copied into the guest's initramfs over the base image.\n")
    sources = sorted({f for files in SUBSYSTEMS.values() for f in files})
    for src in sources:
        f = path / src
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"// SPDX-License-Identifier: GPL-2.0\n/* {src}: fleetbisect lab source */\n\n")
    hooks = path / "overlay" / "etc" / "fleetbisect" / "init.d"
    if scenario == "console":  # init is the reproducer from the start; the culprit flips its answer
        _hook(hooks / "10-repro", CONSOLE_HOOK)
    g.commit("Linux 6.1-lab: initial import", all_files=True)

    broken: Path | None = None
    for i in range(1, commits):
        subsystem = rng.choice(sorted(SUBSYSTEMS))
        src = path / rng.choice(SUBSYSTEMS[subsystem])
        subject = f"{subsystem}: {rng.choice(VERBS)} {rng.choice(THINGS)}"
        body = ""
        with open(src, "a") as f:
            f.write(f"static int fb_lab_{i}(void) {{ return {rng.randrange(1 << 16)}; }}\n")
        if broken is not None:  # the commit after a broken build fixes it
            broken.write_text(broken.read_text().replace("#error ", "// fixed: "))
            subject = f"{subsystem}: fix the build after the previous commit"
            broken = None
        if i in build_fails:
            src.write_text(src.read_text() + "#error implicit declaration of function 'fb_lab_helper'\n")
            broken = src
        no_ssh_file = path / "overlay" / "etc" / "fleetbisect" / "no-ssh"
        no_ssh_file.unlink(missing_ok=True)
        if i in no_ssh:
            no_ssh_file.write_text("seeded: this build's guest starts no SSH server\n")
            subject = f"{subsystem}: rework service startup ordering"
        if i == culprit:
            subject, body = _seed(scenario, path, hooks, net_budget_mb, subsystem, flaky_p)
        g.commit(subject, body=body, all_files=True)
    shas = g("rev-list", "--reverse", "HEAD").split()
    return LabRepo(path, shas[0], shas[-1], shas[culprit], shas, scenario)


def _seed(scenario: str, path: Path, hooks: Path, net_budget_mb: int, subsystem: str,
          flaky_p: float = 0.5) -> tuple[str, str]:
    """Plant the regression; returns (subject, body) of the culprit commit."""
    trailer = "\n\nSeeded-regression: true\n"
    if scenario == "flaky":  # the net-hang watcher, behind a draw made once per boot
        watcher = NETBUDGET_HOOK.format(mb=net_budget_mb).split("\n", 2)[2]
        _hook(hooks / "50-netbudget", FLAKY_GATE.format(mb=net_budget_mb, threshold=round(256 * flaky_p)) + watcher)
        return ("virtio_net: account rx bytes from the refill worker too",
                "Let the refill worker charge the NAPI budget; it races with the poll loop." + trailer)
    if scenario == "net-hang":
        _hook(hooks / "50-netbudget", NETBUDGET_HOOK.format(mb=net_budget_mb))
        return ("virtio_net: account rx bytes against the NAPI budget",
                "Count received bytes per queue so that busy queues yield earlier." + trailer)
    if scenario == "panic":
        _hook(hooks / "50-probe-cleanup", PANIC_HOOK)
        return ("virtio_net: free the rx queues earlier on probe",
                "Release the queues as soon as probing is done." + trailer)
    if scenario == "oops-warning":
        _hook(hooks / "50-tx-watchdog", WARNING_HOOK)
        return ("net: sched: arm the tx watchdog before the queue starts",
                "Start the watchdog timer as soon as the device is registered." + trailer)
    if scenario == "boot-slow":
        _hook(hooks / "50-link-wait", SLOW_HOOK.format(seconds=SLOW_SECONDS))
        return ("virtio_net: wait for link negotiation before registering",
                "Some switches take a while to negotiate; do not register a dead link." + trailer)
    if scenario == "console":
        (path / "overlay" / "etc" / "fleetbisect" / "regressed").write_text("seeded\n")
        return ("mm: reuse freed pages before they are zeroed",
                "Skip the zeroing pass on the hot path." + trailer)
    raise AssertionError(scenario)


def _hook(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class _Git:
    """git with a fixed identity and dates derived from the seed: the same seed, the same repo."""

    def __init__(self, path: Path, seed: int):
        self.path = path
        self.when = 1_700_000_000 + (seed % 1000) * 86_400
        self.env = dict(os.environ, GIT_AUTHOR_NAME="Lab Developer", GIT_AUTHOR_EMAIL="dev@lab.invalid",
                        GIT_COMMITTER_NAME="Lab Maintainer", GIT_COMMITTER_EMAIL="maint@lab.invalid",
                        GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(["git", "-C", str(self.path), *args], env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def commit(self, subject: str, *, body: str = "", all_files: bool = False) -> None:
        self.when += 3600
        if all_files:
            self("add", "-A")
        env_date = f"{self.when} +0000"
        self.env.update(GIT_AUTHOR_DATE=env_date, GIT_COMMITTER_DATE=env_date)
        message = subject + ("\n\n" + body.strip() + "\n" if body else "\n")
        self("commit", "-q", "--allow-empty", "--no-verify", "-m", message)
