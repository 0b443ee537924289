"""Steps whose guest is reached ONLY through the QEMU guest agent: the lab host (real sshd)
starts QEMU with the agent's virtio-serial channel, the guest's initramfs runs Debian's qemu-ga,
and readiness, the kernel check, the reproducer and dmesg all go through it."""

from __future__ import annotations

import pytest
import yaml

from fleetbisect.config.inventory import load_inventory
from fleetbisect.lab.agent import append_overlay_command, ensure_agent_overlay
from fleetbisect.lab.demo import write_lab_inventory
from fleetbisect.verdict import OutcomeKind, Verdict

from .conftest import NO_SSH
from .test_step_lab import step

BUILD = "make olddefconfig && make -j2"


@pytest.fixture
def agent_host_cfg(lab_host, assets, tmp_path):
    """The lab inventory with `reach: agent` and no SSH details for the guest at all."""
    inv = write_lab_inventory(tmp_path / "agent.yaml", [lab_host], assets)
    data = yaml.safe_load(inv.read_text())
    data["hosts"][lab_host.name]["target"]["guest"] = {"reach": "agent"}
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_inventory([inv]).host(lab_host.name)


def agent_playbook(playbook_variant, assets, command: str, **reproducer):
    """The lab playbook whose build also puts qemu-ga into the guest, with a command reproducer."""
    overlay = ensure_agent_overlay(assets)
    return playbook_variant({
        "build": {"command": append_overlay_command(BUILD, overlay)},
        "reproducer": [{"kind": "command", "command": command, "timeout": "30s", **reproducer}],
    })[0]


def test_a_guest_without_ssh_is_bisected_through_the_agent(
    tree, agent_host_cfg, assets, playbook_variant, lab_repo, tmp_path
):
    # This commit's guest starts no SSH server; here its network goes down too before the test.
    playbook = agent_playbook(
        playbook_variant, assets,
        "ip link set eth0 down; echo via-agent; uname -r; test ! -e /run/dropbear.pid",
        pass_patterns=["^via-agent$", "^6\\.1\\.0-"],
    )
    sha = lab_repo.shas[NO_SSH]
    _, rec = step(tree, agent_host_cfg, playbook, sha, tmp_path)
    assert rec.verdict is Verdict.GOOD, rec.reason
    assert [o.kind for o in rec.outcomes] == [OutcomeKind.PASS]
    # the kernel check ran through the agent: the guest proved it runs this build
    assert rec.release.endswith(f"-fb{sha[:12]}")
    log = (tmp_path / "steps" / "s" / "reproducer.log").read_text()
    assert "via-agent" in log and assets.kernel_release in log
    assert "Linux version" in (tmp_path / "steps" / "s" / "dmesg.log").read_text()
    argv = (tmp_path / "steps" / "s" / "commands.txt").read_text()
    assert "name=org.qemu.guest_agent.0" in argv and "hostfwd" not in argv


def test_a_failing_command_through_the_agent_is_a_fail_with_its_exit_status(
    tree, agent_host_cfg, assets, playbook_variant, lab_repo, tmp_path
):
    playbook = agent_playbook(playbook_variant, assets, "echo checksum mismatch >&2; exit 3")
    _, rec = step(tree, agent_host_cfg, playbook, lab_repo.shas[3], tmp_path)
    assert rec.verdict is Verdict.BAD, rec.reason
    (fail,) = rec.outcomes
    assert fail.kind is OutcomeKind.FAIL and fail.details["exit_status"] == 3
    assert "checksum mismatch" in (tmp_path / "steps" / "s" / "reproducer.log").read_text()


def test_reach_agent_with_no_agent_in_the_guest_is_boot_failed_never_fail(
    tree, agent_host_cfg, playbook_variant, lab_repo, tmp_path
):
    # The plain lab build: QEMU has the channel, the guest runs no qemu-ga.
    playbook, _ = playbook_variant({"boot": {"timeout": "15s"},
                                    "reproducer": [{"kind": "command", "command": "true", "timeout": "10s"}]})
    _, rec = step(tree, agent_host_cfg, playbook, lab_repo.shas[3], tmp_path)
    assert rec.verdict is Verdict.SKIP, rec.reason
    (outcome,) = rec.outcomes
    assert outcome.kind is OutcomeKind.BOOT_FAILED
    assert "did not answer the guest agent within 15s" in outcome.summary
    # the kernel did start (its console was fetched as evidence): it is the agent that never came
    assert "Linux version" in (tmp_path / "steps" / "s" / "console.log").read_text(errors="replace")
