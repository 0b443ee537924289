"""Stall detection and the transfer methods against the real lab: a bad kernel's copy is a hang
`stall` seconds after its last byte moved (read from the evidence, not from a clock around the
test), and each method copies every byte into a good kernel's guest."""

from __future__ import annotations

import json

import pytest

from fleetbisect.step import Lab, run_step
from fleetbisect.ui import UI
from fleetbisect.verdict import OutcomeKind, Verdict

from .conftest import CULPRIT

# how the bytes travel: from here by each method, or from the VM host (source: host)
METHODS = [{"method": "openssh-scp"}, {"method": "scp"}, {"method": "sftp"}, {"source": "host"}]
IDS = ["openssh-scp", "scp", "sftp", "source-host"]


def step(tree, host_cfg, playbook, sha, step_dir):
    tree.checkout(sha)
    return run_step(Lab(tree.path, host_cfg, playbook, UI(quiet=True)), 1, sha, "subject", step_dir)


@pytest.mark.parametrize("how", METHODS, ids=IDS)
def test_a_bad_kernel_is_a_hang_within_stall_plus_2s_of_its_last_byte(
    how, tree, host_cfg, playbook_variant, lab_repo, tmp_path
):
    playbook, _ = playbook_variant({"reproducer": {"size": "8M", "iterations": 2, "timeout": "60s", "stall": "2s",
                                                  **how}})
    rec = step(tree, host_cfg, playbook, lab_repo.shas[CULPRIT], tmp_path / "s")
    assert rec.verdict is Verdict.BAD, rec.reason
    (hang,) = rec.outcomes
    assert hang.kind is OutcomeKind.HANG, hang.summary
    assert "no byte moved for 2s" in hang.summary
    last = hang.details["iterations"][-1]
    assert last["stalled"] and not last["timed_out"]
    assert 0 < last["bytes"] < 8 << 20  # it stopped part-way, where the samples say
    assert last["samples"][-1][1] == last["bytes"]
    assert last["stalled_at_s"] - last["last_progress_s"] >= 2
    # the answer (the host checked, the outcome made) within stall + 2 s of the last byte
    assert hang.details["ended_s"] - last["last_progress_s"] <= 2 + 2, last
    # the log has the samples of every transfer, the stalled one included
    log = [json.loads(x) for x in (tmp_path / "s" / "reproducer.log").read_text().splitlines()]
    # ... and the reproducer ended with that answer (not the 60 s timeout, not another transfer)
    assert log[-2].get("stalled") and log[-1] == {"iteration": last["iteration"], "ended_s": hang.details["ended_s"]}
    assert any(x.get("stalled") for x in log)
    assert all("samples" in x for x in log if "bytes" in x)


@pytest.mark.parametrize("how", [METHODS[0], METHODS[1], METHODS[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_each_way_copies_every_byte_into_a_good_guest(how, tree, host_cfg, playbook_variant,
                                                      lab_repo, tmp_path):
    playbook, _ = playbook_variant({"reproducer": {"size": "3M", "iterations": 2, "dest": "/tmp/stress.bin",
                                                  **how}})
    rec = step(tree, host_cfg, playbook, lab_repo.shas[3], tmp_path / "s")
    assert rec.verdict is Verdict.GOOD, rec.reason
    (ok,) = rec.outcomes
    assert {k: ok.details[k] for k in how} == how
    assert [i["bytes"] for i in ok.details["iterations"]] == [3 << 20, 3 << 20]
    # every byte arrived: the guest holds a file of the full size
    assert rec.durations["reproduce"] > 0
