"""Know what the kernel did: classify a serial console (or dmesg) into findings.

A pure module: callers pass the text in (decode bytes with ``errors="replace"``), nothing here
reads files or talks to hosts. ``classify()`` walks the console once and returns one `Finding`
per kernel report, in console order:

==============  ==================================================================  =========
kind            marker (after the ``[ 12.345678] `` timestamp, if any)              outcome
==============  ==================================================================  =========
panic           ``Kernel panic - not syncing: ...``                                 fail
oops            ``BUG: ...``, ``kernel BUG at``, ``general protection fault``,       fail
                ``Oops: ...``, ``invalid opcode``, ``Unable to handle kernel ...``
warning         ``WARNING: ...`` (usually after ``------------[ cut here ]``),      fail
                ``UBSAN: ...``
hung-task       ``INFO: task NAME:PID blocked for more than N seconds``,             hang
                ``BUG: workqueue lockup``
soft-lockup     ``watchdog: BUG: soft lockup - CPU#N stuck for Ns!``                 hang
hard-lockup     ``watchdog: Watchdog detected hard LOCKUP on cpu N``                 hang
rcu-stall       ``rcu: INFO: rcu_preempt detected stalls on CPUs/tasks`` and         hang
                ``... self-detected stall on CPU``
reset           a second ``Linux version`` banner: the machine rebooted itself      fail
silent          no console output for ``idle_seconds >= idle_limit`` (if given)     hang
==============  ==================================================================  =========

Each finding carries a syzkaller-like one-line ``title`` (``BUG: kernel NULL pointer
dereference in virtnet_poll``, ``WARNING in dev_watchdog``, ``Kernel panic - not syncing:
...``), the 1-based ``line`` where the report starts (a ``cut here`` line in front of the
marker counts as the start), the excerpt ``lines`` (the report through its ``---[ end ... ]---``
line or, without one, through the last line that still looks like part of the report; at most
`MAX_EXCERPT` lines) and the ``function`` the report points at: the first meaningful frame of
the RIP or of the call trace, generic frames (dump_stack, panic, __warn, schedule, locks, ...)
skipped and compiler suffixes (``.isra.0``, ``.cold``) dropped.

Robust to ``\\r\\n`` line ends, ANSI escapes and NUL bytes (SeaBIOS, serial noise), consoles with
and without printk timestamps, and userspace output interleaved with kernel lines: when the
console has timestamps at all, only timestamped lines count as kernel markers, so a reproducer
that prints ``BUG:`` or ``cat /proc/version`` does not fool it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BOOT_FAILED",
    "FATAL_KINDS",
    "KINDS",
    "MAX_EXCERPT",
    "OUTCOME_FOR_KIND",
    "Finding",
    "banners",
    "classify",
    "compile_signature",
    "fatal",
    "first_banner",
    "kernel_release",
    "outcome_for",
    "signature_matches",
    "summary",
]

KINDS = (
    "panic",
    "oops",
    "warning",
    "hung-task",
    "soft-lockup",
    "hard-lockup",
    "rcu-stall",
    "reset",
    "silent",
)

# kind -> fleetbisect outcome kind (the values of verdict.OutcomeKind). A finding seen while the
# target was still booting (before the ready stage succeeded) is a boot failure whatever its kind:
# that is the stage's call, not the kind's (see `outcome_for`).
OUTCOME_FOR_KIND: dict[str, str] = {
    "panic": "fail",
    "oops": "fail",
    "warning": "fail",
    "reset": "fail",
    "hung-task": "hang",
    "soft-lockup": "hang",
    "hard-lockup": "hang",
    "rcu-stall": "hang",
    "silent": "hang",
}
BOOT_FAILED = "boot-failed"

# Kinds after which this kernel will never answer again: stop waiting for it.
FATAL_KINDS = frozenset({"panic", "reset"})

MAX_EXCERPT = 100  # lines; a full x86 oops with registers repeated after the end is ~65


@dataclass(frozen=True)
class Finding:
    kind: str
    title: str
    line: int  # 1-based line of the report's first line in the text given to classify()
    lines: tuple[str, ...] = field(default=(), repr=False)  # the excerpt, cleaned, timestamps kept
    function: str | None = None

    @property
    def end(self) -> int:
        """1-based line of the excerpt's last line."""
        return self.line + max(len(self.lines), 1) - 1

    @property
    def outcome(self) -> str:
        return OUTCOME_FOR_KIND[self.kind]

    @property
    def excerpt(self) -> str:
        return "\n".join(self.lines)

    def to_json(self, *, with_lines: bool = True) -> dict:
        d: dict = {"kind": self.kind, "title": self.title, "line": self.line, "end": self.end,
                   "function": self.function}
        if with_lines:
            d["lines"] = list(self.lines)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Finding:
        return cls(d["kind"], d["title"], d["line"], tuple(d.get("lines", ())), d.get("function"))


def outcome_for(finding: Finding, *, booted: bool = True) -> str:
    """The outcome a finding stands for; anything before the target was ready is boot-failed."""
    return OUTCOME_FOR_KIND[finding.kind] if booted else BOOT_FAILED


# ---------------------------------------------------------------------------------------------
# Lines: clean, split off the timestamp
# ---------------------------------------------------------------------------------------------

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte (colours, clear screen, ?7l)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL/ST
    r"|\x1b[()*+][0-9A-Za-z]"  # charset designation
    r"|\x1b[@-Z\\-_]"  # two-byte escapes (ESC c: reset)
    r"|\x1b"  # a lone ESC
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# printk timestamp, optional caller id ([    T1] / [    C0]), optional syslog level <N>.
_TIMESTAMP = re.compile(r"\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s?")
_LEVEL = re.compile(r"^<\d>")
_SYSLOG = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: ")


def _clean(raw: str) -> str:
    return _CONTROL.sub("", _ANSI.sub("", raw.rstrip("\r")))


def _split(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@dataclass(frozen=True)
class _Line:
    text: str  # cleaned line, timestamp kept (what goes into excerpts)
    msg: str  # the kernel message: after the timestamp, indentation kept (one space eaten)
    ts: bool  # a printk timestamp was found on the line

    @property
    def head(self) -> str:
        return self.msg.strip()


def _parse(raw: str) -> _Line:
    text = _clean(raw)
    m = _TIMESTAMP.search(text)
    if m:
        msg = text[m.end():]
        ts = True
    else:
        msg = _SYSLOG.sub("", _LEVEL.sub("", text))
        ts = False
    return _Line(text, msg, ts)


# ---------------------------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------------------------

_CUT_HERE = re.compile(r"^-+\[ cut here \]-+")
_END_TRACE = re.compile(r"^-+\[ end trace [0-9a-f]* ?\]-+")
_END_PANIC = re.compile(r"^-+\[ end Kernel panic")
_PANIC = re.compile(r"^Kernel panic - not syncing:?\s?(.*)$")
_SOFT = re.compile(r"^(?:(?:NMI )?watchdog: )?BUG: soft lockup - (CPU#\d+ stuck for \d+s!)")
_HARD = re.compile(r"^(?:(?:NMI )?watchdog: )?Watchdog detected hard LOCKUP on cpu \d+")
_RCU = re.compile(
    r"^(?:rcu: )?INFO: (rcu_\w+|rcu\w*) ((?:self-)?detected (?:expedited )?stalls? on [\w/ ]+?)\s*[:.]?\s*$"
)
_HUNG = re.compile(r"^INFO: task (.+):(\d+) blocked for more than (\d+) seconds")
_WQ_LOCKUP = re.compile(r"^BUG: workqueue lockup")
_WARNING = re.compile(r"^WARNING: ")
_WARN_CPU = re.compile(
    r"^WARNING: (?:CPU: \d+ PID: \d+ )?at (\S+?)(?::\d+)?\s+(?:\[<[0-9a-f]+>\]\s*)?(?:([A-Za-z_][\w.]*)(?:\+0x|\(\)))?"
)
_UBSAN = re.compile(r"^UBSAN: ([\w-]+)")
_KERNEL_BUG = re.compile(r"^kernel BUG at (\S+?)!?$")
_GPF = re.compile(r"^(?:Oops: )?general protection fault")
_NULL = re.compile(r"^BUG: (?:kernel NULL pointer dereference|unable to handle kernel NULL pointer dereference)")
_BUG = re.compile(r"^BUG: (.*)$")
_ARM_FAULT = re.compile(r"^Unable to handle kernel (NULL pointer dereference|paging request)")
# Lines that continue an oops header rather than start a report of their own.
_OOPS_TAIL = re.compile(
    r"^(?:Oops: |invalid opcode: |divide error: |stack segment: |Internal error: |#PF: |"
    r"(?:PGD|P4D|PUD|PMD|PTE) [0-9a-f]+)"
)
_OOPS_ALONE = re.compile(r"^(Oops|invalid opcode|divide error|stack segment|Internal error): ")
_SANITIZER = re.compile(r"^(?:BUG: (?:KASAN|KFENCE|KMSAN|KCSAN)|UBSAN):")
_SANITIZER_END = re.compile(r"^={20,}$")
_BANNER = re.compile(r"^Linux version (\S+) \(")
_BANNER_ANYWHERE = re.compile(r"Linux version (\S+) \(")


def _marker(head: str) -> tuple[str, re.Match[str] | None] | None:
    """The kind of report a line starts, if any (a `cut here` line is handled by the caller)."""
    if _PANIC.match(head):
        return "panic", _PANIC.match(head)
    if m := _SOFT.match(head):
        return "soft-lockup", m
    if m := _HARD.match(head):
        return "hard-lockup", m
    if m := _RCU.match(head):
        return "rcu-stall", m
    if m := _HUNG.match(head):
        return "hung-task", m
    if m := _WQ_LOCKUP.match(head):
        return "hung-task", m
    if _WARNING.match(head) or _UBSAN.match(head):
        return "warning", None
    if _KERNEL_BUG.match(head) or _GPF.match(head) or _BUG.match(head) or _ARM_FAULT.match(head):
        return "oops", None
    if _OOPS_ALONE.match(head):
        return "oops", None
    return None


# ---------------------------------------------------------------------------------------------
# Report body: what still belongs to a report, and where it ends
# ---------------------------------------------------------------------------------------------

_FRAME = re.compile(
    r"^\s*(\? )?(?:\[<[0-9a-f]+>\]\s*)?(?:\[<[0-9a-f]+>\]\s*)?([A-Za-z_$][\w.$]*)\+0x[0-9a-f]+/0x[0-9a-f]+"
)
_RIP = re.compile(
    r"^(?:RIP: [0-9a-f]{4}:|EIP: (?:[0-9a-f]{4}:)?|pc : |PC is at |NIP \[[0-9a-f]+\] )"
    r"(?:\[<[0-9a-f]+>\]\s*)?([A-Za-z_$][\w.$]*)\+0x"
)
_TRACE_START = re.compile(r"^(?:Call Trace|Call trace|Backtrace|Stack):?\s*$|^Call Trace:")
_BODY = re.compile(
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
_BODY_EXTRA = {
    "rcu-stall": re.compile(r"^(?:rcu: |\s*\(|Task dump for CPU|task:)"),
    "hung-task": re.compile(r"^(?:Showing busy workqueues|workqueue |  pwq |pool \d+:|  in-flight)"),
}
_REGS_AFTER_END = re.compile(
    r"^(?:RIP:|EIP:|Code:|RSP:|ESP:|[RE]?[ABCD]X:|R[SD]I:|RBP:|R\d+:|FS:|CS:|CR\d:|DR\d:|PKRU:"
    r"|Kernel Offset:|EFLAGS:)"
)


def _is_body(kind: str, head_line: _Line) -> bool:
    msg = head_line.msg
    if not msg.strip():
        return False
    if _BODY.match(msg) or _BODY.match(msg.strip()):
        return True
    extra = _BODY_EXTRA.get(kind)
    return bool(extra and extra.match(msg))


# ---------------------------------------------------------------------------------------------
# Functions: the first meaningful frame
# ---------------------------------------------------------------------------------------------

_GENERIC = re.compile(
    r"^(?:"
    r"dump_stack\w*|show_stack\w*|show_trace\w*|show_regs\w*|__show_regs|sched_show_task|panic|vpanic"
    r"|nmi_panic|__warn\w*|warn_slowpath\w*|report_bug|handle_bug|do_error_trap|do_trap|do_int3\w*"
    r"|do_invalid_op|invalid_op|exc_\w+|asm_exc_\w+|asm_sysvec_\w+|sysvec_\w+|__sysvec_\w+|die|__die\w*|oops_\w+"
    r"|page_fault_oops|no_context|__bad_area\w*|bad_area\w*|do_user_addr_fault|do_kern_addr_fault"
    r"|kernelmode_fixup_or_oops|do_general_protection|general_protection|do_page_fault|page_fault"
    r"|fixup_exception|ex_handler_\w+|bug_handler|make_task_dead"
    r"|__schedule|schedule\w*|preempt_schedule\w*|io_schedule\w*|__cond_resched|_cond_resched"
    r"|rwsem_\w+|__rwsem_\w+|down|__down\w*|down_read\w*|down_write\w*|up_read|up_write"
    r"|mutex_lock\w*|__mutex_lock\w*|mutex_unlock|_raw_\w+|__raw_\w+|do_raw_\w+|queued_\w+"
    r"|native_queued_\w+|__pv_queued_\w+|spin_\w+|wait_for_completion\w*|__wait_for_common"
    r"|wait_for_common\w*|do_wait_for_common|__wait_event\w*|wait_on_page_bit\w*|folio_wait\w*"
    r"|bit_wait\w*|out_of_line_wait_on_bit\w*|__wait_on_bit\w*|__flush_work|flush_work"
    r"|kasan_\w+|__kasan_\w+|__asan_\w+|check_memory_region|print_address_description\w*"
    r"|print_report|__ubsan_\w+|ubsan_\w+|lockdep_\w+|lock_acquire|lock_release|__lock_acquire"
    r"|check_\w+_bug|print_\w+_bug|__might_\w+|___might_\w+|might_fault"
    r"|memcpy\w*|__memcpy\w*|memset\w*|__memset\w*|memmove\w*|__memmove\w*|strlen|strnlen|strcmp"
    r"|strncmp|strcpy|strncpy|strscpy|copy_user_\w+|_copy_to_user|_copy_from_user|__copy_\w+"
    r"|__list_add_valid\w*|__list_del_entry_valid\w*|refcount_warn_saturate|__refcount_\w+"
    r"|_printk|printk\w*|vprintk\w*|__printk\w*"
    r"|nmi_cpu_backtrace\w*|nmi_trigger_cpumask_backtrace|arch_trigger_cpumask_backtrace"
    r"|trigger_\w+_backtrace|rcu_dump_cpu_stacks|print_cpu_stall\w*|print_other_cpu_stall"
    r"|check_cpu_stall|rcu_pending|rcu_sched_clock_irq|rcu_check_callbacks|update_process_times"
    r"|tick_sched_\w+|tick_\w+_handler|__hrtimer_run_queues|hrtimer_interrupt|hrtimer_run_queues"
    r"|local_apic_timer_interrupt|smp_apic_timer_interrupt|apic_timer_interrupt|watchdog_\w+"
    r"|__perf_event_overflow|perf_event_\w+|handle_pmi_common|intel_pmu_handle_irq|x86_pmu_handle_irq"
    r"|nmi_handle|default_do_nmi|do_nmi|end_repeat_nmi|irq_exit\w*|__irq_exit\w*|__do_softirq"
    r"|__x86_return_thunk|srso_return_thunk|__x86_indirect_thunk\w*|ret_from_fork\w*|kthread"
    r"|entry_SYSCALL\w*|do_syscall_\w+|x64_sys_call|do_fast_syscall_\w+|cpu_relax"
    r"|check_panic_on_warn|end_report|start_report"
    r"|default_idle\w*|do_idle|cpu_startup_entry|start_secondary|secondary_startup_\w+|cpuidle_enter\w*"
    r"|acpi_idle\w*|mwait_idle\w*|intel_idle\w*|native_safe_halt|arch_cpu_idle\w*|rest_init|start_kernel"
    r"|x86_64_start_\w+|process_one_work|worker_thread|call_timer_fn|__run_timers|run_timer_softirq"
    r"|expire_timers|run_ksoftirqd|smpboot_thread_fn|__napi_poll|net_rx_action|handle_softirqs"
    r"|do_softirq\w*|__local_bh_enable_ip|common_interrupt|asm_common_interrupt"
    r")$"
)


def _normalize(name: str) -> str:
    return name.split(".", 1)[0]


def _meaningful(name: str | None) -> str | None:
    if not name:
        return None
    name = _normalize(name)
    return None if _GENERIC.match(name) else name


def _trace_function(body: Sequence[_Line]) -> str | None:
    """First meaningful, reliable (no `? `) frame after a Call Trace line."""
    in_trace = False
    for ln in body:
        head = ln.head
        if _TRACE_START.match(head):
            in_trace = True
            continue
        if not in_trace:
            continue
        r = _RIP.match(head)  # the interrupted context inside a trace: "RIP: 0010:f+0x1/0x2"
        if r and (name := _meaningful(r.group(1))):
            return name
        m = _FRAME.match(ln.msg)
        if m and not m.group(1):
            name = _meaningful(m.group(2))
            if name:
                return name
    return None


def _rip_function(body: Sequence[_Line]) -> str | None:
    for ln in body:
        m = _RIP.match(ln.head)
        if m:
            return _meaningful(m.group(1))
    return None


def _function(kind: str, head: str, body: Sequence[_Line]) -> str | None:
    if kind == "warning":
        m = _WARN_CPU.match(head)
        if m and (name := _meaningful(m.group(2))):
            return name
        return _rip_function(body) or _trace_function(body)
    if kind == "oops":
        # KASAN & co. name the function on the marker line: "BUG: KASAN: use-after-free in f+0x1/0x2".
        m = re.search(r" in ([A-Za-z_][\w.]*)\+0x", head)
        if m and (name := _meaningful(m.group(1))):
            return name
        return _rip_function(body) or _trace_function(body)
    if kind in ("soft-lockup", "hard-lockup", "rcu-stall"):
        return _rip_function(body) or _trace_function(body)
    if kind in ("panic", "hung-task"):
        return _trace_function(body)
    return None


# ---------------------------------------------------------------------------------------------
# Titles
# ---------------------------------------------------------------------------------------------

def _with(base: str, function: str | None) -> str:
    return f"{base} in {function}" if function else base


def _bug_base(rest: str) -> str:
    """`BUG: scheduling while atomic: swapper/0/0x2` -> `BUG: scheduling while atomic`."""
    rest = re.sub(r" in [A-Za-z_][\w.]*\+0x.*$", "", rest)
    if m := re.match(r"(KASAN|KFENCE|KMSAN|KCSAN): ([\w-]+)", rest):
        return f"BUG: {m.group(1)}: {m.group(2)}"
    rest = re.split(r", |: | at | - |!|;", rest, maxsplit=1)[0]
    return f"BUG: {rest.strip()}"


def _title(kind: str, head: str, m: re.Match[str] | None, function: str | None) -> str:
    if kind == "panic":
        return head.rstrip()
    if kind == "hung-task":
        if m is not None and m.re is _HUNG:
            return f"INFO: task {m.group(1)}:{m.group(2)} blocked for more than {m.group(3)} seconds"
        return _with("BUG: workqueue lockup", function)
    if kind == "soft-lockup":
        return _with("BUG: soft lockup", function) if function else f"BUG: soft lockup - {m.group(1)}"
    if kind == "hard-lockup":
        return _with("Watchdog detected hard LOCKUP", function) if function else head.removeprefix("watchdog: ").removeprefix("NMI watchdog: ")
    if kind == "rcu-stall":
        return _with(f"INFO: {m.group(1)} {m.group(2)}", function)
    if kind == "warning":
        if (u := _UBSAN.match(head)):
            return _with(f"UBSAN: {u.group(1)}", function)
        w = _WARN_CPU.match(head)
        if w:
            return f"WARNING in {function}" if function else f"WARNING at {w.group(1)}"
        return head.rstrip(" :")
    if kind == "oops":
        if _NULL.match(head) or _ARM_FAULT.match(head) and "NULL" in head:
            return _with("BUG: kernel NULL pointer dereference", function)
        if _GPF.match(head):
            return _with("general protection fault", function)
        if (k := _KERNEL_BUG.match(head)):
            return _with("kernel BUG", function) if function else f"kernel BUG at {k.group(1)}"
        if head.startswith("BUG: unable to handle page fault"):
            return _with("BUG: unable to handle page fault", function)
        if head.startswith("BUG: unable to handle kernel paging request") or _ARM_FAULT.match(head):
            return _with("BUG: unable to handle kernel paging request", function)
        if (b := _BUG.match(head)):
            return _with(_bug_base(b.group(1)), function)
        if (o := _OOPS_ALONE.match(head)):
            return _with(o.group(1), function)
    return head


# ---------------------------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------------------------

def _kernel_lines(parsed: Sequence[_Line]) -> list[bool]:
    """Which lines may carry a kernel marker: with timestamps on the console, only those."""
    any_ts = any(p.ts for p in parsed)
    return [p.ts or not any_ts for p in parsed]


def _report_end(kind: str, parsed: Sequence[_Line], start: int, marker: int, starts: set[int]) -> int:
    """Index (inclusive) of the last line of the report whose marker is at `marker`."""
    limit = min(len(parsed), start + MAX_EXCERPT)
    end_re = _END_PANIC if kind == "panic" else _END_TRACE
    if _SANITIZER.match(parsed[marker].head):
        end_re = _SANITIZER_END  # KASAN/UBSAN/KFENCE reports end with a line of '='
    # 1. An explicit end line before the next report.
    for i in range(marker + 1, limit):
        if i in starts:
            break
        head = parsed[i].head
        if end_re.match(head):
            j = i
            if kind != "panic":  # x86 repeats the RIP and registers after the end trace line
                while j + 1 < limit and (j + 1) not in starts and _REGS_AFTER_END.match(parsed[j + 1].head):
                    j += 1
            return j
        if kind == "panic" and _END_TRACE.match(head):
            break
    # 2. Heuristic: lines that look like a report body; tolerate short gaps of foreign lines
    #    (interleaved output) while a stack dump is still open.
    last = marker
    open_blocks = 0
    gap = 0
    for i in range(marker + 1, limit):
        if i in starts:
            break
        ln = parsed[i]
        head = ln.head
        if _is_body(kind, ln):
            last = i
            gap = 0
            if re.match(r"^<(?:TASK|IRQ|NMI|SOFTIRQ)>$", head):
                open_blocks += 1
            elif re.match(r"^</(?:TASK|IRQ|NMI|SOFTIRQ)>$", head):
                open_blocks = max(0, open_blocks - 1)
            if _END_TRACE.match(head) or _END_PANIC.match(head):
                break
            continue
        gap += 1
        if not open_blocks or gap > 2:
            break
    return last


def classify(
    text: str,
    *,
    idle_seconds: float | None = None,
    idle_limit: float | None = None,
) -> list[Finding]:
    """Findings in console order. `idle_seconds`/`idle_limit`: how long the console has been
    quiet and how long is too long; when both are given and the limit is reached, a `silent`
    finding ends the list."""
    raw_lines = _split(text)
    parsed = [_parse(r) for r in raw_lines]
    kernel = _kernel_lines(parsed)

    # Pass 1: report starts.
    starts: list[tuple[int, int, str, re.Match[str] | None]] = []  # (start, marker, kind, match)
    banner_seen = False
    cut_pending: int | None = None
    oops_open: int | None = None  # index of an oops header still being printed (no trace yet)
    for i, ln in enumerate(parsed):
        head = ln.head
        if not kernel[i] or not head:
            continue
        if _BANNER.match(head) or (not ln.ts and _BANNER_ANYWHERE.search(head)):
            if banner_seen:
                starts.append((i, i, "reset", _BANNER_ANYWHERE.search(head)))
            banner_seen = True
            cut_pending = oops_open = None
            continue
        if _CUT_HERE.match(head):
            if cut_pending is not None:
                starts.append((cut_pending, cut_pending, "warning", None))
            cut_pending = i
            continue
        if _TRACE_START.match(head):
            oops_open = None
        if oops_open is not None and i - oops_open <= 12 and _OOPS_TAIL.match(head):
            continue  # "Oops: 0000 [#1]" after "BUG: kernel NULL pointer dereference"
        found = _marker(head)
        if found is None:
            if cut_pending is not None and i - cut_pending > 3:
                starts.append((cut_pending, cut_pending, "warning", None))
                cut_pending = None
            continue
        kind, m = found
        start = i
        if cut_pending is not None and i - cut_pending <= 3:
            start = cut_pending
        elif cut_pending is not None:
            starts.append((cut_pending, cut_pending, "warning", None))
        cut_pending = None
        oops_open = i if kind == "oops" else None
        starts.append((start, i, kind, m))
    if cut_pending is not None:
        starts.append((cut_pending, cut_pending, "warning", None))
    starts.sort(key=lambda s: s[0])

    # Pass 2: excerpt, function, title.
    start_set = {s[0] for s in starts} | {s[1] for s in starts}
    findings: list[Finding] = []
    for start, marker, kind, m in starts:
        if kind == "reset":
            end = marker
            for j in range(marker + 1, min(len(parsed), marker + 3)):
                if parsed[j].head.startswith("Command line:"):
                    end = j
            release = m.group(1) if m else "?"
            findings.append(Finding(
                "reset", f"reset: the machine rebooted into Linux {release}", start + 1,
                tuple(p.text for p in parsed[start:end + 1]), None,
            ))
            continue
        bare_cut = marker == start and bool(_CUT_HERE.match(parsed[start].head))
        if bare_cut:
            # A `cut here` with no recognised marker after it: the next message is the report.
            nxt = next((j for j in range(start + 1, min(len(parsed), start + 4)) if parsed[j].head), None)
            if nxt is not None and nxt not in start_set:
                marker = nxt
        others = start_set - {start, marker}
        end = _report_end(kind, parsed, start, marker, others)
        body = parsed[marker + 1:end + 1]
        head = parsed[marker].head
        function = _function(kind, head, body)
        if function is None and kind == "panic" and findings and not any(
            _TRACE_START.match(b.head) for b in body
        ):
            function = findings[-1].function  # "Fatal exception": the oops before it says where
        if bare_cut:
            title = _with("WARNING" if marker == start else f"WARNING: {head}", function)
        else:
            title = _title(kind, head, m, function)
        findings.append(Finding(kind, title, start + 1, tuple(p.text for p in parsed[start:end + 1]), function))

    if idle_seconds is not None and idle_limit is not None and idle_seconds >= idle_limit:
        tail = tuple(p.text for p in parsed[-10:])
        findings.append(Finding(
            "silent",
            f"no console output for {idle_seconds:g} s (limit {idle_limit:g} s)",
            max(len(parsed), 1),
            tail,
            None,
        ))
    return findings


# ---------------------------------------------------------------------------------------------
# Banners, signatures, helpers
# ---------------------------------------------------------------------------------------------

def banners(text: str) -> list[tuple[int, str]]:
    """(1-based line, banner message) of every kernel `Linux version` banner."""
    parsed = [_parse(r) for r in _split(text)]
    kernel = _kernel_lines(parsed)
    out = []
    for i, ln in enumerate(parsed):
        if not kernel[i]:
            continue
        head = ln.head
        if _BANNER.match(head):
            out.append((i + 1, head))
        elif not ln.ts and (m := _BANNER_ANYWHERE.search(head)):
            out.append((i + 1, head[m.start():]))
    return out


def first_banner(text: str) -> str | None:
    """The first `Linux version ...` banner message, or None (e.g. a `quiet` boot hides it)."""
    b = banners(text)
    return b[0][1] if b else None


def kernel_release(text: str) -> str | None:
    """`6.1.0-56-cloud-amd64` from the first banner: which kernel really booted."""
    banner = first_banner(text)
    if banner is None:
        return None
    m = _BANNER_ANYWHERE.search(banner)
    return m.group(1) if m else None


def compile_signature(signature: str | re.Pattern[str]) -> re.Pattern[str]:
    """A playbook signature as a regex (multi-line: `^`/`$` match at excerpt line bounds).
    Raises ValueError for an invalid one, so a playbook can be validated before a run."""
    if isinstance(signature, re.Pattern):
        return signature
    try:
        return re.compile(signature, re.MULTILINE)
    except re.error as e:
        raise ValueError(f"invalid signature regex {signature!r}: {e}") from None


def signature_matches(finding: Finding, signature: str | re.Pattern[str]) -> bool:
    """Whether a finding is "the same crash": the signature regex is searched in the title, the
    function, and the excerpt (with timestamps, and again without them so `^RIP:` works)."""
    rx = compile_signature(signature)
    if rx.search(finding.title):
        return True
    if finding.function and rx.search(finding.function):
        return True
    if finding.lines:
        if rx.search("\n".join(finding.lines)):
            return True
        if rx.search("\n".join(_parse(x).msg.strip() for x in finding.lines)):
            return True
    return False


def fatal(findings: Iterable[Finding]) -> Finding | None:
    """The first finding after which this kernel will never answer (panic, reset)."""
    return next((f for f in findings if f.kind in FATAL_KINDS), None)


def summary(findings: Sequence[Finding], *, limit: int = 2) -> str:
    """One line for an outcome summary: the first findings' kinds and titles."""
    if not findings:
        return "no kernel report on the console"
    parts = [f"{f.kind}: {f.title} (console line {f.line})" for f in findings[:limit]]
    more = len(findings) - limit
    return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")
