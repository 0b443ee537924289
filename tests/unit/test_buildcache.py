"""The build stage's cache, config, ccache and build-ahead, on real git repositories with a
small real build (a Makefile and, for ccache, gcc): what ends up in the tree, the cache and the
logs is what is asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetbisect.config.playbook import Playbook
from fleetbisect.deadline import Deadline
from fleetbisect.search.gitbisect import Bisect
from fleetbisect.stages.build import _ccache_stats, build
from fleetbisect.stages.buildahead import BuildAhead, Builds, bisect_next, bisect_upcoming
from fleetbisect.stages.buildcache import BuildCache
from fleetbisect.verdict import Verdict

MAKEFILE = """\
olddefconfig:
\t@echo "olddefconfig from $$(head -1 .config)" >> $(LEDGER)
\t@mkdir -p include/config && echo "6.1.0$(LOCALVERSION)" > include/config/kernel.release

all:
\t@echo "build $$(git rev-parse --short HEAD)" >> $(LEDGER)
\t@mkdir -p arch/x86/boot && cat src.c .config > arch/x86/boot/bzImage
"""
PATIENCE = 120.0  # only to fail instead of hanging; never asserted


def sh(cwd: Path, *argv: str) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, commits: int = 16, same_tree_at: int | None = None) -> list[str]:
    path.mkdir()
    sh(path, "git", "init", "-q", "-b", "master")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    os.environ.update(env)
    (path / "Makefile").write_text(MAKEFILE)
    (path / ".gitignore").write_text(".config\narch/\ninclude/\n")
    shas = []
    for i in range(commits):
        if same_tree_at is None or i != same_tree_at:
            (path / "src.c").write_text(f"int f(void) {{ return {i}; }}\n")
        sh(path, "git", "add", "-A")
        sh(path, "git", "commit", "-q", "--allow-empty", "-m", f"commit {i}")
        shas.append(sh(path, "git", "rev-parse", "HEAD"))
    return shas


def playbook(tmp: Path, **build) -> Playbook:
    config = tmp / "lab.config"
    if not config.exists():
        config.write_text("# the playbook's config\nCONFIG_X=y\n")
    ledger = tmp / "ledger"
    spec = {"command": f"make all LEDGER={ledger}", "config": str(config),
            "env": {"LEDGER": str(ledger)}, **build}
    return Playbook.model_validate({"name": "t", "build": spec,
                                    "reproducer": {"kind": "command", "command": "true", "timeout": 5}})


def ledger(tmp: Path) -> list[str]:
    p = tmp / "ledger"
    return p.read_text().splitlines() if p.exists() else []


def test_config_comes_from_the_playbook_and_the_cache_reuses_a_built_tree(tmp_path):
    shas = make_repo(tmp_path / "repo", 3)
    pb = playbook(tmp_path)
    tree = tmp_path / "repo"
    (tree / ".config").write_text("# left by the last commit\nCONFIG_X=n\n")
    cache = BuildCache(tmp_path / "cache")
    first = build(tree, pb, shas[-1], tmp_path / "s1" / "build.log", Deadline.after(60), cache=cache)
    assert first.ok, first.log.read_text()
    assert ledger(tmp_path) == ["olddefconfig from # the playbook's config", f"build {shas[-1][:7]}"]
    assert b"CONFIG_X=y" in first.artifacts["kernel"].read_bytes()
    assert "cached_from" not in first.info

    again = build(tree, pb, shas[-1], tmp_path / "s2" / "build.log", Deadline.after(60), cache=cache)
    assert again.ok and again.info["cached_from"] == shas[-1]
    assert len(ledger(tmp_path)) == 2, "a cached tree is not built again"
    assert again.artifacts["kernel"].read_bytes() == first.artifacts["kernel"].read_bytes()
    assert again.release == first.release == f"6.1.0-fb{shas[-1][:12]}"
    assert "reuses the build of" in again.log.read_text()

    other = playbook(tmp_path / "o" if (tmp_path / "o").mkdir() is None else None, command="make all")
    assert cache.key(tree, shas[-1], other, {}) != cache.key(tree, shas[-1], pb, {}), \
        "another config or command is another key"


def test_same_tree_without_stamp_is_a_hit_and_an_identical_image_is_reported(tmp_path):
    shas = make_repo(tmp_path / "repo", 4, same_tree_at=2)  # commit 2 has commit 1's tree
    pb = playbook(tmp_path, localversion=False, release_file=None)
    tree = tmp_path / "repo"
    cache = BuildCache(tmp_path / "cache")
    for i in (1, 2):
        sh(tree, "git", "checkout", "-q", "--detach", shas[i])
        res = build(tree, pb, shas[i], tmp_path / f"s{i}" / "build.log", Deadline.after(60), cache=cache)
        assert res.ok
    assert res.info == {"cached_from": shas[1]}
    # Two trees, one image: the second build is reported as identical to the first.
    (tmp_path / "config2").write_text("# the playbook's config\nCONFIG_X=y\n")
    pb2 = playbook(tmp_path, localversion=False, release_file=None, command=f"make all LEDGER={tmp_path}/ledger && "
                   "printf same > arch/x86/boot/bzImage")
    for i in (0, 3):
        sh(tree, "git", "checkout", "-q", "--detach", shas[i])
        res = build(tree, pb2, shas[i], tmp_path / f"t{i}" / "build.log", Deadline.after(60), cache=cache)
    assert res.info.get("same_image_as") == shas[0]
    assert any("byte-identical" in n for n in res.notes)


def test_ccache_is_used_and_its_hit_rate_reported(tmp_path):
    assert shutil.which("ccache") and shutil.which("gcc"), ".ci/setup installs ccache and gcc"
    shas = make_repo(tmp_path / "repo", 2)
    pb = playbook(tmp_path, command="gcc -c src.c -o src.o && make all LEDGER=$LEDGER",
                  env={"LEDGER": str(tmp_path / "ledger"), "CCACHE_DIR": str(tmp_path / "ccache")})
    tree = tmp_path / "repo"
    first = build(tree, pb, shas[-1], tmp_path / "s1" / "build.log", Deadline.after(60))
    assert first.info["ccache"] == {"hits": 0, "misses": 1, "rate": 0.0}
    (tree / "src.o").unlink()
    second = build(tree, pb, shas[-1], tmp_path / "s2" / "build.log", Deadline.after(60))
    assert second.info["ccache"] == {"hits": 1, "misses": 0, "rate": 1.0}
    assert "ccache: 1 of 1 compilations hit (100%)" in second.log.read_text()


def test_ccache_stats_log_parsing(tmp_path):
    log = tmp_path / "s.log"
    log.write_text("# a.c\ncache_miss\ndirect_cache_miss\n# b.c\ndirect_cache_hit\nlocal_storage_hit\n"
                   "# c.c\npreprocessed_cache_hit\n# d.c\ncalled_for_link\n")
    assert _ccache_stats(log) == {"hits": 2, "misses": 1, "rate": round(2 / 3, 4)}


@pytest.mark.parametrize("verdict", [Verdict.BAD, Verdict.GOOD])
def test_bisect_upcoming_names_what_git_asks_next(tmp_path, verdict):
    shas = make_repo(tmp_path / "repo", 16)
    b = Bisect.create(tmp_path / "repo", tmp_path / "wt", shas[0], shas[-1])
    head = b.head()
    scratch = tmp_path / "scratch"
    if_bad, if_good = bisect_upcoming(b.tree, head, scratch)
    assert bisect_next(b.tree, scratch) == [head]
    b.mark(verdict, head)
    assert b.head() == (if_bad if verdict is Verdict.BAD else if_good)


def test_build_ahead_builds_wanted_commits_in_its_own_worktree(tmp_path):
    shas = make_repo(tmp_path / "repo", 6)
    pb = playbook(tmp_path, ahead=1, ahead_min_free=1)
    builds = Builds(tmp_path / "repo", pb, tmp_path / "run")
    try:
        builds.ahead.want([shas[3], shas[4]])
        assert builds.ahead.settle(Deadline.after(PATIENCE))
        assert set(builds.ahead.built) == {shas[3], shas[4]}
        got = builds.ahead.get(shas[3], Deadline.after(PATIENCE))
        assert got is not None and got.ok and got.release == f"6.1.0-fb{shas[3][:12]}"
        assert (tmp_path / "run" / "ahead" / "tree0" / ".git").exists()
        # The step's build of that commit is the one built ahead: not built again.
        n = len(ledger(tmp_path))
        res = builds.build(tmp_path / "repo", pb, shas[3], tmp_path / "step" / "build.log", Deadline.after(60))
        assert res.ok and res.info["cached_from"] == shas[3] and len(ledger(tmp_path)) == n
    finally:
        builds.close()
    assert not (tmp_path / "run" / "ahead" / "tree0").exists()


def test_build_ahead_worktree_starts_from_the_built_tree(tmp_path):
    shas = make_repo(tmp_path / "repo", 4)
    pb = playbook(tmp_path, ahead=1, ahead_min_free=1)
    sh(tmp_path / "repo", "git", "worktree", "add", "-q", "--detach", str(tmp_path / "main"), shas[1])
    main = tmp_path / "main"
    assert build(main, pb, shas[1], tmp_path / "m" / "build.log", Deadline.after(60)).ok
    (main / "arch" / "output.o").write_text("object\n")
    cmd = main / "arch" / ".tool.o.cmd"  # a record naming its tree (tools/objtool's do)
    cmd.write_text(f"cmd_tool.o := gcc -I{main}/include -c tool.c\n")
    os.utime(cmd, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    ahead = BuildAhead(tmp_path / "repo", pb, tmp_path / "run" / "ahead", BuildCache(tmp_path / "c"), seed=main)
    try:
        ahead.want([shas[2]])
        assert ahead.settle(Deadline.after(PATIENCE))
        assert ahead.get(shas[2], Deadline.after(PATIENCE)).ok
    finally:
        ahead.close()
    slot = tmp_path / "run" / "ahead" / "tree0"
    assert (slot / "arch" / "output.o").read_text() == "object\n", "the build outputs came along"
    assert (slot / "arch" / ".tool.o.cmd").read_text() == f"cmd_tool.o := gcc -I{slot}/include -c tool.c\n"
    assert (slot / "arch" / ".tool.o.cmd").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert sh(slot, "git", "rev-parse", "HEAD") == shas[2] and sh(slot, "git", "status", "--porcelain") == ""
    assert (slot / "src.c").read_text() == "int f(void) { return 2; }\n"
    assert sh(main, "git", "rev-parse", "HEAD") == shas[1], "the run's tree is left alone"


def test_build_ahead_stops_a_build_no_longer_wanted(tmp_path):
    shas = make_repo(tmp_path / "repo", 4)
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    pb = playbook(tmp_path, ahead=1, ahead_min_free=1,
                  command=f"touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done; make all LEDGER=$LEDGER")
    ahead = BuildAhead(tmp_path / "repo", pb, tmp_path / "run" / "ahead", BuildCache(tmp_path / "c"))
    try:
        ahead.want([shas[2]])
        deadline = Deadline.after(PATIENCE)
        while not started.exists():
            assert not deadline.expired, "the build ahead never started"
        assert ahead.get(shas[1], Deadline.after(PATIENCE)) is None  # another commit: the guess was wrong
        assert ahead.slots[0].commit is None and shas[2] not in ahead.built
        assert not (tmp_path / "run" / "ahead" / "tree0.build.pid").exists(), "its process group was killed"
    finally:
        gate.write_text("")
        ahead.close()
    assert ledger(tmp_path) == ["olddefconfig from # the playbook's config"]


def test_the_same_artifact_at_two_commits_is_stored_once(tmp_path):
    """A lab kernel (or an unchanged module) is the same bytes at many commits: the cache holds
    it once and each entry links to it, so a run's cache does not fill the disk copy by copy."""
    from fleetbisect.stages.buildcache import BuildCache

    cache = BuildCache(tmp_path / "cache")
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\x7fkernel" * 1000)
    for i, commit in enumerate(("a" * 40, "b" * 40)):
        initrd = tmp_path / f"initrd{i}"
        initrd.write_bytes(f"initrd of {commit}".encode())
        cache.put(f"key{i}", commit, "6.1.0", {"kernel": kernel, "initrd": initrd})
    one, two = cache.get("key0"), cache.get("key1")
    assert one.commit == "a" * 40 and two.commit == "b" * 40
    assert one.artifacts["kernel"].read_bytes() == kernel.read_bytes()
    assert one.artifacts["kernel"].stat().st_ino == two.artifacts["kernel"].stat().st_ino
    assert one.artifacts["initrd"].stat().st_ino != two.artifacts["initrd"].stat().st_ino
    assert two.artifacts["initrd"].read_bytes() == b"initrd of " + b"b" * 40


def run_tree(tmp_path: Path, repo: Path, at: str) -> Path:
    tree = tmp_path / "run" / "worktree"
    tree.parent.mkdir(parents=True, exist_ok=True)
    sh(repo, "git", "worktree", "add", "-q", "--detach", str(tree), at)
    return tree


def test_the_runs_own_tree_builds_ahead_while_the_step_does_not_need_it(tmp_path):
    shas = make_repo(tmp_path / "repo", 6)
    pb = playbook(tmp_path, ahead=1, ahead_min_free=1)
    tree = run_tree(tmp_path, tmp_path / "repo", shas[0])
    builds = Builds(tmp_path / "repo", pb, tmp_path / "run", home=tree)
    try:
        step = builds.build(tree, pb, shas[1], tmp_path / "s1" / "build.log", Deadline.after(PATIENCE))
        assert step.ok
        # the step's artifacts are the cache's copies, not the tree's files
        assert all(tree not in p.parents for p in step.artifacts.values()), step.artifacts
        builds.ahead.want([shas[3]])  # what the search may ask next
        assert builds.ahead.settle(Deadline.after(PATIENCE))
        assert shas[3] in builds.ahead.built
        assert sh(tree, "git", "rev-parse", "HEAD") == shas[3], "built in the run's tree itself"
        assert not (tmp_path / "run" / "ahead" / "tree0").exists(), "no worktree, no copy"
        # ... which rewrote the tree's bzImage, but not the artifacts the step pushes
        assert b"return 3" in (tree / "arch" / "x86" / "boot" / "bzImage").read_bytes()
        assert b"return 1" in step.artifacts["kernel"].read_bytes()
        # the guess was right: the next step's build is that build, not another one
        n = len(ledger(tmp_path))
        nxt = builds.build(tree, pb, shas[3], tmp_path / "s2" / "build.log", Deadline.after(PATIENCE))
        assert nxt.ok and nxt.info["cached_from"] == shas[3] and len(ledger(tmp_path)) == n
    finally:
        builds.close()
    assert (tree / ".git").exists(), "the run's tree is the run's to remove, not build-ahead's"


def test_claiming_the_tree_for_another_commit_stops_its_build_ahead_with_sigterm(tmp_path):
    shas = make_repo(tmp_path / "repo", 6)
    gate, started, signals = tmp_path / "gate", tmp_path / "started", tmp_path / "signals"
    pb = playbook(tmp_path, ahead=1, ahead_min_free=1, command=(
        f"if [ \"$(git rev-parse HEAD)\" = {shas[3]} ]; then trap 'echo TERM >> {signals}; exit 143' TERM; "
        f"touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done; fi; make all LEDGER=$LEDGER"))
    tree = run_tree(tmp_path, tmp_path / "repo", shas[0])
    builds = Builds(tmp_path / "repo", pb, tmp_path / "run", home=tree)
    try:
        assert builds.build(tree, pb, shas[1], tmp_path / "s1" / "build.log", Deadline.after(PATIENCE)).ok
        builds.ahead.want([shas[3]])
        deadline = Deadline.after(PATIENCE)
        while not started.exists():
            assert not deadline.expired, "the build ahead never started"
        # the verdict sent the search elsewhere: the tree is claimed for shas[2]
        builds.checkout(tree, shas[2], Deadline.after(PATIENCE))
        assert signals.read_text().split() == ["TERM"], "asked to stop (make deletes what it was writing)"
        assert shas[3] not in builds.ahead.built
        assert sh(tree, "git", "rev-parse", "HEAD") == shas[2]
        step = builds.build(tree, pb, shas[2], tmp_path / "s2" / "build.log", Deadline.after(PATIENCE))
        assert step.ok and b"return 2" in step.artifacts["kernel"].read_bytes()
    finally:
        gate.write_text("")
        builds.close()
