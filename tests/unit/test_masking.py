"""Secrets in the environment or the build env never reach what fleetbisect writes."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from fleetbisect import masking
from fleetbisect.deadline import Deadline
from fleetbisect.files import write_atomic
from fleetbisect.hooks import Hooks
from fleetbisect.journal import Journal
from fleetbisect.localexec import run_logged
from fleetbisect.ui import UI

TOKEN = "ghp_0123456789abcdef"


@pytest.fixture(autouse=True)
def secrets():
    masking._values.clear()
    masking.register({"GITHUB_TOKEN": TOKEN, "SIGNING_PASSWORD": 'pa"ss\\word', "HOME": "/home/someone",
                      "API_KEY": "abc"})
    yield
    masking._values.clear()


def test_only_secret_looking_names_with_real_values_are_masked():
    text = f"token {TOKEN} home /home/someone key abc"
    assert masking.mask(text) == "token *** home /home/someone key abc"


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
    with masking.open_masked(log, "wb") as f:
        status = run_logged(["sh", "-c", 'echo "using $GITHUB_TOKEN"'], None, {"GITHUB_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
                            f, Deadline.after(10))
    assert status == 0
    assert log.read_text().splitlines()[-1] == "using ***"


# --- which values are secret ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["BMC_PASS", "DB_PWD", "SSH_PASSPHRASE", "KBUILD_SIGN_PIN", "APIKEY",
                                  "github_token", "AWS_SECRET_ACCESS_KEY", "NPM_AUTH", "GIT_CREDENTIALS"])
def test_secret_looking_names_anywhere_in_the_name_are_masked(name):
    masking.register({name: "v4lue-of-" + name})
    assert masking.mask(f"[v4lue-of-{name}]") == "[***]"


@pytest.mark.parametrize("name", ["PWD", "OLDPWD", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "KEYBOARD_LAYOUT", "KEYMAP"])
def test_names_that_only_look_secret_are_not_masked(name):
    # PWD is the working directory: masking it would hide every path (and the repo path the
    # journal needs to resume); the author's name is the culprit's in the report.
    masking.register({name: "/home/dev/src/linux"})
    assert masking.mask("cd /home/dev/src/linux") == "cd /home/dev/src/linux"


def test_a_four_digit_pin_is_masked_but_trivial_values_are_not():
    masking.register({"KBUILD_SIGN_PIN": "4711", "TOKEN_CACHE": "true", "SIM_PIN": "123"})
    assert masking.mask("pin 4711 cache true sim 123") == "pin *** cache true sim 123"


def test_every_build_env_value_is_masked_but_the_public_kbuild_variables():
    masking.register_build_env({"SIGN_WITH": "pl4ybook-value", "ARCH": "x86_64", "O": "/build/out",
                                "CC": "clang", "W": "1"})
    out = masking.mask("signing with pl4ybook-value for x86_64 into /build/out with clang")
    assert out == "signing with *** for x86_64 into /build/out with clang"


# --- streams ----------------------------------------------------------------------------------


def test_a_secret_split_across_reads_is_caught_at_every_split_point():
    data = f"before {TOKEN} after\n".encode()
    for i in range(len(data) + 1):
        m = masking.StreamMasker()
        out = m.feed(data[:i]) + m.feed(data[i:]) + m.end()
        assert out == b"before *** after\n", i


def test_streaming_masks_exactly_as_masking_the_whole_text_does():
    import random

    rng = random.Random(7)
    values = ["abcd", "cdefgh", "aaaa", "fgab", TOKEN]
    masking._values.clear()
    masking._add(values)
    for _ in range(3000):
        text = "".join(rng.choice([*values, "x", "\n", "ab", "c", "aaa", "fg"]) for _ in range(rng.randint(1, 12)))
        m, out, data, i = masking.StreamMasker(), b"", text.encode(), 0
        while i < len(data):
            j = i + rng.randint(1, 6)
            out += m.feed(data[i:j])
            i = j
        out += m.end()
        whole = masking.StreamMasker()
        assert out == whole.feed(data) + whole.end(), text
        assert not any(v.encode() in out for v in values), text


def test_overlapping_secrets_leave_no_part_of_either():
    masking._values.clear()
    masking._add(["abcdef", "defghi"])
    assert masking.mask("xabcdefghiy") == "x***y"


def test_what_cannot_start_a_secret_is_written_at_once():
    # a live log stays live: only a possible beginning of a secret is held back
    m = masking.StreamMasker()
    assert m.feed(b"make[1]: Entering directory\n") == b"make[1]: Entering directory\n"
    assert m.feed(b"token ghp_0123") == b"token "
    assert m.feed(b"456789abcdef!") == b"***!"


def test_open_masked_takes_text_and_bytes(tmp_path):
    with masking.open_masked(tmp_path / "x.log") as f:
        f.write(f"a {TOKEN[:5]}")
        f.write(f"{TOKEN[5:]} b\n".encode())
    assert (tmp_path / "x.log").read_text() == "a *** b\n"


def test_json_files_stay_json_when_a_secret_is_a_number_or_a_key(tmp_path):
    from fleetbisect.files import write_json_atomic

    masking.register({"GITHUB_TOKEN": "424242"})
    Journal(tmp_path).append("note", n=424242, text="pin 424242")
    write_json_atomic(tmp_path / "result.json", {"n": 424242, "text": "pin 424242"})
    entry = json.loads((tmp_path / "journal.jsonl").read_text())
    assert entry["text"] == "pin ***"
    assert json.loads((tmp_path / "result.json").read_text()) == {"n": 424242, "text": "pin ***"}


def test_an_invalid_build_env_value_is_not_echoed(tmp_path):
    from fleetbisect.config.playbook import load_playbook
    from fleetbisect.errors import ConfigError

    pb = tmp_path / "pb.yaml"
    pb.write_text("name: x\nbuild:\n  env:\n    SIGN_PIN: 98765432\n"
                  "reproducer: {kind: command, command: 'true', timeout: 10s}\n")
    with pytest.raises(ConfigError) as e:
        load_playbook(pb)
    assert "98765432" not in str(e.value)
    assert "pb.yaml:4 build.env.SIGN_PIN: must be a string (value not shown)" in str(e.value)


def test_hooks_log_is_masked_and_a_pasted_secret_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setenv("BMC_PASS", "bmc-hunter2-pass")
    masking.register()
    out = Console(file=io.StringIO(), width=300)
    hooks = Hooks({"finish": ["echo pasted bmc-hunter2-pass", 'echo "env $BMC_PASS"']}, UI(out),
                  {"run_id": "r1"}, tmp_path / "hooks.log")
    hooks.fire("finish")
    log = (tmp_path / "hooks.log").read_text()
    assert "bmc-hunter2-pass" not in log and "pasted ***" in log and "env ***" in log
    said = out.file.getvalue()
    assert "hook command holds a secret's value" in said and "'echo pasted ***'" in said
    assert "bmc-hunter2-pass" not in said


def test_a_secret_is_masked_in_the_html_report_too(tmp_path):
    from fleetbisect.report import Report

    masking.register({"BMC_PASS": "p&ss<w>rd"})
    report = Report(tmp_path, "/repo", "a" * 40, "b" * 40, "host", "pb.yaml", "d" * 64)
    report.message = "login with p&ss<w>rd failed"
    report.write()
    for name in ("report.html", "report.md", "report.json"):
        text = (tmp_path / name).read_text()
        assert "p&ss" not in text and "p&amp;ss" not in text, name


def test_a_pin_is_masked_but_never_inside_a_commit_id(tmp_path):
    masking.register({"KBUILD_SIGN_PIN": "4711"})
    sha = "0123456789abcdef4711" + "0" * 20
    Journal(tmp_path).append("marked", commit=sha, text=f"pin 4711 for {sha[:12]}")
    entry = json.loads((tmp_path / "journal.jsonl").read_text())
    assert entry["commit"] == sha and entry["text"] == "pin *** for 0123456789ab"
    assert masking.mask(f"first bad commit: {sha}") == f"first bad commit: {sha}"


def test_an_existing_path_is_not_masked_so_the_journal_can_resume(tmp_path):
    repo = tmp_path / "linux"
    repo.mkdir()
    masking.register_build_env({"KERNEL_SRC": str(repo), "SIGN_WITH": "/not/a/path/s3cret"})
    Journal(tmp_path).append("run-started", config={"repo": str(repo / "sub")}, x="/not/a/path/s3cret")
    entry = json.loads((tmp_path / "journal.jsonl").read_text())
    assert entry["config"]["repo"] == str(repo / "sub") and entry["x"] == "***"
