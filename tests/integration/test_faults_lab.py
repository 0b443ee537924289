"""A fault is never a verdict, against the real lab: a reproducer that cannot work, a host that
refuses the guest tunnel, a QEMU that never lets the kernel speak, and a bisect driven by
`git bisect run` through a configuration that crashes. Each stops with the reason; none marks
a commit."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from fleetbisect.lab.demo import write_lab_inventory
from fleetbisect.lab.vmhost import LabHost

FB = [sys.executable, "-m", "fleetbisect"]


def fleetbisect(*args, cwd=None, timeout=600):
    return subprocess.run([*FB, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def probes(p) -> dict[str, dict]:
    """`fleetbisect --json check` events by probe name."""
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {e["name"]: e for e in events if e["event"] == "probe"}


def marks(repo_or_run_log: str) -> list[str]:
    return [line for line in repo_or_run_log.splitlines()
            if line.startswith(("git bisect good", "git bisect bad", "git bisect skip"))]


def test_scp_stress_into_dev_null_is_a_setup_error_that_stops_step(
    tree, inventory_file, lab_host, playbook_variant, lab_repo, tmp_path
):
    """Every transfer "fails" with 0 bytes written: today's code marked every commit bad."""
    _, playbook = playbook_variant({"reproducer": {"dest": "/dev/null"}})
    tree.checkout(lab_repo.shas[3])
    p = fleetbisect("step", "--host", lab_host.name, "--playbook", str(playbook), "--inventory",
                    str(inventory_file), "--repo", str(tree.path), "--evidence-dir", str(tmp_path / "ev"))
    assert p.returncode == 128, p.stderr
    (result,) = (tmp_path / "ev").rglob("result.json")
    data = json.loads(result.read_text())
    assert data["verdict"] == "abort"
    assert data["outcomes"][0]["kind"] == "setup-error"
    assert "/dev/null exists and is not a regular file" in data["outcomes"][0]["summary"]


def test_a_host_that_refuses_the_guest_tunnel_fails_check_and_aborts_step(
    tree, assets, playbook_variant, lab_repo, tmp_path
):
    with LabHost.start(tmp_path / "strict-host", name="strict-host",
                       sshd_options=("AllowTcpForwarding no",)) as host:
        inv = write_lab_inventory(tmp_path / "strict.yaml", [host], assets, via="host")
        _, playbook = playbook_variant()
        args = ["--host", host.name, "--playbook", str(playbook), "--inventory", str(inv)]
        check = fleetbisect("--json", "check", *args)
        assert check.returncode == 1, check.stdout + check.stderr
        path = probes(check)["guest path"]
        assert not path["ok"] and "refuses to forward" in path["detail"]
        tree.checkout(lab_repo.shas[3])
        step = fleetbisect("step", *args, "--repo", str(tree.path), "--evidence-dir", str(tmp_path / "ev"))
        assert step.returncode == 128, step.stderr
        (result,) = (tmp_path / "ev").rglob("result.json")
        outcome = json.loads(result.read_text())["outcomes"][0]
        assert outcome["kind"] == "setup-error" and "refuses to forward" in outcome["summary"]


def test_check_says_when_the_running_kernel_is_not_verified(inventory_file, lab_host, playbook_variant):
    _, playbook = playbook_variant({"build": {"localversion": False, "release_file": None}})
    p = fleetbisect("--json", "check", "--host", lab_host.name, "--playbook", str(playbook),
                    "--inventory", str(inventory_file))
    assert p.returncode == 0, p.stdout + p.stderr
    found = probes(p)
    identity = found["kernel identity"]
    assert identity["ok"] and identity["warning"] and "NOT verified" in identity["detail"]
    # the path to the guest was opened; nothing runs there now
    assert found["guest path"]["ok"] and "no guest listens now" in found["guest path"]["detail"]


def _silent_run(lab_repo, inventory_file, lab_host, playbook, run_dir, *extra):
    return fleetbisect(
        "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file),
        "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
        "--run-dir", str(run_dir), *extra,
    )


def test_a_qemu_that_never_runs_the_kernel_stops_the_run_instead_of_skipping_the_range(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    # -S: QEMU starts with its CPU stopped, so not one byte reaches the console: a setup
    # mistake of the same shape as a wrong machine type or a missing firmware.
    _, playbook = playbook_variant({"boot": {"qemu_args": ["-S"], "timeout": "4s"}})

    with_endpoints = _silent_run(lab_repo, inventory_file, lab_host, playbook, tmp_path / "a")
    assert with_endpoints.returncode == 128, with_endpoints.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["status"] == "setup-error" and len(report["steps"]) == 1
    assert "kernel never ran" in report["message"] and "no console output at all" in report["message"]

    without = _silent_run(lab_repo, inventory_file, lab_host, playbook, tmp_path / "b", "--no-endpoint-check")
    assert without.returncode == 128, without.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["status"] == "setup-error" and len(report["steps"]) == 2
    assert "setup mistake" in report["message"]
    assert "first bad commit" not in without.stdout
    assert not [m for m in marks((tmp_path / "b" / "bisect.log").read_text()) if "skip" not in m]


def test_git_bisect_run_stops_on_a_configuration_that_crashes(lab_repo, inventory_file, lab_host, playbook_variant,
                                                              tmp_path):
    """`connect_timeout: .inf` passed validation and crashed in the step with exit 1, which git
    bisect run read as "bad" and so named a wrong first bad commit."""
    inv = yaml.safe_load(inventory_file.read_text())
    inv["hosts"][lab_host.name]["ssh"]["connect_timeout"] = float("inf")
    bad_inv = tmp_path / "inf.yaml"
    bad_inv.write_text(yaml.safe_dump(inv))
    _, playbook = playbook_variant()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(lab_repo.path), str(clone)], check=True)
    git = lambda *a: subprocess.run(["git", "-C", str(clone), *a], capture_output=True, text=True)  # noqa: E731
    assert git("bisect", "start", lab_repo.bad, lab_repo.good).returncode == 0
    run = git("bisect", "run", *FB, "step", "--host", lab_host.name, "--playbook", str(playbook),
              "--inventory", str(bad_inv), "--evidence-dir", str(tmp_path / "ev"))
    assert run.returncode != 0
    assert "first bad commit" not in run.stdout
    log = git("bisect", "log").stdout
    assert not [m for m in marks(log) if lab_repo.good not in m and lab_repo.bad not in m], log


def test_check_runs_the_reproducer_preflight_in_a_guest_that_answers(
    inventory_file, host_cfg, lab_host, assets, playbook_variant, ssh, tmp_path
):
    """With a guest up at the inventory's address, `check` logs in and finds that scp-stress
    into /dev/null cannot work, before any run marks a commit."""
    from fleetbisect.deadline import Deadline
    from fleetbisect.targets import qemu as boot_qemu
    from fleetbisect.stages.ready import GuestEndpoint, probe_banner

    _, playbook = playbook_variant({"reproducer": {"dest": "/dev/null"}})
    paths = boot_qemu.VMPaths.under(host_cfg.work_dir)
    from fleetbisect.config.playbook import load_playbook

    loaded = load_playbook(playbook)
    argv = boot_qemu.qemu_argv(host_cfg.target, loaded.boot, kernel=str(assets.kernel),
                               initrd=str(assets.base_initramfs), paths=paths)
    assert boot_qemu.start_vm(ssh, argv, paths, Deadline.after(60)).ok
    try:
        guest = host_cfg.target.guest
        endpoint = GuestEndpoint(guest.address, guest.port)
        deadline = Deadline.after(120)
        while not probe_banner(endpoint) and not deadline.expired:
            assert boot_qemu.vm_alive(ssh, paths, Deadline.after(15)), "the lab guest did not boot"
        p = fleetbisect("--json", "check", "--host", lab_host.name, "--playbook", str(playbook),
                        "--inventory", str(inventory_file))
    finally:
        boot_qemu.stop_vm(ssh, paths, Deadline.after(60))
    assert p.returncode == 1, p.stdout + p.stderr
    found = probes(p)
    assert found["guest path"]["ok"] and "a guest answers" in found["guest path"]["detail"]
    repro = found["reproducer scp-stress"]
    assert not repro["ok"] and "/dev/null exists and is not a regular file" in repro["detail"]
