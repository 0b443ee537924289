"""Reproducer judgements, composition and repeats, and the signature rule: pure logic, with
the scripted fake Remote where a guest is needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbisect.config.playbook import load_playbook
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.reproducers import ReproContext, boot_time, console, dmesg
from fleetbisect.stages import judge
from fleetbisect.step import reproduce
from fleetbisect.verdict import DEFAULT_POLICY, Outcome, OutcomeKind

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "console"
WARNING = """\
[    5.100000] ------------[ cut here ]------------
[    5.100100] WARNING: CPU: 0 PID: 1 at net/core/dev.c:1234 netdev_tidy+0x10/0x20
[    5.100200] Modules linked in: virtio_net
[    5.100300] CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-lab-fb0123456789ab #1
[    5.100400] RIP: 0010:netdev_tidy+0x10/0x20
[    5.100500] Call Trace:
[    5.100600]  <TASK>
[    5.100700]  netdev_tidy+0x10/0x20
[    5.100800]  </TASK>
[    5.100900] ---[ end trace 0000000000000000 ]---
"""


def playbook(tmp_path, text: str):
    path = tmp_path / "pb.yaml"
    path.write_text("name: t\n" + text)
    return load_playbook(path)


def test_dmesg_finds_a_warning_with_its_function(tmp_path):
    spec = playbook(tmp_path, "reproducer: {kind: dmesg}").reproducers[0]
    out = dmesg.judge(spec, "[    0.000000] Linux version 6.1.0 (x@y) (gcc) #1\n" + WARNING)
    assert out.kind is OutcomeKind.FAIL
    (finding,) = out.details["findings"]
    assert finding["kind"] == "warning" and finding["function"] == "netdev_tidy"
    assert dmesg.judge(spec, "[    0.000000] Linux version 6.1.0 (x@y) (gcc) #1\n").kind is OutcomeKind.PASS


def test_dmesg_fail_kinds_can_leave_warnings_alone(tmp_path):
    spec = playbook(tmp_path, "reproducer: {kind: dmesg, fail_kinds: [panic]}").reproducers[0]
    assert dmesg.judge(spec, WARNING).kind is OutcomeKind.PASS


@pytest.mark.parametrize("measure,dmesg_text,uptime,kind,seconds", [
    ("init", "[    1.650000] Run /init as init process\n", "9.0 1.0", OutcomeKind.PASS, 1.65),
    ("init", "[    4.200000] Run /sbin/init as init process\n", "1.0 1.0", OutcomeKind.FAIL, 4.2),
    ("init", "no timestamps here\n", "2.50 1.0", OutcomeKind.PASS, 2.5),
    ("uptime", "[    1.650000] Run /init as init process\n", "9.00 1.0", OutcomeKind.FAIL, 9.0),
    ("uptime", "", "2.75 1.0", OutcomeKind.PASS, 2.75),
])
def test_boot_time(tmp_path, measure, dmesg_text, uptime, kind, seconds):
    spec = playbook(tmp_path, f"reproducer: {{kind: boot-time, max: 3s, measure: {measure}}}").reproducers[0]
    out = boot_time.judge(spec, dmesg_text, uptime)
    assert out.kind is kind and out.details["seconds"] == seconds


def test_boot_time_that_cannot_be_measured_is_never_a_verdict(tmp_path):
    spec = playbook(tmp_path, "reproducer: {kind: boot-time, max: 3s}").reproducers[0]
    assert boot_time.judge(spec, "", "").kind is OutcomeKind.INFRA_ERROR


class TestConsole:
    REL = "6.1.0-lab-fb0123456789ab"

    def spec(self, tmp_path):
        return playbook(tmp_path, "reproducer: {kind: console, timeout: 30s}").reproducers[0]

    def test_pass_and_fail_lines(self, tmp_path):
        spec = self.spec(tmp_path)
        text = f"FLEETBISECT-READY release={self.REL}\nFLEETBISECT-RESULT: PASS\n"
        assert console.judge(text, spec, self.REL, exited=True).kind is OutcomeKind.PASS
        out = console.judge(text.replace("PASS", "FAIL"), spec, self.REL, exited=True)
        assert out.kind is OutcomeKind.FAIL and out.details["line"] == 2

    def test_a_verdict_from_another_kernel_is_wrong_kernel(self, tmp_path):
        text = "FLEETBISECT-READY release=6.1.0-lab-fbffffffffffff\nFLEETBISECT-RESULT: PASS\n"
        out = console.judge(text, self.spec(tmp_path), self.REL, exited=True)
        assert out.kind is OutcomeKind.WRONG_KERNEL

    def test_a_panic_is_a_failure_once_the_kernel_is_ours_and_a_boot_failure_before(self, tmp_path):
        panic = (GOLDEN / "sysrq-crash.log").read_text()
        spec = self.spec(tmp_path)
        from fleetbisect.console import kernel_release

        rel = kernel_release(panic)
        assert console.judge(panic, spec, rel, exited=True).kind is OutcomeKind.FAIL
        assert console.judge(panic, spec, self.REL, exited=True).kind is OutcomeKind.BOOT_FAILED

    def test_silence_is_a_hang_and_a_quiet_poweroff_a_failure(self, tmp_path):
        spec = self.spec(tmp_path)
        text = f"FLEETBISECT-READY release={self.REL}\n"
        assert console.judge(text, spec, self.REL, exited=False).kind is OutcomeKind.HANG
        assert console.judge(text, spec, self.REL, exited=True).kind is OutcomeKind.FAIL
        assert console.judge("", spec, self.REL, exited=True).kind is OutcomeKind.BOOT_FAILED


def test_console_reproducer_cannot_be_combined(tmp_path):
    from fleetbisect.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be combined"):
        playbook(tmp_path, "reproducer:\n  - {kind: console}\n  - {kind: dmesg}\n")


def ctx(tmp_path, guest):
    return ReproContext(guest, FakeRemote("host"), tmp_path, lambda s: None)


def test_composed_reproducers_run_in_order_and_stop_at_the_first_failure(tmp_path):
    pb = playbook(tmp_path, """\
reproducer:
  - {kind: command, command: first, timeout: 5s}
  - {kind: command, command: second, timeout: 5s}
  - {kind: command, command: third, timeout: 5s}
""")
    guest = FakeRemote("guest").on("second", exit_status=1)
    outcomes = reproduce(pb, ctx(tmp_path, guest))
    assert [o.kind for o in outcomes] == [OutcomeKind.PASS, OutcomeKind.FAIL]
    assert [c.command for c in guest.calls] == ["first", "second"]
    assert (tmp_path / "reproducer-1-command.log").exists() and (tmp_path / "reproducer-2-command.log").exists()


def test_repeats_keep_every_run_and_stop_early(tmp_path):
    from fleetbisect.remote.base import Result

    pb = playbook(tmp_path, "reproducer: {kind: command, command: flaky, timeout: 5s}\npolicy: {repeats: 5}\n")
    ok, bad = Result("flaky", 0, "", "", 0.0), Result("flaky", 1, "", "", 0.0)
    guest = FakeRemote("guest").on("flaky", [ok, ok, bad, ok])
    outcomes = reproduce(pb, ctx(tmp_path, guest))
    assert [o.kind for o in outcomes] == [OutcomeKind.PASS, OutcomeKind.PASS, OutcomeKind.FAIL]
    assert sorted(p.name for p in tmp_path.glob("reproducer-run*.log")) == [
        "reproducer-run1.log", "reproducer-run2.log", "reproducer-run3.log"]


def _with_console(kind, title, function):
    return Outcome(kind, "it broke", {"console": [{"kind": "oops", "title": title, "line": 3, "end": 9,
                                                   "function": function, "lines": [title]}]})


def test_a_failure_that_does_not_match_the_signature_is_unrelated_and_skipped(tmp_path):
    pb = playbook(tmp_path, "reproducer: {kind: dmesg}\nsignature: {pattern: virtnet_poll}\n")
    ours = _with_console(OutcomeKind.FAIL, "BUG: kernel NULL pointer dereference in virtnet_poll", "virtnet_poll")
    other = _with_console(OutcomeKind.FAIL, "general protection fault in ext4_map_blocks", "ext4_map_blocks")
    got = judge.apply_signature([ours, other, Outcome(OutcomeKind.PASS, "ok")], pb.signature, pb.policy_map())
    assert [o.kind for o in got] == [OutcomeKind.FAIL, OutcomeKind.UNRELATED, OutcomeKind.PASS]
    assert "does not match the signature" in got[1].summary and got[1].details["was"] == "fail"


def test_the_signature_can_name_the_outcome_kind(tmp_path):
    pb = playbook(tmp_path, "reproducer: {kind: dmesg}\nsignature: {outcomes: [hang]}\n")
    got = judge.apply_signature([Outcome(OutcomeKind.FAIL, "crash"), Outcome(OutcomeKind.HANG, "stuck")],
                                pb.signature, pb.policy_map())
    assert [o.kind for o in got] == [OutcomeKind.UNRELATED, OutcomeKind.HANG]
    assert DEFAULT_POLICY[OutcomeKind.UNRELATED] == "skip"


def test_console_reports_explain_a_hang(tmp_path):
    text = (GOLDEN / "soft-lockup.log").read_text()
    (tmp_path / "console.log").write_text(text)
    got = judge.explain([Outcome(OutcomeKind.HANG, "transfer 4/12 stalled")],
                        judge.console_findings(tmp_path / "console.log"))
    assert "console: " in got[0].summary and "soft lockup" in got[0].summary
    assert got[0].details["console"][0]["kind"] == "soft-lockup" and "console.log" in got[0].evidence
