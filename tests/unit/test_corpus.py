"""The malformed-file corpus: every file is refused by `check` with exit 2 and one line naming
`FILE:LINE field.path`, and never a traceback; a sample also through `step` (exit 128, so that
`git bisect run` stops instead of marking a commit).

Each file in tests/corpus/{inventory,playbook}/ is a valid file with one flaw; its first line
says what must be reported: `# expect: LINE FIELD` (FIELD `-`: a YAML error, `FILE:LINE:`).
The other file of the pair is a valid one written here (nothing is contacted: validation
fails first). Time per file is printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetbisect.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"
FILES = sorted(CORPUS.glob("*/*.yaml"))

PLAYBOOK = """\
name: valid
artifacts: {kernel: arch/x86/boot/bzImage}
reproducer: {kind: command, command: "true", timeout: 30s}
"""


def expectation(path: Path) -> tuple[int, str]:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path}: first line must be `# expect: LINE FIELD`"
    line, field = first.removeprefix("# expect: ").split(" ", 1)
    return int(line), field


def expected_text(path: Path) -> str:
    line, field = expectation(path)
    return f"{path}:{line}:" if field == "-" else f"{path}:{line} {field}:"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """A valid inventory (with real key files) and a valid playbook."""
    d = tmp_path_factory.mktemp("valid")
    (d / "id_ed25519").write_text("not used: validation fails before any connection\n")
    (d / "known_hosts").write_text("")
    (d / "guest.pub").write_text(KEY + "\n")
    inventory = d / "inventory.yaml"
    inventory.write_text(f"""\
hosts:
  lab:
    ssh: {{address: 127.0.0.1, port: 1, user: bisect, key: {d}/id_ed25519, known_hosts: {d}/known_hosts}}
    target:
      kind: qemu
      guest: {{port: 1, key: {d}/id_ed25519, host_key: {d}/guest.pub}}
""")
    playbook = d / "playbook.yaml"
    playbook.write_text(PLAYBOOK)
    return {"inventory": inventory, "playbook": playbook}


def argv(command: str, path: Path, valid: dict[str, Path]) -> list[str]:
    inventory = path if path.parent.name == "inventory" else valid["inventory"]
    playbook = path if path.parent.name == "playbook" else valid["playbook"]
    return [command, "--host", "lab", "--inventory", str(inventory), "--playbook", str(playbook)]


def test_the_corpus_is_big_enough():
    assert len(FILES) >= 100
    assert {p.parent.name for p in FILES} == {"inventory", "playbook"}


def test_the_valid_pair_is_valid(valid):
    from fleetbisect.config.inventory import load_inventory
    from fleetbisect.config.playbook import load_playbook

    load_inventory([valid["inventory"]])
    load_playbook(valid["playbook"])


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_check_refuses_with_file_line_and_field(path, valid, capsys):
    started = time.perf_counter()
    code = main(argv("check", path, valid))
    took = time.perf_counter() - started
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"\n  {path.parent.name}/{path.name}: {took * 1000:.0f} ms", end="")
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert any(ln.startswith(expected_text(path)) for ln in lines), (expected_text(path), err)
    # Every line is an error line that starts with the file it is about: nothing forged.
    assert all(ln.startswith(str(path)) or ln.startswith(str(valid["inventory"])) for ln in lines), err


SAMPLE = [p for p in FILES if p.stem in {
    "alias-bomb", "deep-nesting", "utf8-latin1-user", "connect-timeout-inf", "host-key-not-base64",
    "ssh-port-true", "host-null", "command-timeout-inf", "scp-size-decimal-string", "kind-unknown",
    "yaml-nul-byte", "top-level-newline-key",
}]


@pytest.mark.parametrize("path", SAMPLE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_step_aborts_the_bisect(path, valid, tmp_path):
    """`git bisect run` reads 1..127 as bad: bad input must exit 128."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fleetbisect", *argv("step", path, valid), "--repo", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    print(f"step {path.parent.name}/{path.name}: {time.perf_counter() - started:.2f} s")
    assert proc.returncode == 128, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert expected_text(path) in proc.stderr


def test_json_events_name_file_line_and_field(valid, capsys):
    path = CORPUS / "playbook" / "command-timeout-inf.yaml"
    import json

    code = main(["check", "--json", *argv("check", path, valid)[1:]])
    assert code == 2
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    line, field = expectation(path)
    assert [(e["event"], e["file"], e["line"], e["field"]) for e in events] == [
        ("config-error", str(path), line, field)]
