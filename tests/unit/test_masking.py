"""Secrets in the environment or the build env never reach what fleetbisect writes."""

from __future__ import annotations

import json

import pytest

from fleetbisect import masking
from fleetbisect.deadline import Deadline
from fleetbisect.files import write_atomic
from fleetbisect.journal import Journal
from fleetbisect.localexec import run_logged

TOKEN = "ghp_0123456789abcdef"


@pytest.fixture(autouse=True)
def secrets():
    masking._values.clear()
    masking.register({"GITHUB_TOKEN": TOKEN, "SIGNING_PASSWORD": 'pa"ss\\word', "HOME": "/home/someone",
                      "API_KEY": "short"})
    yield
    masking._values.clear()


def test_only_secret_looking_names_with_real_values_are_masked():
    text = f"token {TOKEN} home /home/someone key short"
    assert masking.mask(text) == "token *** home /home/someone key short"


def test_journal_lines_are_masked_and_stay_json(tmp_path):
    Journal(tmp_path).append("note", text=f"pushed with {TOKEN}", pw='pa"ss\\word')
    line = (tmp_path / "journal.jsonl").read_text()
    assert TOKEN not in line and "ss\\\\word" not in line
    entry = json.loads(line)
    assert entry["text"] == "pushed with ***" and entry["pw"] == "***"


def test_reports_and_command_logs_are_masked(tmp_path):
    write_atomic(tmp_path / "report.md", f"curl -H 'Authorization: {TOKEN}'")
    assert (tmp_path / "report.md").read_text() == "curl -H 'Authorization: ***'"
    log = tmp_path / "build.log"
    with open(log, "wb") as f:
        status = run_logged(["sh", "-c", 'echo "using $GITHUB_TOKEN"'], None, {"GITHUB_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
                            f, Deadline.after(10))
    assert status == 0
    assert log.read_text().splitlines()[-1] == "using ***"
