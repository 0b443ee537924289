"""Builds on a build host over SSH (stages/remotebuild.py), against the real lab: a second lab
sshd plays the build host, the commit reaches it with real `git push` over SSH, the build
runs in its own worktree there and the artifacts come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetbisect.config.inventory import load_inventory
from fleetbisect.deadline import Deadline
from fleetbisect.errors import RunAborted, UserError
from fleetbisect.lab.vmhost import LabHost
from fleetbisect.remote.base import RemoteError, SSHParams
from fleetbisect.stages.build import build, sha256_file
from fleetbisect.stages.remotebuild import REF, Paths, push_commits, slot

from .conftest import BUILD_FAILS, CULPRIT


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """The build host: its own sshd on loopback, stopped by PID at the end."""
    host = LabHost.start(tmp_path_factory.mktemp("forge"), name="forge")
    yield host  # pytest runs the rest however the tests ended (and LabHost has a finalizer)
    host.stop()


def with_build_host(inventory_file, forge, dest, host_name):
    """The lab inventory, its host building on `forge` (a build_hosts entry in a second file)."""
    data = yaml.safe_load(inventory_file.read_text())
    data["hosts"][host_name]["build_on"] = "forge"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "hosts.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (dest / "builders.yaml").write_text(yaml.safe_dump({"build_hosts": {"forge": {
        "ssh": {"address": "127.0.0.1", "port": forge.port, "user": forge.user, "key": str(forge.user_key),
                "known_hosts": str(forge.known_hosts)},
        "work_dir": str(forge.base_dir / "build"),
    }}}))
    return dest


def remote_git(forge, *args):
    return subprocess.run(["git", "--git-dir", Paths(str(forge.base_dir / "build")).repo, *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_build_on_the_build_host_gives_the_artifacts_a_local_build_gives(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tree, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    inv = with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)
    host = load_inventory([inv]).host(lab_host.name)
    assert host.builder is not None and host.builder.name == "forge"
    playbook, _ = playbook_variant()
    sha = lab_repo.shas[CULPRIT]
    tree.checkout(sha)

    local = build(tree.path, playbook, sha, tmp_path / "local" / "build.log", Deadline.after(120))
    remote = build(tree.path, playbook, sha, tmp_path / "remote" / "build.log", Deadline.after(120), on=host.builder)
    assert local.ok and remote.ok, (local.summary, remote.summary, remote.log.read_text())
    assert remote.summary == "built on forge"
    assert remote.release == local.release and remote.release.endswith(sha[:12])
    assert sha256_file(remote.artifacts["kernel"]) == sha256_file(local.artifacts["kernel"])
    # the artifacts came back into the local cache, named by content
    assert all(p.parent == tmp_path / "cache" / "fleetbisect" / "artifacts" and p.name == sha256_file(p)
               for p in remote.artifacts.values())
    # the commit got there through git over SSH, and was built in the build host's worktree
    assert remote_git(forge, "rev-parse", f"{REF}/{slot(tree.path)}-0") == sha
    work = forge.base_dir / "build" / "trees" / slot(tree.path)
    assert subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip() == sha
    assert (work / "include/config/kernel.release").read_text().strip() == remote.release
    log = remote.log.read_text()
    assert "building on forge" in log and "GEN     initramfs.img" in log
    assert not work.with_name(work.name + ".env").exists()  # the environment file is gone
    assert work.with_name(work.name + ".log").stat().st_mode & 0o077 == 0  # the log there is private

    # The next commit: the worktree there is reused, an unchanged kernel is not pulled again.
    nxt = lab_repo.shas[CULPRIT + 1]
    again = build(tree.path, playbook, nxt, tmp_path / "remote2" / "build.log", Deadline.after(120), on=host.builder)
    assert again.ok and again.release.endswith(nxt[:12])
    assert again.artifacts["kernel"] == remote.artifacts["kernel"]
    pulled = again.log.read_text().splitlines()[-1]
    assert pulled.startswith("fleetbisect: artifacts pulled from forge:") and "kernel" not in pulled
    assert "initrd" in pulled


def test_a_commit_that_does_not_build_there_is_a_build_failure(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    playbook, _ = playbook_variant()
    sha = lab_repo.shas[BUILD_FAILS]
    res = build(lab_repo.path, playbook, sha, tmp_path / "b" / "build.log", Deadline.after(120), on=host.builder)
    assert not res.ok and not res.disk_full
    assert res.summary.startswith("build on forge failed (exit 2)")
    assert "error: implicit declaration of function 'fb_lab_helper'" in res.log.read_text()


def test_cherry_picks_travel_with_the_commit_and_are_undone_there(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path, monkeypatch):
    """The commit that fixes a broken build, cherry-picked onto it: pushed along, applied in the
    build host's worktree for the build only, then reset away."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    fix = lab_repo.shas[BUILD_FAILS + 1]
    playbook, _ = playbook_variant({"build": {"cherry_picks": [fix]}})
    sha = lab_repo.shas[BUILD_FAILS]
    res = build(lab_repo.path, playbook, sha, tmp_path / "b" / "build.log", Deadline.after(120), on=host.builder)
    assert res.ok, res.log.read_text()
    assert res.release.endswith(sha[:12])
    assert f"$ git cherry-pick --no-commit {fix}" in res.log.read_text()
    there = forge.base_dir / "build" / "trees" / slot(lab_repo.path)
    status = subprocess.run(["git", "-C", str(there), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True).stdout
    head = subprocess.run(["git", "-C", str(there), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert (status, head) == ("", sha)


def test_a_worktree_busy_with_a_build_left_running_is_a_fault_not_a_verdict(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path, monkeypatch):
    """A build a dead controller left running on the build host holds its worktree's lock: the
    next build waits for it, and when it does not end in time, the run stops (no verdict)."""
    import fcntl

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    playbook, _ = playbook_variant()
    there = forge.base_dir / "build" / "trees" / slot(lab_repo.path)
    there.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{there}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunAborted, match="busy with another build|waiting for another build there"):
            build(lab_repo.path, playbook, lab_repo.good, tmp_path / "b" / "build.log", Deadline.after(6),
                  on=host.builder)
    res = build(lab_repo.path, playbook, lab_repo.good, tmp_path / "c" / "build.log", Deadline.after(120), on=host.builder)
    assert res.ok, res.log.read_text()  # once it is free, the build goes through


def test_a_host_that_builds_its_own_kernel_has_it_in_place_and_the_push_sends_nothing(
        lab_repo, inventory_file, lab_host, playbook_variant, tmp_path, monkeypatch):
    """A box that builds its own kernel (bare metal): `build_on` names the host itself; the build
    leaves kernel and initrd in its blob store, where the push stage finds them."""
    from fleetbisect.remote.ssh import SSHRemote
    from fleetbisect.stages.push import push

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = yaml.safe_load(inventory_file.read_text())
    data["hosts"][lab_host.name]["build_on"] = lab_host.name
    (tmp_path / "self.yaml").write_text(yaml.safe_dump(data))
    host = load_inventory([tmp_path / "self.yaml"]).host(lab_host.name)
    assert host.builder.blobs == f"{host.work_dir}/blobs" and host.builder.work_dir == f"{host.work_dir}/build"
    playbook, _ = playbook_variant()
    sha = lab_repo.shas[CULPRIT]
    res = build(lab_repo.path, playbook, sha, tmp_path / "b" / "build.log", Deadline.after(120), on=host.builder)
    assert res.ok and res.summary == f"built on {lab_host.name}", res.log.read_text()
    for path in res.artifacts.values():
        there = Path(host.work_dir) / "blobs" / sha256_file(path)
        assert there.read_bytes() == path.read_bytes()
    with SSHRemote.connect(host.ssh_params(), deadline=Deadline.after(15)) as conn:
        pushed = push(conn, host.work_dir, res.artifacts, Deadline.after(60))
    assert pushed.uploaded == {}  # nothing crossed the link again
    assert set(pushed.remote_paths) == {"kernel", "initrd"}


def test_a_build_host_whose_work_dir_was_wiped_is_set_up_again(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    playbook, _ = playbook_variant()
    first = build(lab_repo.path, playbook, lab_repo.good, tmp_path / "a" / "build.log", Deadline.after(120),
                  on=host.builder)
    assert first.ok, first.log.read_text()
    shutil.rmtree(forge.base_dir / "build")  # someone cleaned the build host between two steps
    again = build(lab_repo.path, playbook, lab_repo.bad, tmp_path / "b" / "build.log", Deadline.after(120),
                  on=host.builder)
    assert again.ok and again.release.endswith(lab_repo.bad[:12]), again.log.read_text()


def test_git_push_checks_the_build_hosts_key(lab_repo, forge, lab_host):
    """The push goes through OpenSSH with exactly the keys the inventory accepts: another
    machine's key (here the lab host's) refuses it."""
    good = forge.ssh_params()
    repo = str(forge.base_dir / "push-check.git")
    subprocess.run(["git", "init", "-q", "--bare", repo], check=True)
    push_commits(good, lab_repo.path, repo, [lab_repo.good], Deadline.after(60))
    wrong = SSHParams(name="forge", host="127.0.0.1", port=forge.port, user=forge.user,
                      key_files=(str(forge.user_key),), host_keys=(lab_host.host_public_key,))
    with pytest.raises(RemoteError, match="Host key verification failed|host key"):
        push_commits(wrong, lab_repo.path, repo, [lab_repo.bad], Deadline.after(60))
    out = subprocess.run(["git", "--git-dir", repo, "for-each-ref", "--format=%(objectname)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [lab_repo.good]


def test_a_build_host_whose_key_changed_is_refused_not_retried(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path):
    inv = with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)
    (tmp_path / "wrong_known_hosts").write_text(f"[127.0.0.1]:{forge.port} {lab_host.host_public_key}\n")
    data = yaml.safe_load((inv / "builders.yaml").read_text())
    data["build_hosts"]["forge"]["ssh"]["known_hosts"] = str(tmp_path / "wrong_known_hosts")
    (inv / "builders.yaml").write_text(yaml.safe_dump(data))
    host = load_inventory([inv]).host(lab_host.name)
    playbook, _ = playbook_variant()
    with pytest.raises(UserError, match="forge"):
        build(lab_repo.path, playbook, lab_repo.good, tmp_path / "b" / "build.log", Deadline.after(60), on=host.builder)


def test_check_probes_the_build_host(inventory_file, lab_host, forge, playbook_variant, tmp_path):
    from .test_distcc_lab import check

    inv = with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)
    _, playbook = playbook_variant()
    code, probes, err = check(inv, lab_host.name, playbook)
    assert code == 0, err
    assert probes["build host"]["detail"] == f"connected to forge, builds in {forge.base_dir / 'build'}"
    assert probes["build host git"]["ok"] and probes["build host make"]["ok"]
    assert probes["build host work dir"]["ok"] and probes["build host disk"]["ok"]


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
def test_a_bisect_whose_builds_run_on_the_build_host_finds_the_culprit(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path):
    inv = with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)
    _, playbook = playbook_variant({"reproducer": {"timeout": "6s"}})
    run_dir = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "fleetbisect", "run", "--host", lab_host.name,
                        "--playbook", str(playbook), "--inventory", str(inv), "--repo", str(lab_repo.path),
                        "--good", lab_repo.good, "--bad", lab_repo.bad, "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stderr
    assert f"first bad commit: {lab_repo.shas[CULPRIT]}" in p.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["confirmed"] is True
    built = [s for s in report["steps"] if s["verdict"] in ("good", "bad")]
    assert built and all(s["release"].endswith(s["commit"][:12]) for s in built)
    for s in report["steps"]:  # every step was built over there, none here
        log = (run_dir / next(e for e in s["evidence"] if e.endswith("build.log"))).read_text()
        assert log.startswith("fleetbisect: building on forge in "), log[:200]
    skipped = [s for s in report["steps"] if s["commit"] == lab_repo.shas[BUILD_FAILS]]
    assert all(s["verdict"] == "skip" and "build on forge failed" in s["reason"] for s in skipped)


def test_builds_from_two_local_trees_at_once_use_two_worktrees_there(
        lab_repo, inventory_file, lab_host, forge, playbook_variant, tmp_path, monkeypatch):
    """Build-ahead and fleets build several commits at once: each local tree gets a worktree
    of its own on the build host, so neither build sees the other's checkout."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host = load_inventory([with_build_host(inventory_file, forge, tmp_path / "inv", lab_host.name)]).host(lab_host.name)
    playbook, _ = playbook_variant()
    shas = [lab_repo.shas[CULPRIT - 1], lab_repo.shas[CULPRIT]]
    trees = []
    for i, sha in enumerate(shas):
        wt = tmp_path / f"wt{i}"
        subprocess.run(["git", "-C", str(lab_repo.path), "worktree", "add", "-q", "--detach", str(wt), sha], check=True)
        trees.append(wt)
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: build(trees[i], playbook, shas[i], tmp_path / f"s{i}" / "build.log",
                                                    Deadline.after(300), on=host.builder), range(2)))
    finally:
        for wt in trees:
            subprocess.run(["git", "-C", str(lab_repo.path), "worktree", "remove", "--force", str(wt)], check=False)
    assert [r.ok for r in results] == [True, True], [r.log.read_text() for r in results]
    assert [r.release for r in results] == [f"6.1.0-lab-fb{s[:12]}" for s in shas]
    assert slot(trees[0]) != slot(trees[1])
    for wt, sha in zip(trees, shas, strict=True):
        there = forge.base_dir / "build" / "trees" / slot(wt)
        assert subprocess.run(["git", "-C", str(there), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() == sha
