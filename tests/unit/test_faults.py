"""A fault is never a verdict: the guard around every command, the guest's environment and the
host link told apart from the kernel, setup mistakes told apart from commits, and a suspect never
printed as the answer. Pure logic with the scripted fake Remote; the lab tests drive the same
paths for real (tests/integration/test_faults_lab.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleetbisect import cli
from fleetbisect.config.playbook import load_playbook
from fleetbisect.deadline import Deadline
from fleetbisect.remote.base import RemoteError, Result
from fleetbisect.remote.fake import FakeRemote
from fleetbisect.report import Report, answer_line
from fleetbisect.reproducers import ReproContext, guest_lost
from fleetbisect.runrules import SetupWatch as _SetupWatch
from fleetbisect.stages.build import build
from fleetbisect.step import StepRecord, reproduce
from fleetbisect.verdict import Outcome, OutcomeKind, Verdict, decide, never_ran

K = OutcomeKind


# --- one guard: an exception that escapes a command exits 128, never 1 ------------------------


@pytest.mark.parametrize("command", ["step", "run", "check"])
def test_an_escaping_exception_exits_128_with_one_line(command, monkeypatch, capsys):
    def boom(args):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(cli, "_load", boom)
    argv = [command, "--host", "h", "--playbook", "p.yaml"]
    if command == "run":
        argv += ["--good", "a", "--bad", "b"]
    assert cli.main(argv) == 128
    err = capsys.readouterr().err
    assert "OverflowError: cannot convert float infinity to integer" in err
    assert "Traceback" not in err
    assert cli.main(["--debug", *argv]) == 128
    assert "Traceback" in capsys.readouterr().err


# --- a suspect is never printed as the answer -------------------------------------------------


def _report(tmp_path, status, culprit):
    r = Report(tmp_path, "/repo", "a" * 40, "b" * 40, "h", "pb.yaml", "d" * 64)
    r.status, r.culprit, r.culprit_subject, r.message = status, culprit, "net: break it", "why"
    return r


def test_an_unconfirmed_culprit_is_a_suspect_on_stdout(tmp_path, capsys):
    from fleetbisect.ui import UI

    code = cli.print_result(_report(tmp_path, "unconfirmed", "c" * 40), UI())
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert "first bad commit" not in "\n".join(out)
    assert out[-1].startswith("suspect (NOT confirmed, unconfirmed): " + "c" * 40)


def test_a_found_culprit_is_the_answer(tmp_path, capsys):
    from fleetbisect.ui import UI

    assert cli.print_result(_report(tmp_path, "found", "c" * 40), UI()) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"first bad commit: {'c' * 40} net: break it"
    assert answer_line("inconclusive", None, None, "only skips").startswith("no culprit (inconclusive)")


# --- taxonomy ---------------------------------------------------------------------------------


def test_setup_errors_abort_at_once_and_build_timeouts_are_their_own_kind():
    assert decide([Outcome(K.SETUP_ERROR, "dest is /dev/null")], attempt=1, retries=2).verdict is Verdict.ABORT
    d = decide([Outcome(K.BUILD_TIMEOUT, "build timed out after 60s")])
    assert d.verdict is Verdict.SKIP and d.reason.startswith("build-timeout:")


def test_never_ran_signatures():
    silent = Outcome(K.BOOT_FAILED, "guest did not answer SSH within 5s (no console output at all)",
                     {"console_silent": True})
    spoke = Outcome(K.BOOT_FAILED, "guest did not answer SSH within 5s")
    assert never_ran([silent]) == never_ran([Outcome(silent.kind, silent.summary.replace("5s", "7s"),
                                                     silent.details)])
    assert never_ran([spoke]) is None  # the kernel printed something: it ran
    assert never_ran([Outcome(K.PASS, "ok")]) is None
    wrong = [Outcome(K.WRONG_KERNEL, "guest runs '6.1.0', the build is '6.1.0-fb0123456789ab'")]
    assert never_ran(wrong) == never_ran([Outcome(K.WRONG_KERNEL, "guest runs '6.1.0', the build is '6.1.0-fbba9876543210'")])


def _rec(verdict, *outcomes):
    return StepRecord(1, "c" * 40, "s", verdict, "r", list(outcomes))


def test_the_same_pre_kernel_failure_twice_before_any_kernel_ran_is_a_setup_mistake():
    silent = Outcome(K.BOOT_FAILED, "QEMU exited before the guest answered SSH (no console output at all)",
                     {"console_silent": True})
    watch = _SetupWatch()
    watch.saw(_rec(Verdict.SKIP, Outcome(K.BUILD_FAILED, "build failed (exit 2)")))  # says nothing
    watch.saw(_rec(Verdict.SKIP, silent))
    assert watch.mistake() is None  # once could be the commit
    watch.saw(_rec(Verdict.SKIP, silent))
    assert "setup mistake" in watch.mistake() and "no console output at all" in watch.mistake()


def test_a_kernel_that_ran_once_means_later_silent_boots_are_commits():
    silent = Outcome(K.BOOT_FAILED, "QEMU exited (no console output at all)", {"console_silent": True})
    watch = _SetupWatch()
    watch.saw(_rec(Verdict.GOOD, Outcome(K.PASS, "3 transfers")))
    watch.saw(_rec(Verdict.SKIP, silent))
    watch.saw(_rec(Verdict.SKIP, silent))
    assert watch.mistake() is None


def test_different_pre_kernel_failures_are_not_one_mistake():
    watch = _SetupWatch()
    watch.saw(_rec(Verdict.SKIP, Outcome(K.WRONG_KERNEL, "guest runs 'a'")))
    watch.saw(_rec(Verdict.SKIP, Outcome(K.BOOT_FAILED, "x (no console output at all)", {"console_silent": True})))
    assert watch.mistake() is None


# --- the guest's environment and the host link are not the kernel -------------------------------


class Guest(FakeRemote):
    """A guest whose uploads fail with `error` (a RemoteError message), or None for success."""

    def __init__(self, error: str | None = None):
        super().__init__("guest")
        self.error = error

    def put_stream(self, source, size, remote_path, *, deadline, progress=None):
        if self.error:
            raise RemoteError(self.name, self.error)
        return super().put_stream(source, size, remote_path, deadline=deadline, progress=progress)


class Host(FakeRemote):
    generation = 1


def _pb(tmp_path, text):
    path = tmp_path / "pb.yaml"
    path.write_text("name: t\n" + text)
    return load_playbook(path)


def _ctx(tmp_path, guest, host):
    return ReproContext(guest, host, tmp_path, lambda s: None, host_generation=getattr(host, "generation", None))


STRESS = "reproducer: {kind: scp-stress, size: 4K, iterations: 2, timeout: 5s, dest: /tmp/x}\n"


@pytest.mark.parametrize("error", [
    "upload to /tmp/x failed: [Errno 28] No space left on device",
    "upload to /tmp/x failed: Permission denied",
    "/tmp/x: 0 bytes written, expected 4096",
])
def test_a_write_the_guest_filesystem_refused_is_infra_not_bad(tmp_path, error):
    out = reproduce(_pb(tmp_path, STRESS), _ctx(tmp_path, Guest(error), Host("host")))
    assert [o.kind for o in out] == [K.INFRA_ERROR]
    assert "guest's environment, not its kernel" in out[0].summary


def test_a_full_guest_disk_found_after_a_failure_is_infra(tmp_path):
    guest = Guest("upload to /tmp/x failed: Failure")  # what sftp-server says for ENOSPC
    calls = []

    def preflight(call):
        calls.append(call)
        # the first preflight (before the run) is fine; after the failure the disk is full
        return Result(call.command, 0, "" if len(calls) == 1 else "only 0 KiB free for /tmp/x", "", 0.0)

    guest.on(__import__("re").compile("fleetbisect-probe"), preflight)
    out = reproduce(_pb(tmp_path, STRESS), _ctx(tmp_path, guest, Host("host")))
    assert [o.kind for o in out] == [K.INFRA_ERROR] and "only 0 KiB free" in out[0].summary


def test_a_guest_that_vanished_mid_transfer_while_the_host_is_fine_is_the_kernel(tmp_path):
    guest = Guest("upload to /tmp/x failed: Socket is closed")
    out = reproduce(_pb(tmp_path, STRESS), _ctx(tmp_path, guest, Host("host")))
    # the preflight after the failure cannot say more (fake guest answers ""), the message names
    # no environment fault, and the host still answers: the guest's network died
    assert [o.kind for o in out] == [K.FAIL]


def test_a_reproducer_that_cannot_work_is_a_setup_error(tmp_path):
    guest = Guest()
    guest.on(__import__("re").compile("fleetbisect-probe"), stdout="dest /dev/null exists and is not a regular file\n")
    out = reproduce(_pb(tmp_path, STRESS.replace("/tmp/x", "/dev/null")), _ctx(tmp_path, guest, Host("host")))
    assert [o.kind for o in out] == [K.SETUP_ERROR]
    assert "/dev/null" in out[0].summary
    assert not [c for c in guest.calls if c.kind == "put"]  # nothing was even tried
    assert decide(out).verdict is Verdict.ABORT


def test_a_guest_lost_while_the_host_link_was_reconnected_is_infra(tmp_path):
    host = Host("host")
    ctx = _ctx(tmp_path, Guest(), host)
    assert guest_lost(ctx, "transfer 3/15 failed", K.FAIL, {}).kind is K.FAIL
    host.generation = 2  # the host connection was cut and silently re-established
    lost = guest_lost(ctx, "transfer 3/15 failed", K.FAIL, {})
    assert lost.kind is K.INFRA_ERROR and "re-established" in lost.summary


# --- builds: a timeout is a timeout, an unstamped release is the setup ---------------------------


def _tree(tmp_path: Path) -> tuple[Path, str]:
    tree = tmp_path / "tree"
    tree.mkdir()
    for args in (["init", "-q"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                  "--allow-empty", "-m", "one"]):
        subprocess.run(["git", "-C", str(tree), *args], check=True)
    sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    return tree, sha


def test_a_build_that_runs_out_of_time_is_a_build_timeout(tmp_path):
    tree, sha = _tree(tmp_path)
    pb = _pb(tmp_path, "build: {command: 'exec sleep 30', timeout: 1s}\n" + STRESS)
    built = build(tree, pb, sha, tmp_path / "build.log", Deadline.after(pb.build.timeout))
    assert not built.ok and built.kind is K.BUILD_TIMEOUT and "timed out" in built.summary


def test_a_build_that_ignores_the_stamp_is_refused_as_a_setup_error(tmp_path):
    tree, sha = _tree(tmp_path)
    pb = _pb(tmp_path, "build: {command: 'mkdir -p include/config arch/x86/boot && echo 6.1.0 > "
                       "include/config/kernel.release && echo k > arch/x86/boot/bzImage'}\n" + STRESS)
    built = build(tree, pb, sha, tmp_path / "build.log", Deadline.after(60))
    assert not built.ok and built.kind is K.SETUP_ERROR
    assert f"-fb{sha[:12]}" in built.summary and "LOCALVERSION" in built.summary
