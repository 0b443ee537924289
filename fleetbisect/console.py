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

from . import consolelex as lex

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


def _trace_function(body: Sequence[lex.Line]) -> str | None:
    """First meaningful, reliable (no `? `) frame after a Call Trace line."""
    in_trace = False
    for ln in body:
        head = ln.head
        if lex.TRACE_START.match(head):
            in_trace = True
            continue
        if not in_trace:
            continue
        r = lex.RIP.match(head)  # the interrupted context inside a trace: "RIP: 0010:f+0x1/0x2"
        if r and (name := _meaningful(r.group(1))):
            return name
        m = lex.FRAME.match(ln.msg)
        if m and not m.group(1):
            name = _meaningful(m.group(2))
            if name:
                return name
    return None


def _rip_function(body: Sequence[lex.Line]) -> str | None:
    for ln in body:
        m = lex.RIP.match(ln.head)
        if m:
            return _meaningful(m.group(1))
    return None


def _function(kind: str, head: str, body: Sequence[lex.Line]) -> str | None:
    if kind == "warning":
        m = lex.WARN_CPU.match(head)
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
        if m is not None and m.re is lex.HUNG:
            return f"INFO: task {m.group(1)}:{m.group(2)} blocked for more than {m.group(3)} seconds"
        return _with("BUG: workqueue lockup", function)
    if kind == "soft-lockup":
        return _with("BUG: soft lockup", function) if function else f"BUG: soft lockup - {m.group(1)}"
    if kind == "hard-lockup":
        return _with("Watchdog detected hard LOCKUP", function) if function else head.removeprefix("watchdog: ").removeprefix("NMI watchdog: ")
    if kind == "rcu-stall":
        return _with(f"INFO: {m.group(1)} {m.group(2)}", function)
    if kind == "warning":
        if (u := lex.UBSAN.match(head)):
            return _with(f"UBSAN: {u.group(1)}", function)
        w = lex.WARN_CPU.match(head)
        if w:
            return f"WARNING in {function}" if function else f"WARNING at {w.group(1)}"
        return head.rstrip(" :")
    if kind == "oops":
        if lex.NULL.match(head) or lex.ARM_FAULT.match(head) and "NULL" in head:
            return _with("BUG: kernel NULL pointer dereference", function)
        if lex.GPF.match(head):
            return _with("general protection fault", function)
        if (k := lex.KERNEL_BUG.match(head)):
            return _with("kernel BUG", function) if function else f"kernel BUG at {k.group(1)}"
        if head.startswith("BUG: unable to handle page fault"):
            return _with("BUG: unable to handle page fault", function)
        if head.startswith("BUG: unable to handle kernel paging request") or lex.ARM_FAULT.match(head):
            return _with("BUG: unable to handle kernel paging request", function)
        if (b := lex.BUG.match(head)):
            return _with(_bug_base(b.group(1)), function)
        if (o := lex.OOPS_ALONE.match(head)):
            return _with(o.group(1), function)
    return head


# ---------------------------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------------------------

def _kernel_lines(parsed: Sequence[lex.Line]) -> list[bool]:
    """Which lines may carry a kernel marker: with timestamps on the console, only those."""
    any_ts = any(p.ts for p in parsed)
    return [p.ts or not any_ts for p in parsed]


def _report_end(kind: str, parsed: Sequence[lex.Line], start: int, marker: int, starts: set[int]) -> int:
    """Index (inclusive) of the last line of the report whose marker is at `marker`."""
    limit = min(len(parsed), start + MAX_EXCERPT)
    end_re = lex.END_PANIC if kind == "panic" else lex.END_TRACE
    if lex.SANITIZER.match(parsed[marker].head):
        end_re = lex.SANITIZER_END  # KASAN/UBSAN/KFENCE reports end with a line of '='
    # 1. An explicit end line before the next report.
    for i in range(marker + 1, limit):
        if i in starts:
            break
        head = parsed[i].head
        if end_re.match(head):
            j = i
            if kind != "panic":  # x86 repeats the RIP and registers after the end trace line
                while j + 1 < limit and (j + 1) not in starts and lex.REGS_AFTER_END.match(parsed[j + 1].head):
                    j += 1
            return j
        if kind == "panic" and lex.END_TRACE.match(head):
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
        if lex.is_body(kind, ln):
            last = i
            gap = 0
            if re.match(r"^<(?:TASK|IRQ|NMI|SOFTIRQ)>$", head):
                open_blocks += 1
            elif re.match(r"^</(?:TASK|IRQ|NMI|SOFTIRQ)>$", head):
                open_blocks = max(0, open_blocks - 1)
            if lex.END_TRACE.match(head) or lex.END_PANIC.match(head):
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
    raw_lines = lex.split(text)
    parsed = [lex.parse(r) for r in raw_lines]
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
        if lex.BANNER.match(head) or (not ln.ts and lex.BANNER_ANYWHERE.search(head)):
            if banner_seen:
                starts.append((i, i, "reset", lex.BANNER_ANYWHERE.search(head)))
            banner_seen = True
            cut_pending = oops_open = None
            continue
        if lex.CUT_HERE.match(head):
            if cut_pending is not None:
                starts.append((cut_pending, cut_pending, "warning", None))
            cut_pending = i
            continue
        if lex.TRACE_START.match(head):
            oops_open = None
        if oops_open is not None and i - oops_open <= 12 and lex.OOPS_TAIL.match(head):
            continue  # "Oops: 0000 [#1]" after "BUG: kernel NULL pointer dereference"
        found = lex.marker(head)
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
        bare_cut = marker == start and bool(lex.CUT_HERE.match(parsed[start].head))
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
            lex.TRACE_START.match(b.head) for b in body
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
    parsed = [lex.parse(r) for r in lex.split(text)]
    kernel = _kernel_lines(parsed)
    out = []
    for i, ln in enumerate(parsed):
        if not kernel[i]:
            continue
        head = ln.head
        if lex.BANNER.match(head):
            out.append((i + 1, head))
        elif not ln.ts and (m := lex.BANNER_ANYWHERE.search(head)):
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
    m = lex.BANNER_ANYWHERE.search(banner)
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
        if rx.search("\n".join(lex.parse(x).msg.strip() for x in finding.lines)):
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
