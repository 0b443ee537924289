"""Whole commands against the real lab, through the real command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

from .conftest import CULPRIT

FB = [sys.executable, "-m", "fleetbisect"]


def fleetbisect(*args, cwd=None, timeout=900):
    return subprocess.run([*FB, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_run_finds_the_seeded_culprit_and_writes_the_report(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    _, playbook = playbook_variant({"reproducer": {"timeout": "6s"}})
    run_dir = tmp_path / "run"
    user_head = git(lab_repo.path, "rev-parse", "HEAD")
    hook_log = tmp_path / "hooks.txt"
    p = fleetbisect(
        "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file),
        "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
        "--run-dir", str(run_dir),
        # Hooks get the event in the environment; a failing one is reported, never fatal.
        "--hook", f'verdict=echo "$FLEETBISECT_EVENT $FLEETBISECT_COMMIT $FLEETBISECT_VERDICT" >> {hook_log}',
        "--hook", f'finish=echo "finish $FLEETBISECT_CULPRIT" >> {hook_log}',
        "--hook", "start=exit 3",
    )
    assert p.returncode == 0, p.stderr
    seeded = git(lab_repo.path, "log", "--format=%H", "--grep=Seeded-regression: true").split()
    assert seeded == [lab_repo.shas[CULPRIT]]
    assert f"first bad commit: {seeded[0]}" in p.stdout
    assert "hook for start exited 3" in p.stderr

    report = json.loads((run_dir / "report.json").read_text())
    assert report["culprit"] == seeded[0]
    assert report["status"] == "found" and report["confirmed"] is True
    assert report["repo"] == str(lab_repo.path)
    assert (report["good"], report["bad"]) == (lab_repo.good, lab_repo.bad)
    roles = [s["role"] for s in report["steps"]]
    # The endpoints first, then the search (~log2(23) plus the skips the repo seeds), then the
    # culprit and its parent retested.
    assert roles[:2] == ["endpoint-good", "endpoint-bad"]
    assert roles[-2:] == ["confirm-culprit", "confirm-parent"]
    assert 3 <= roles.count("bisect") <= 8
    by_role = {s["role"]: s for s in report["steps"]}
    assert by_role["confirm-culprit"]["commit"] == seeded[0] and by_role["confirm-culprit"]["verdict"] == "bad"
    assert by_role["confirm-parent"]["commit"] == lab_repo.shas[CULPRIT - 1]
    for s in report["steps"]:
        assert s["verdict"] in ("good", "bad", "skip")
        assert s["outcomes"] and "build" in s["durations"]
        for e in s["evidence"]:
            assert (run_dir / e).exists(), e
    bisect_log = (run_dir / "bisect.log").read_text()
    assert f"# first bad commit: [{seeded[0]}]" in bisect_log
    # The user's checkout was not touched, and the run's worktree is gone.
    assert git(lab_repo.path, "rev-parse", "HEAD") == user_head
    assert str(run_dir) not in git(lab_repo.path, "worktree", "list")
    assert (run_dir / "report.md").read_text().count(seeded[0][:12]) >= 1
    hooks = hook_log.read_text().splitlines()
    assert len([h for h in hooks if h.startswith("verdict ")]) == len(report["steps"])
    assert f"verdict {seeded[0]} bad" in hooks and hooks[-1] == f"finish {seeded[0]}"


def test_a_bad_endpoint_that_passes_stops_the_run_before_any_mark(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    _, playbook = playbook_variant()
    run_dir = tmp_path / "run"
    p = fleetbisect(
        "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file),
        "--repo", str(lab_repo.path), "--good", lab_repo.shas[1], "--bad", lab_repo.shas[CULPRIT - 2],
        "--run-dir", str(run_dir),
    )
    assert p.returncode == 1, p.stderr
    assert "the bad endpoint" in p.stderr and "tested good" in p.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "endpoint-failed" and report["culprit"] is None
    assert [s["role"] for s in report["steps"]] == ["endpoint-good", "endpoint-bad"]
    assert "git bisect good" not in (run_dir / "bisect.log").read_text()


def test_git_bisect_run_with_step(lab_repo, inventory_file, lab_host, playbook_variant, tmp_path):
    _, playbook = playbook_variant({"reproducer": {"timeout": "6s"}})
    wt = tmp_path / "checkout"
    git(lab_repo.path, "worktree", "add", "-q", "--detach", str(wt), lab_repo.bad)
    try:
        git(wt, "bisect", "start", lab_repo.shas[-1], lab_repo.shas[CULPRIT - 4])
        p = subprocess.run(
            ["git", "-C", str(wt), "bisect", "run", *FB, "step", "--host", lab_host.name,
             "--playbook", str(playbook), "--inventory", str(inventory_file),
             "--evidence-dir", str(tmp_path / "ev")],
            capture_output=True, text=True, timeout=900,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"{lab_repo.shas[CULPRIT]} is the first bad commit" in p.stdout
    finally:
        git(lab_repo.path, "worktree", "remove", "--force", str(wt))


class Relay:
    """A loopback port in front of the lab sshd that relays the first `allow` connections and
    drops every later one: a host that dies in the middle of a run, while the connections it
    already has stay up."""

    def __init__(self, target_port: int, allow: int):
        self.target_port, self.allow = target_port, allow
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted > self.allow:
                conn.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_bad_inventory_names_file_line_and_field_and_touches_no_host(tmp_path, lab_repo, lab_host):
    counter = Relay(lab_host.port, allow=0)  # counts who connects: proof that nothing touched a host
    try:
        inv = tmp_path / "inventory"
        inv.mkdir()
        (inv / "prime-radiant.yaml").write_text(
            "hosts:\n"
            "  prime-radiant:\n"
            "    ssh:\n"
            "      address: 127.0.0.1\n"
            f"      port: {counter.port}\n"
            "    work_dir: /var/tmp/fb\n"
            "    target:\n"
            "      kind: qemu\n"
            "      guest:\n"
            "        port: 70000\n"
            "        user: root\n"
            "        key: /nonexistent\n"
            "        host_key: /nonexistent.pub\n"
        )
        p = fleetbisect(
            "run", "--host", "prime-radiant", "--playbook", "playbooks/scp-stress.yaml",
            "--inventory", str(inv), "--repo", str(lab_repo.path), "--good", lab_repo.good,
            "--bad", lab_repo.bad, "--run-dir", str(tmp_path / "run"),
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        )
        assert p.returncode == 2
        assert f"{inv / 'prime-radiant.yaml'}:10 hosts.prime-radiant.target.guest.port" in p.stderr
        assert "Traceback" not in p.stderr
        assert counter.accepted == 0
        assert not (tmp_path / "run").exists()
    finally:
        counter.close()


def test_check_probes_the_host(inventory_file, lab_host, playbook_variant):
    _, playbook = playbook_variant()
    p = fleetbisect("check", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inventory_file))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    for probe in ("ssh", "qemu", "work dir", "disk"):
        assert probe in out


def test_check_refuses_an_unknown_host_key(inventory_file, lab_host, playbook_variant, tmp_path):
    _, playbook = playbook_variant()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inv = tmp_path / "inv.yaml"
    inv.write_text(inventory_file.read_text().replace(str(lab_host.known_hosts), str(empty)))
    p = fleetbisect("check", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inv))
    assert p.returncode != 0
    assert "host key" in (p.stdout + p.stderr).lower()
    assert "Traceback" not in p.stderr


def relayed_inventory(inventory_file, lab_host, relay, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{relay.port} {lab_host.host_public_key}\n")
    inv = tmp_path / "inv.yaml"
    inv.write_text(inventory_file.read_text()
                   .replace(f"port: {lab_host.port}", f"port: {relay.port}")
                   .replace(str(lab_host.known_hosts), str(known)))
    return inv


def run_behind_relay(allow, lab_repo, inventory_file, lab_host, playbook_variant, tmp_path, *extra):
    """`fleetbisect run` against the lab host behind a Relay that lets `allow` connections in."""
    relay = Relay(lab_host.port, allow=allow)
    try:
        inv = relayed_inventory(inventory_file, lab_host, relay, tmp_path)
        _, playbook = playbook_variant({"policy": {"retries": 1}})
        run_dir = tmp_path / "run"
        p = fleetbisect(
            "run", "--host", lab_host.name, "--playbook", str(playbook), "--inventory", str(inv),
            "--repo", str(lab_repo.path), "--good", lab_repo.good, "--bad", lab_repo.bad,
            "--run-dir", str(run_dir), *extra,
        )
    finally:
        relay.close()
    return p, run_dir, relay


def test_a_dead_host_aborts_the_run_after_bounded_retries_and_marks_nothing(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    # One connection for the run's lease, then the host "dies".
    p, run_dir, relay = run_behind_relay(1, lab_repo, inventory_file, lab_host, playbook_variant, tmp_path,
                                         "--no-endpoint-check")
    assert p.returncode == 128, p.stderr
    assert "cannot reach the host" in p.stderr
    assert "Traceback" not in p.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "aborted" and report["culprit"] is None
    (only,) = report["steps"]
    assert only["verdict"] == "abort" and only["attempts"] == 2
    assert relay.accepted == 3  # the lease, then one connection per attempt
    assert "git bisect good" not in (run_dir / "bisect.log").read_text()
    assert "git bisect bad" not in (run_dir / "bisect.log").read_text()
    # The run can be resumed once the host is back.
    assert f"fleetbisect resume {run_dir}" in p.stderr


def test_a_host_that_never_answers_aborts_before_anything_is_tested(
    lab_repo, inventory_file, lab_host, playbook_variant, tmp_path
):
    p, run_dir, _ = run_behind_relay(0, lab_repo, inventory_file, lab_host, playbook_variant, tmp_path)
    assert p.returncode == 128, p.stderr
    assert f"cannot reach the host {lab_host.name} (2 attempts)" in p.stderr
    assert "Traceback" not in p.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "aborted" and report["steps"] == []
