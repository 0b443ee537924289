"""The serial-console classifier against golden console logs, plus its edge cases.

Golden files live in tests/golden/console/: NAME.log (real QEMU/TCG captures of the Debian cloud
kernel made by tests/golden/make_console_logs.py, and hand-written `*-excerpt.log` files for what
the lab cannot produce) and NAME.expected.json (the findings: kind, title, line, end, function).

Regenerate the expected files after a deliberate change (never done by a normal test run):

    FLEETBISECT_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_console.py -k golden
    # or: .venv/bin/python tests/unit/test_console.py --regen
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from fleetbisect import console, consolelex
from fleetbisect.console import (
    KINDS,
    MAX_EXCERPT,
    OUTCOME_FOR_KIND,
    Finding,
    classify,
    compile_signature,
    fatal,
    first_banner,
    kernel_release,
    outcome_for,
    signature_matches,
    summary,
)
from fleetbisect.verdict import OutcomeKind

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "console"
CASES = sorted(p.name.removesuffix(".log") for p in GOLDEN.glob("*.log"))
REGEN = "FLEETBISECT_REGEN_GOLDEN"


def load(name: str) -> str:
    return (GOLDEN / f"{name}.log").read_bytes().decode("utf-8", "replace")


def as_expected(findings: list[Finding]) -> list[dict]:
    return [f.to_json(with_lines=False) for f in findings]


def write_expected(name: str) -> Path:
    path = GOLDEN / f"{name}.expected.json"
    path.write_text(json.dumps(as_expected(classify(load(name))), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Golden files
# ---------------------------------------------------------------------------------------------

def test_golden_cases_present():
    real = {"panic-no-rootfs", "sysrq-crash", "init-exit", "clean-boot", "reboot-loop", "hung-task"}
    assert real <= set(CASES)
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 250_000


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    path = GOLDEN / f"{name}.expected.json"
    if os.environ.get(REGEN):  # rewrite the expectation, then check it like any other run
        write_expected(name)
    assert path.exists(), f"no {path.name}: run with {REGEN}=1 to create it"
    assert as_expected(classify(load(name))) == json.loads(path.read_text())


@pytest.mark.parametrize("name", CASES)
def test_golden_invariants(name):
    text = load(name)
    raw_lines = text.split("\n")
    findings = classify(text)
    lines = [f.line for f in findings]
    assert lines == sorted(lines), "findings in console order"
    for f in findings:
        assert f.kind in KINDS
        assert 1 <= len(f.lines) <= MAX_EXCERPT
        assert f.end <= len(raw_lines)
        # The excerpt starts on the finding's line (cleaned of control characters).
        assert f.lines[0] in consolelex.clean(raw_lines[f.line - 1]) or f.lines[0] == consolelex.clean(raw_lines[f.line - 1])
        assert "\x00" not in f.excerpt and "\x1b" not in f.excerpt and "\r" not in f.excerpt
        assert f.title and "\n" not in f.title
        if f.function:
            assert re.fullmatch(r"[A-Za-z_$][\w$]*", f.function), f.function


EXPECTED_RELEASE = {
    "panic-no-rootfs": "6.1.0-56-cloud-amd64",
    "sysrq-crash": "6.1.0-56-cloud-amd64",
    "reboot-loop": "6.1.0-56-cloud-amd64",
    "clean-boot-verbose": "6.1.0-56-cloud-amd64",
    "clean-boot": None,  # `quiet` hides the banner (KERN_NOTICE)
    "page-fault-no-timestamps-excerpt": "5.10.0-28-amd64",
    "noise-crlf-ansi-excerpt": None,  # only a userspace "Linux version" line, which does not count
}


@pytest.mark.parametrize("name", sorted(EXPECTED_RELEASE))
def test_kernel_release(name):
    assert kernel_release(load(name)) == EXPECTED_RELEASE[name]


def test_first_banner():
    banner = first_banner(load("panic-no-rootfs"))
    assert banner.startswith("Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)")
    assert first_banner("nothing here\n") is None


# ---------------------------------------------------------------------------------------------
# Specific behaviour, on real logs
# ---------------------------------------------------------------------------------------------

def test_clean_boots_have_no_findings():
    assert classify(load("clean-boot")) == []
    assert classify(load("clean-boot-verbose")) == []


def test_oops_then_panic_keeps_both():
    kinds = [f.kind for f in classify(load("oops-then-panic"))]
    assert kinds == ["oops", "panic"]
    oops, panic = classify(load("oops-then-panic"))
    assert panic.title == "Kernel panic - not syncing: Fatal exception"
    assert panic.function == oops.function == "fbcrash_ring_push"  # the panic says where via the oops
    assert fatal([oops, panic]) is panic


def test_reset_is_the_second_banner():
    findings = classify(load("reboot-loop"))
    assert [f.kind for f in findings] == ["panic", "reset"]
    assert "Linux version 6.1.0-56-cloud-amd64" in findings[1].lines[0]
    assert fatal(findings) is findings[0]


def test_excerpt_of_real_null_deref():
    (f,) = classify(load("null-deref"))
    assert "BUG: kernel NULL pointer dereference, address: 0000000000000008" in f.lines[0]
    assert any("---[ end trace" in x for x in f.lines)
    after = f.lines.index(next(x for x in f.lines if "---[ end trace" in x))
    assert "RIP: 0010:fbcrash_ring_push.isra.0+0x5/" in f.lines[after + 1]
    assert "CR2:" in f.lines[-1]  # registers repeated after the end trace belong to the report
    assert f.function == "fbcrash_ring_push"  # .isra.0 dropped


def test_warning_starts_at_cut_here():
    (f,) = classify(load("warning"))
    assert "cut here" in f.lines[0]
    assert "WARNING: CPU: 0 PID:" in f.lines[1]
    assert "---[ end trace" in f.lines[-1]


def test_kernel_bug_is_an_oops_not_a_warning():
    (f,) = classify(load("kernel-bug"))
    assert f.kind == "oops" and f.title == "kernel BUG in fbcrash_must_be_zero"
    assert "cut here" in f.lines[0]


def test_panic_excerpt_ends_at_end_kernel_panic():
    (f,) = classify(load("panic-no-rootfs"))
    assert "---[ end Kernel panic - not syncing: VFS: Unable to mount root fs" in f.lines[-1]
    assert f.function == "mount_block_root"


def test_hung_task_function_skips_scheduler_and_locks():
    (f,) = classify(load("hung-task"))
    assert f.function == "filename_create"
    assert f.lines[-1].endswith("</TASK>")


# ---------------------------------------------------------------------------------------------
# Robustness: line ends, timestamps, noise, partial consoles
# ---------------------------------------------------------------------------------------------

def _summary(findings):
    return [(f.kind, f.title, f.line, f.end, f.function) for f in findings]


@pytest.mark.parametrize("name", ["null-deref", "sysrq-crash", "hung-task-kworker-excerpt", "rcu-stall-excerpt"])
def test_crlf_and_lf_agree(name):
    text = load(name).replace("\r\n", "\n")
    assert _summary(classify(text)) == _summary(classify(text.replace("\n", "\r\n")))


@pytest.mark.parametrize(
    "name", ["oops-then-panic", "hung-task", "warning", "soft-lockup-excerpt", "rcu-stall", "reboot-loop"]
)
def test_without_timestamps_gives_the_same_findings(name):
    text = load(name)
    bare = re.sub(r"\[\s*\d+\.\d+\] ?", "", text)
    assert _summary(classify(bare)) == _summary(classify(text))


def test_caller_ids_are_handled():
    text = load("warning").replace("] ", "][    T1] ")
    assert _summary(classify(text)) == _summary(classify(load("warning")))


def test_userspace_markers_do_not_count_when_the_kernel_has_timestamps():
    text = (
        "[    1.000000] Linux version 6.1.0-56-cloud-amd64 (x@y) (gcc) #1 SMP\n"
        "BUG: this is printed by a test program\n"
        "Kernel panic - not syncing: so is this\n"
        "Linux version 6.1.0-56-cloud-amd64 (x@y) (gcc) #1 SMP\n"
        "[    2.000000] WARNING: CPU: 0 PID: 1 at net/core/dev.c:10 netif_x+0x1/0x2\n"
    )
    findings = classify(text)
    assert [(f.kind, f.title, f.line) for f in findings] == [("warning", "WARNING in netif_x", 5)]


def test_ansi_and_nul_noise():
    text = "\x1b[0m\x1b[1;31m\x00[   3.5] \x1b[0mKernel panic - not syncing: Oh no\x1b[0m\x00\r\n"
    (f,) = classify(text)
    assert f.title == "Kernel panic - not syncing: Oh no"
    assert f.lines == ("[   3.5] Kernel panic - not syncing: Oh no",)


def test_banner_in_the_middle_of_a_line():
    # SeaBIOS output and escape codes before the first kernel line, as in every real log here.
    text = "Probing EDD (edd=off to disable)... o\x1bc\x1b[?7l\x1b[2Jk[    0.000000] Linux version 6.6.1 (a@b) (gcc) #1\n"
    assert kernel_release(text) == "6.6.1"


def test_partial_console_shows_a_panic_early():
    """A console read while the kernel is still printing its panic: the marker is enough."""
    lines = load("panic-no-rootfs").split("\n")
    cut = next(i for i, x in enumerate(lines) if "Kernel panic" in x) + 3
    findings = classify("\n".join(lines[:cut]))
    assert fatal(findings) is not None and fatal(findings).kind == "panic"
    assert fatal(classify("\n".join(lines[: cut - 3]))) is None


def test_truncated_report_without_end_line():
    text = (
        "[ 1.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "[ 1.0] #PF: supervisor read access in kernel mode\n"
        "[ 1.0] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
        "[ 1.0] RIP: 0010:foo_bar+0x1/0x10 [foo]\n"
        "[ 1.0] Call Trace:\n"
        "[ 1.0]  <TASK>\n"
        "[ 1.0]  baz+0x1/0x2"
    )
    (f,) = classify(text)
    assert (f.kind, f.title, f.line, f.end, f.function) == (
        "oops", "BUG: kernel NULL pointer dereference in foo_bar", 1, 7, "foo_bar")


def test_excerpt_is_capped():
    frames = [f"[ 1.0]  frame_{i}+0x1/0x2" for i in range(500)]
    text = "\n".join(["[ 1.0] Kernel panic - not syncing: deep", "[ 1.0] Call Trace:", *frames])
    (f,) = classify(text)
    assert len(f.lines) == MAX_EXCERPT
    assert f.function == "frame_0"


def test_empty_and_junk():
    assert classify("") == []
    assert classify("\x00\x00\r\n\r\n\x1b[2J") == []


def test_compiler_suffixes_are_dropped():
    text = (
        "[ 1.0] Kernel panic - not syncing: x\n"
        "[ 1.0] Call Trace:\n"
        "[ 1.0]  dump_stack_lvl+0x44/0x5c\n"
        "[ 1.0]  panic+0x118/0x2f4\n"
        "[ 1.0]  ? _printk+0x68/0x83\n"
        "[ 1.0]  __handle_sysrq.cold+0x44/0x11c\n"
    )
    assert classify(text)[0].function == "__handle_sysrq"


# ---------------------------------------------------------------------------------------------
# silent
# ---------------------------------------------------------------------------------------------

def test_silent_when_idle_reaches_the_limit():
    text = load("clean-boot-verbose")
    f = classify(text, idle_seconds=300, idle_limit=120)[-1]
    assert f.kind == "silent" and f.outcome == "hang"
    assert f.title == "no console output for 300 s (limit 120 s)"
    assert f.line == len(text.rstrip("\n").split("\n"))
    assert classify(text, idle_seconds=119.5, idle_limit=120) == []
    assert classify(text, idle_seconds=300) == []
    assert classify("", idle_seconds=5, idle_limit=5)[0].line == 1


# ---------------------------------------------------------------------------------------------
# signatures, outcomes, helpers
# ---------------------------------------------------------------------------------------------

def test_signature_matches_title_function_and_excerpt():
    oops, panic = classify(load("oops-then-panic"))
    assert signature_matches(oops, r"NULL pointer dereference in fbcrash_ring_push")
    assert signature_matches(oops, r"^fbcrash_ring_push$")  # the function alone
    assert signature_matches(oops, r"^RIP: 0010:fbcrash_ring_push")  # an excerpt line, timestamps ignored
    assert signature_matches(oops, r"\[\s+1\.\d+\] #PF: supervisor")  # with timestamps too
    assert not signature_matches(oops, r"virtnet_poll")
    assert signature_matches(panic, r"fbcrash_ring_push")  # via the inherited function
    other = classify(load("warning"))[0]
    assert not signature_matches(other, r"NULL pointer dereference in fbcrash_ring_push")
    assert signature_matches(other, re.compile(r"WARNING in fbcrash_"))


def test_invalid_signature_is_a_value_error():
    with pytest.raises(ValueError, match="invalid signature"):
        compile_signature("(unclosed")
    (f,) = classify(load("warning"))
    with pytest.raises(ValueError):
        signature_matches(f, "[")


def test_outcome_table_covers_every_kind_with_real_outcome_kinds():
    assert set(OUTCOME_FOR_KIND) == set(KINDS)
    valid = {k.value for k in OutcomeKind}
    assert set(OUTCOME_FOR_KIND.values()) <= valid
    assert {"fail", "hang"} == set(OUTCOME_FOR_KIND.values())
    (f,) = classify(load("panic-no-rootfs"))
    assert outcome_for(f) == "fail"
    assert outcome_for(f, booted=False) == OutcomeKind.BOOT_FAILED.value


def test_finding_is_frozen_and_round_trips():
    (f,) = classify(load("hung-task"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.kind = "panic"  # type: ignore[misc]
    assert Finding.from_json(json.loads(json.dumps(f.to_json()))) == f


def test_summary():
    assert summary([]) == "no kernel report on the console"
    s = summary(classify(load("soft-lockup")) + classify(load("oops-then-panic")))
    assert s.startswith("soft-lockup: BUG: soft lockup in fbcrash_spin (console line 38)")
    assert s.endswith("; +2 more")


def test_fast_on_a_big_console():
    text = load("clean-boot-verbose") * 40 + load("oops-then-panic")  # ~1 MB
    t0 = time.perf_counter()
    findings = classify(text)
    assert time.perf_counter() - t0 < 5
    assert [f.kind for f in findings][-2:] == ["oops", "panic"]
    assert sum(f.kind == "reset" for f in findings) == 40  # every later banner is a reset


if __name__ == "__main__":
    if "--regen" in sys.argv:
        for case in CASES:
            print(write_expected(case))
    else:
        print(__doc__)
