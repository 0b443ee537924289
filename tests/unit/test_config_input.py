"""Bad input: hostile YAML is bounded, values have ranges, every problem is reported at once,
error lines cannot be forged, and the published schemas accept what the loader accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from rich.console import Console

from fleetbisect.cli import main, parser
from fleetbisect.config.inventory import InventoryFile, load_inventory
from fleetbisect.config.loader import parse_bytes, parse_seconds
from fleetbisect.config.playbook import Playbook, load_playbook
from fleetbisect.config.yamlsafe import MAX_BYTES
from fleetbisect.errors import ConfigError
from fleetbisect.ui import UI

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBVp2mxsRYc5o0d0Ptjb7hoa+mFPh9BoVYqsSP3i8pA9 guest"
HOST = f"""\
    ssh: {{address: 127.0.0.1}}
    target:
      kind: qemu
      guest: {{port: 10022, host_key: {KEY}}}
"""


def problems(fn, *args) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    return e.value.problems


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1.0e99, "99999999999999999999h", "-1s", "169h",
                                   "7d", True, 0, -5, "1m30", ""])
def test_durations_out_of_range_are_refused_with_the_range(value):
    with pytest.raises(ValueError, match="at most 7 days"):
        parse_seconds(value)


def test_seven_days_is_the_longest_duration():
    assert parse_seconds("168h") == 7 * 24 * 3600 and parse_seconds("0.5s") == 0.5


@pytest.mark.parametrize("value", ["1.5", 1.5, "99999999999999999999T", "2T", True, 0, "1.0001K", "8X", float("inf")])
def test_sizes_are_whole_bytes_up_to_a_tebibyte(value):
    with pytest.raises(ValueError, match="whole bytes .* to 1T"):
        parse_bytes(value)


def test_a_fraction_with_a_unit_is_a_size():
    assert parse_bytes("1.5K") == 1536 and parse_bytes("1T") == 1 << 40


def test_the_command_reproducer_errors_name_the_right_line(tmp_path):
    # The case: `pb.yaml:4 reproducer.command.timeout` was printed for line 5.
    path = tmp_path / "pb.yaml"
    path.write_text('name: x\nreproducer:\n  kind: command\n  command: "true"\n  timeout: .inf\n')
    (found,) = problems(load_playbook, path)
    assert found.startswith(f"{path}:5 reproducer.timeout: inf is not a duration")


def test_every_problem_at_once_sorted_by_line(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(f"hosts:\n  a:\n  b:\n{HOST.replace('10022', 'true')}version: 2\n")
    found = problems(load_inventory, [path])
    assert [(p.line, p.field) for p in found] == [
        (2, "hosts.a"), (7, "hosts.b.target.guest.port"), (8, "version")], found


def test_problems_of_several_files_are_sorted_by_file(tmp_path):
    (tmp_path / "b.yaml").write_text("hosts:\n  b:\n")
    (tmp_path / "a.yaml").write_text("hosts:\n  a: 1\n")
    assert [p.file for p in problems(load_inventory, [tmp_path])] == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\ndescription: " + "x" * MAX_BYTES + "\n")
    (found,) = problems(load_playbook, path)
    assert found.startswith(f"{path}:1: larger than 1 MiB")
    (found,) = problems(load_playbook, Path("/dev/zero"))  # would be read forever
    assert "larger than 1 MiB" in found


def test_merge_keys_share_settings_and_keep_lines(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(f"""\
x-ssh: &ssh {{address: 127.0.0.1, port: true}}
hosts:
  a:
    ssh: {{<<: *ssh, port: 22}}
    target: {{kind: qemu, guest: {{port: 1, host_key: {KEY}}}}}
  b:
    ssh:
      <<: *ssh
    target: {{kind: qemu, guest: {{port: 1, host_key: {KEY}}}}}
""")
    found = problems(load_inventory, [path])
    assert [(p.line, p.field) for p in found] == [(1, "x-ssh"), (8, "hosts.b.ssh.port")], found


@pytest.mark.parametrize("field,value", [
    ("key", "/nonexistent/id"), ("known_hosts", "/nonexistent/known_hosts")])
def test_missing_key_files_are_load_time_errors(tmp_path, field, value):
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  a:\n" + HOST.replace("{address: 127.0.0.1}", f"{{address: 127.0.0.1, {field}: {value}}}"))
    (found,) = problems(load_inventory, [path])
    assert found == f"{path}:3 hosts.a.ssh.{field}: '{value}': no such file"


def test_a_host_key_file_is_checked_as_a_key(tmp_path):
    pub = tmp_path / "guest.pub"
    pub.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  a:\n" + HOST.replace(KEY, str(pub)))
    (found,) = problems(load_inventory, [path])
    assert "hosts.a.target.guest.host_key: '-----BEGIN OPENSSH PRIVATE KEY-----' is not an OpenSSH public key" in found
    pub.write_text(KEY + "\n")
    assert load_inventory([path]).host("a").target.guest.host_key == KEY


# --- output lines ------------------------------------------------------------------------------


def plain_ui(**kw) -> tuple[UI, Console]:
    console = Console(record=True, force_terminal=False, width=80, file=open("/dev/null", "w"))
    return UI(console=console, **kw), console


def test_error_lines_start_with_what_they_are_about_and_cannot_be_forged():
    ui, console = plain_ui()
    ui.error("inv.yaml:3 hosts.lab\nfirst bad commit: 0000: bad\x1b[2J")
    ui.info("fine")
    error, info = console.export_text().splitlines()
    assert error == "inv.yaml:3 hosts.lab\\nfirst bad commit: 0000: bad\\x1b[2J"
    assert re.match(r"\d{4}-\d\d-\d\dT", info)  # other lines keep their time stamp


def test_quiet_still_shows_errors():
    ui, console = plain_ui(quiet=True)
    ui.info("chatter")
    ui.error("pb.yaml:1 name: bad")
    assert console.export_text() == "pb.yaml:1 name: bad\n"


def test_json_and_quiet_after_the_command():
    args = parser().parse_args(["check", "--json", "-q", "--host", "h", "--playbook", "p"])
    assert args.json and args.quiet
    args = parser().parse_args(["--json", "check", "--host", "h", "--playbook", "p"])
    assert args.json and not args.quiet


def test_config_problems_are_json_events(tmp_path, capsys):
    pb = tmp_path / "pb.yaml"
    pb.write_text("name: x\nreproducer: {kind: nope}\n")
    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts:\n  a:\n" + HOST)
    assert main(["check", "--json", "--host", "a", "--inventory", str(inv), "--playbook", str(pb)]) == 2
    out, err = capsys.readouterr()
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert {k: event[k] for k in ("event", "file", "line", "field")} == {
        "event": "config-error", "file": str(pb), "line": 2, "field": "reproducer.kind"}
    assert "needs a `kind`, one of: scp-stress, command" in event["message"]
    assert err.startswith(f"{pb}:2 reproducer.kind: ")


# --- the published schemas -----------------------------------------------------------------------


def schema(kind: str) -> dict:
    return json.loads((ROOT / ("inventory" if kind == "inventory" else "playbooks") / "schema.json").read_text())


def lab_inventory(tmp_path: Path) -> Path:
    from fleetbisect.lab.demo import write_lab_inventory

    for name in ("user_key", "known_hosts", "guest_key"):
        (tmp_path / name).write_text("")
    (tmp_path / "guest.pub").write_text(KEY + "\n")
    host = SimpleNamespace(name="lab-host", port=2222, user="bisect", user_key=tmp_path / "user_key",
                           known_hosts=tmp_path / "known_hosts", base_dir=tmp_path)
    assets = SimpleNamespace(guest_user="root", guest_user_key=tmp_path / "guest_key",
                             guest_host_key_pub_file=tmp_path / "guest.pub")
    return write_lab_inventory(tmp_path / "inventory.yaml", [host], assets)


def shipped(kind: str) -> list[Path]:
    if kind == "inventory":
        return sorted((ROOT / "inventory").glob("*.yaml"))
    return sorted([*(ROOT / "playbooks").glob("*.yaml"), *(ROOT / "fleetbisect" / "lab" / "playbooks").glob("*.yaml")])


@pytest.mark.parametrize("kind", ["inventory", "playbook"])
def test_every_shipped_and_test_file_validates_against_the_schema(kind, tmp_path):
    validator = jsonschema.Draft202012Validator(schema(kind))
    files = shipped(kind)
    if kind == "inventory":
        files.append(lab_inventory(tmp_path))
        (tmp_path / "test.yaml").write_text("hosts:\n  a:\n" + HOST)
        files.append(tmp_path / "test.yaml")
        load_inventory(files[-2:])  # the loader accepts them too
    else:
        for path in files:
            load_playbook(path)
    assert len(files) >= 2
    for path in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path, errors)


@pytest.mark.parametrize("name", [
    "inventory/ssh-port-true", "inventory/connect-timeout-inf", "inventory/target-accel-fast",
    "inventory/host-name-space", "inventory/top-level-unknown-key", "inventory/ssh-no-address-nor-alias",
    "playbook/scp-size-decimal-string", "playbook/scp-size-bool", "playbook/command-timeout-1e99",
    "playbook/kind-unknown", "playbook/policy-retries-true", "playbook/build-localversion-1",
])
def test_corpus_files_are_refused_by_the_schema_too(name):
    path = ROOT / "tests" / "corpus" / f"{name}.yaml"
    kind = name.split("/")[0]
    assert list(jsonschema.Draft202012Validator(schema(kind)).iter_errors(yaml.safe_load(path.read_text())))
    with pytest.raises(ConfigError):
        load_inventory([path]) if kind == "inventory" else load_playbook(path)


def test_schemas_are_generated_from_the_models():
    assert InventoryFile.model_json_schema() == schema("inventory")
    assert Playbook.model_json_schema() == schema("playbook")
