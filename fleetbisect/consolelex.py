"""Console lexing for console.py: a raw serial console cut into lines (ANSI and control
characters gone, the printk timestamp and level split off), the markers that start a kernel
report (panic, oops, BUG, WARNING, lockups, sanitizers...), and the lines that still belong to
a report's body. console.py reads reports out of these; nothing here decides an outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Lines: clean, split off the timestamp
# ---------------------------------------------------------------------------------------------

ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte (colours, clear screen, ?7l)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL/ST
    r"|\x1b[()*+][0-9A-Za-z]"  # charset designation
    r"|\x1b[@-Z\\-_]"  # two-byte escapes (ESC c: reset)
    r"|\x1b"  # a lone ESC
)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# printk timestamp, optional caller id ([    T1] / [    C0]), optional syslog level <N>.
TIMESTAMP = re.compile(r"\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s?")
LEVEL = re.compile(r"^<\d>")
SYSLOG = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: ")


def clean(raw: str) -> str:
    return CONTROL.sub("", ANSI.sub("", raw.rstrip("\r")))


def split(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass(frozen=True)
class Line:
    text: str  # cleaned line, timestamp kept (what goes into excerpts)
    msg: str  # the kernel message: after the timestamp, indentation kept (one space eaten)
    ts: bool  # a printk timestamp was found on the line

    @property
    def head(self) -> str:
        return self.msg.strip()


def parse(raw: str) -> Line:
    text = clean(raw)
    m = TIMESTAMP.search(text)
    if m:
        msg = text[m.end():]
        ts = True
    else:
        msg = SYSLOG.sub("", LEVEL.sub("", text))
        ts = False
    return Line(text, msg, ts)


# ---------------------------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------------------------

CUT_HERE = re.compile(r"^-+\[ cut here \]-+")
END_TRACE = re.compile(r"^-+\[ end trace [0-9a-f]* ?\]-+")
END_PANIC = re.compile(r"^-+\[ end Kernel panic")
PANIC = re.compile(r"^Kernel panic - not syncing:?\s?(.*)$")
SOFT = re.compile(r"^(?:(?:NMI )?watchdog: )?BUG: soft lockup - (CPU#\d+ stuck for \d+s!)")
HARD = re.compile(r"^(?:(?:NMI )?watchdog: )?Watchdog detected hard LOCKUP on cpu \d+")
RCU = re.compile(
    r"^(?:rcu: )?INFO: (rcu_\w+|rcu\w*) ((?:self-)?detected (?:expedited )?stalls? on [\w/ ]+?)\s*[:.]?\s*$"
)
HUNG = re.compile(r"^INFO: task (.+):(\d+) blocked for more than (\d+) seconds")
WQ_LOCKUP = re.compile(r"^BUG: workqueue lockup")
WARNING = re.compile(r"^WARNING: ")
WARN_CPU = re.compile(
    r"^WARNING: (?:CPU: \d+ PID: \d+ )?at (\S+?)(?::\d+)?\s+(?:\[<[0-9a-f]+>\]\s*)?(?:([A-Za-z_][\w.]*)(?:\+0x|\(\)))?"
)
UBSAN = re.compile(r"^UBSAN: ([\w-]+)")
KERNEL_BUG = re.compile(r"^kernel BUG at (\S+?)!?$")
GPF = re.compile(r"^(?:Oops: )?general protection fault")
NULL = re.compile(r"^BUG: (?:kernel NULL pointer dereference|unable to handle kernel NULL pointer dereference)")
BUG = re.compile(r"^BUG: (.*)$")
ARM_FAULT = re.compile(r"^Unable to handle kernel (NULL pointer dereference|paging request)")
# Lines that continue an oops header rather than start a report of their own.
OOPS_TAIL = re.compile(
    r"^(?:Oops: |invalid opcode: |divide error: |stack segment: |Internal error: |#PF: |"
    r"(?:PGD|P4D|PUD|PMD|PTE) [0-9a-f]+)"
)
OOPS_ALONE = re.compile(r"^(Oops|invalid opcode|divide error|stack segment|Internal error): ")
SANITIZER = re.compile(r"^(?:BUG: (?:KASAN|KFENCE|KMSAN|KCSAN)|UBSAN):")
SANITIZER_END = re.compile(r"^={20,}$")
BANNER = re.compile(r"^Linux version (\S+) \(")
BANNER_ANYWHERE = re.compile(r"Linux version (\S+) \(")


def marker(head: str) -> tuple[str, re.Match[str] | None] | None:
    """The kind of report a line starts, if any (a `cut here` line is handled by the caller)."""
    if PANIC.match(head):
        return "panic", PANIC.match(head)
    if m := SOFT.match(head):
        return "soft-lockup", m
    if m := HARD.match(head):
        return "hard-lockup", m
    if m := RCU.match(head):
        return "rcu-stall", m
    if m := HUNG.match(head):
        return "hung-task", m
    if m := WQ_LOCKUP.match(head):
        return "hung-task", m
    if WARNING.match(head) or UBSAN.match(head):
        return "warning", None
    if KERNEL_BUG.match(head) or GPF.match(head) or BUG.match(head) or ARM_FAULT.match(head):
        return "oops", None
    if OOPS_ALONE.match(head):
        return "oops", None
    return None


# ---------------------------------------------------------------------------------------------
# Report body: what still belongs to a report, and where it ends
# ---------------------------------------------------------------------------------------------

FRAME = re.compile(
    r"^\s*(\? )?(?:\[<[0-9a-f]+>\]\s*)?(?:\[<[0-9a-f]+>\]\s*)?([A-Za-z_$][\w.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+"
)
RIP = re.compile(
    r"^(?:RIP: [0-9a-f]{4}:|EIP: (?:[0-9a-f]{4}:)?|pc : |PC is at |NIP \[[0-9a-f]+\] )"
    r"(?:\[<[0-9a-f]+>\]\s*)?([A-Za-z_$][\w.$]*)\+0x"
)
TRACE_START = re.compile(r"^(?:Call Trace|Call trace|Backtrace|Stack):?\s*$|^Call Trace:")
BODY = re.compile(
    r"^(?:\s"  # indented: frames, <TASK>, "Not tainted", rcu detail lines
    r"|\? "
    r"|</?(?:TASK|IRQ|NMI|EOI|SOFTIRQ)>"
    r"|(?:Call Trace|Call trace|Stack|Code|Modules linked in|Hardware name|Workqueue|Kernel Offset"
    r"|Showing|Sending NMI|NMI backtrace|irq event stamp|hardirqs last|softirqs last|task:|CPU:"
    r"|RIP:|EIP:|RSP:|ESP:|[RE]?[ABCD]X:|R[SD]I:|RBP:|R\d+:|FS:|CS:|CR\d:|DR\d:|PKRU:|EFLAGS:"
    r"|Tainted:|#PF:|PGD|P4D|PUD|PMD|Oops:|invalid opcode|stack segment|divide error|Internal error"
    r"|pc :|lr :|sp :|x\d+ *:|pstate:|Mem abort|Exception stack|Register|Rebooting in|Fixing recursive"
    r"|INFO: lockdep|Shadow of|Memory state|The buggy address|Allocated by|Freed by|Last potentially"
    r"|\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\""
    r"|-+\[ end |={5,}|-{5,}|\d+ locks? held by|#\d+: )"
    r"|(?:\[<[0-9a-f]+>\]\s*)?[A-Za-z_$][\w.$]*\+0x[0-9a-f]+/0x[0-9a-f]+)"
)
BODY_EXTRA = {
    "rcu-stall": re.compile(r"^(?:rcu: |\s*\(|Task dump for CPU|task:)"),
    "hung-task": re.compile(r"^(?:Showing busy workqueues|workqueue |  pwq |pool \d+:|  in-flight)"),
}
REGS_AFTER_END = re.compile(
    r"^(?:RIP:|EIP:|Code:|RSP:|ESP:|[RE]?[ABCD]X:|R[SD]I:|RBP:|R\d+:|FS:|CS:|CR\d:|DR\d:|PKRU:"
    r"|Kernel Offset:|EFLAGS:)"
)


def is_body(kind: str, head_line: Line) -> bool:
    msg = head_line.msg
    if not msg.strip():
        return False
    if BODY.match(msg) or BODY.match(msg.strip()):
        return True
    extra = BODY_EXTRA.get(kind)
    return bool(extra and extra.match(msg))
