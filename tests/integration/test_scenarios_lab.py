"""`fleetbisect demo --scenario NAME`: each seeded kind of regression is found, and the report
shows the classified outcome and the kernel's own lines behind it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FB = [sys.executable, "-m", "fleetbisect"]

# What the culprit's outcome must say, and a line of evidence the report must quote.
SCENARIOS = {
    "panic": ("boot-failed", "Kernel panic - not syncing: sysrq triggered crash"),
    "oops-warning": ("fail", "WARNING: CPU: 0 PID: 0 at net/sched/sch_generic.c:525 dev_watchdog"),
    "boot-slow": ("fail", None),
    "console": ("fail", "FLEETBISECT-RESULT: FAIL"),
}


@pytest.mark.slow  # a whole bisect: out of the default run, once in CI (.ci/run)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_demo_scenario_finds_its_seeded_culprit(scenario, assets, tmp_path):
    p = subprocess.run([*FB, "demo", "--scenario", scenario, "--commits", "16", "--seed", "5",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    seeded = subprocess.run(["git", "-C", str(tmp_path / "linux"), "log", "--format=%H",
                             "--grep=Seeded-regression: true"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert f"first bad commit: {seeded[0]}" in p.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["culprit"] == seeded[0] and report["confirmed"] is True
    kind, line = SCENARIOS[scenario]
    culprit_step = next(s for s in report["steps"] if s["commit"] == seeded[0])
    assert culprit_step["outcomes"][0]["kind"] == kind, culprit_step["outcomes"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"**{kind}**" in md
    if line:
        assert line in md, md
