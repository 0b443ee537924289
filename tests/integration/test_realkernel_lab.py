"""`fleetbisect demo --real-kernel`: a real kernel, built from Debian's linux-source-6.1 with the
lab's small config, bisected end to end on a loopback VM host, with builds ahead.

One test does the whole thing (the cached repository and the first, full build included):
it is slow (minutes; the first time on a machine also the repository), so it is marked `slow`
and runs once per suite. What it shows, from the run's own report:
- the seeded C change in drivers/net/virtio_net.c is the culprit, and it held on retest;
- every guest that was judged ran the kernel its step built (`uname -r` = 6.1.N-fb<commit>);
- the commit that does not compile was skipped as build-failed, never judged, if it was tested;
- the steps after the first built incrementally, with ccache (hits reported), and the
  confirmation of the culprit reused its artifacts from the build cache (same tree);
- a commit was built ahead while a host tested another one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fleetbisect.lab.realkernel import SOURCE, ensure_real_repo

FB = [sys.executable, "-m", "fleetbisect"]


@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(5400)
def test_demo_real_kernel_finds_the_c_culprit(assets, tmp_path):
    assert SOURCE.is_file(), ".ci/setup installs linux-source-6.1"
    assert shutil.which("ccache"), ".ci/setup installs ccache"
    repo = ensure_real_repo()
    p = subprocess.run([*FB, "demo", "--real-kernel", "--build-ahead", "1", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=5000)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    assert f"first bad commit: {repo.culprit}" in p.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["culprit"] == repo.culprit and report["confirmed"] is True
    assert report["kernel_identity"] == "verified"
    steps = report["steps"]
    judged = [s for s in steps if s["verdict"] in ("good", "bad")]
    assert judged and all(s["release"] == f"{repo.version}-fb{s['commit'][:12]}" for s in judged), judged
    assert all(o["kind"] != "wrong-kernel" for s in steps for o in s["outcomes"])
    for s in steps:
        if s["commit"] == repo.broken:
            assert s["verdict"] == "skip" and s["outcomes"][0]["kind"] == "build-failed", s
            assert "implicit declaration of function" in (tmp_path / s["evidence"][0]).read_text()
    culprit = next(s for s in steps if s["commit"] == repo.culprit and s["role"] != "confirm-culprit")
    assert culprit["outcomes"][-1]["kind"] in ("hang", "fail"), culprit["outcomes"]
    confirm = next(s for s in steps if s["role"] == "confirm-culprit")
    assert confirm["build"].get("cached_from") == repo.culprit, confirm["build"]
    assert any(s["build"].get("ccache", {}).get("hits", 0) > 0 for s in steps), [s["build"] for s in steps]
    # how much cheaper a later build is, is bench/buildahead.py's to measure, not a clock here
    ahead = list((tmp_path / "run" / "ahead" / "logs").glob("*.log"))
    assert ahead, "nothing was built ahead"
    assert subprocess.run(["git", "-C", str(tmp_path / "linux"), "worktree", "list", "--porcelain"],
                          capture_output=True, text=True, check=True).stdout.count("worktree ") == 1, \
        "the run's worktrees are removed at the end"
