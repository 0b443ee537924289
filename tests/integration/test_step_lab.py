"""One step at a time against the real lab: sshd host, QEMU guest, real builds."""

from __future__ import annotations

import json
import shutil

from fleetbisect.step import Lab, run_step
from fleetbisect.ui import UI
from fleetbisect.verdict import OutcomeKind, Verdict

from .conftest import BUILD_FAILS, CULPRIT, NO_SSH


def step(tree, host_cfg, playbook, sha, tmp_path, name="s"):
    tree.checkout(sha)
    lab = Lab(tree.path, host_cfg, playbook, UI(quiet=True))
    return lab, run_step(lab, 1, sha, "subject", tmp_path / "steps" / name)


def test_good_commit_passes_and_an_unchanged_artifact_is_not_sent_again(
    tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    playbook, _ = playbook_variant()
    lab, rec = step(tree, host_cfg, playbook, lab_repo.shas[3], tmp_path, "a")
    assert rec.verdict is Verdict.GOOD, rec.reason
    assert [o.kind for o in rec.outcomes] == [OutcomeKind.PASS]
    iterations = rec.outcomes[0].details["iterations"]
    assert len(iterations) == playbook.reproducers[0].iterations
    assert all(i["bytes"] == playbook.reproducers[0].size for i in iterations)
    assert set(rec.durations) >= {"build", "push", "boot", "ready", "reproduce", "cleanup"}
    # The guest proved it runs this very build.
    assert rec.release.endswith(f"-fb{lab_repo.shas[3][:12]}")
    console = (tmp_path / "steps" / "a" / "console.log").read_text(errors="replace")
    assert f"release={rec.release}" in console
    assert "Linux version" in (tmp_path / "steps" / "a" / "dmesg.log").read_text()
    assert "steps/a/dmesg.log" in rec.evidence
    result = json.loads((tmp_path / "steps" / "a" / "result.json").read_text())
    assert result["verdict"] == "good"

    # Same commit again: the kernel is unchanged, so it costs no transfer.
    rec2 = run_step(lab, 2, lab_repo.shas[3], "subject", tmp_path / "steps" / "b")
    assert rec2.verdict is Verdict.GOOD
    assert "kernel" not in rec2.pushed


def test_seeded_regression_is_a_hang_caught_by_the_stall_or_the_transfer_timeout(
    tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    # stall 2 s inside a 3 s timeout: on a loaded machine either may end the copy (test_stall_lab
    # pins the stall); both are a hang with the bytes it moved
    playbook, _ = playbook_variant({"reproducer": {"timeout": "3s", "stall": "2s"}})
    _, rec = step(tree, host_cfg, playbook, lab_repo.shas[CULPRIT], tmp_path)
    assert rec.verdict is Verdict.BAD, rec.reason
    (hang,) = rec.outcomes
    assert hang.kind is OutcomeKind.HANG
    assert "stalled" in hang.summary
    iterations = hang.details["iterations"]
    assert iterations[-1]["timed_out"] or iterations[-1]["stalled"]
    assert iterations[-1]["samples"][-1][1] == iterations[-1]["bytes"]
    assert len(iterations) < playbook.reproducers[0].iterations


def test_build_failure_is_a_skip(tree, host_cfg, playbook_variant, lab_repo, tmp_path):
    playbook, _ = playbook_variant()
    _, rec = step(tree, host_cfg, playbook, lab_repo.shas[BUILD_FAILS], tmp_path)
    assert rec.verdict is Verdict.SKIP
    assert rec.outcomes[0].kind is OutcomeKind.BUILD_FAILED
    assert "push" not in rec.durations  # nothing reached the host
    assert (tmp_path / "steps" / "s" / "build.log").stat().st_size > 0


def test_a_guest_that_never_answers_ssh_is_a_skip(tree, host_cfg, playbook_variant, lab_repo, tmp_path):
    playbook, _ = playbook_variant({"boot": {"timeout": "8s"}})
    _, rec = step(tree, host_cfg, playbook, lab_repo.shas[NO_SSH], tmp_path)
    assert rec.verdict is Verdict.SKIP, rec.reason
    assert rec.outcomes[0].kind is OutcomeKind.BOOT_FAILED
    assert "did not answer SSH within 8s" in rec.outcomes[0].summary
    # The kernel ran (its console says so, kept as evidence): it is the SSH server that never
    # came, not a silent setup mistake. (How far it got in 8 s depends on the machine's load.)
    assert "Linux version" in (tmp_path / "steps" / "s" / "console.log").read_text(errors="replace")
    assert not rec.outcomes[0].details.get("console_silent")


def test_a_guest_running_another_build_is_wrong_kernel_never_good(
    tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    # Build commit 2 and keep its initramfs; then a "build" of commit 3 that ships the old one,
    # as a stale artifact or a box that silently boots the previous kernel would.
    playbook, _ = playbook_variant()
    tree.checkout(lab_repo.shas[2])
    step(tree, host_cfg, playbook, lab_repo.shas[2], tmp_path, "old")
    stale = tmp_path / "stale-initramfs.img"
    shutil.copy(tree.path / "initramfs.img", stale)
    sneaky, _ = playbook_variant({"build": {
        "command": f"make olddefconfig && make -j2 && cp {stale} initramfs.img"}})
    _, rec = step(tree, host_cfg, sneaky, lab_repo.shas[3], tmp_path, "new")
    assert rec.verdict is Verdict.SKIP, rec.reason
    assert rec.outcomes[0].kind is OutcomeKind.WRONG_KERNEL
    assert lab_repo.shas[2][:12] in rec.outcomes[0].summary


def test_a_build_that_does_not_stamp_the_commit_is_never_tested(
    tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    playbook, _ = playbook_variant()
    step(tree, host_cfg, playbook, lab_repo.shas[2], tmp_path, "old")
    lazy, _ = playbook_variant({"build": {"command": "true"}})  # leaves commit 2's artifacts
    _, rec = step(tree, host_cfg, lazy, lab_repo.shas[4], tmp_path, "new")
    # Not a skip (every commit would be skipped alike): the setup is wrong, the run stops.
    assert rec.verdict is Verdict.ABORT
    assert rec.outcomes[0].kind is OutcomeKind.SETUP_ERROR
    assert "did not stamp" in rec.outcomes[0].summary


def test_a_guest_reached_through_the_hosts_ssh_connection(
    tree, lab_host, assets, playbook_variant, lab_repo, tmp_path
):
    """`via: host`: the guest's sshd is reached with direct-tcpip through the host's own SSH
    connection (for guests only the host can see); its host key is still checked."""
    from fleetbisect.config.inventory import load_inventory
    from fleetbisect.lab.demo import write_lab_inventory

    inv = write_lab_inventory(tmp_path / "via-host.yaml", [lab_host], assets, via="host")
    host_cfg = load_inventory([inv]).host(lab_host.name)
    assert host_cfg.target.guest.via == "host"
    playbook, _ = playbook_variant()
    _, rec = step(tree, host_cfg, playbook, lab_repo.shas[3], tmp_path)
    assert rec.verdict is Verdict.GOOD, rec.reason
    assert sum(i["bytes"] for i in rec.outcomes[0].details["iterations"]) == 12 * playbook.reproducers[0].size
