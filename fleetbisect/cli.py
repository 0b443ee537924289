"""Commands only: parse, load config, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__, masking
from .errors import ConfigError, FleetbisectError, UserError
from .ui import UI

# `git bisect run` reads 1..127 (but 125) as "bad": any failure of `step` that is not a
# verdict must exit >= 128 so that git stops instead of marking a wrong commit.
STEP_ABORT = 128


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleetbisect"


def default_inventory() -> list[Path]:
    found = [p for p in (Path("inventory"),) if p.exists()]
    cfg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "fleetbisect" / "inventory"
    if cfg.exists():
        found.append(cfg)
    return found


def _add_target_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    if many:  # `run`: one host, several, or an inventory group
        p.add_argument("--host", action="append", default=[], dest="hosts",
                       help="host name from the inventory (repeatable: one executor per host)")
        p.add_argument("--group", action="append", default=[], help="every host of an inventory group")
        p.add_argument("--search", choices=("auto", "bisect", "kary", "bayes"),
                       help="which commits to test next: git's bisect (one host), kary (several hosts), "
                       "bayes (a flaky reproducer); default: the playbook's policy.search (auto)")
    else:
        p.add_argument("--host", required=True, help="host name from the inventory")
    p.add_argument("--playbook", required=True, type=Path, help="playbook YAML file")
    p.add_argument(
        "--inventory", action="append", type=Path,
        help="inventory file or directory (repeatable; default: ./inventory and "
        "~/.config/fleetbisect/inventory)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fleetbisect", description="Bisect Linux kernel regressions on remote machines."
    )
    ap.add_argument("--version", action="version", version=f"fleetbisect {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="only the result and errors")
    ap.add_argument("--json", action="store_true", help="machine-readable events on stdout")
    ap.add_argument("--debug", action="store_true",
                    help="print the traceback of an internal error (it always goes to run.log)")
    # The same options after the command (`fleetbisect check --json ...`); SUPPRESS keeps a
    # value given before the command when it is not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only the result and errors")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable events on stdout")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an internal error (it always goes to run.log)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[common], **kw)  # type: ignore[method-assign]

    p = sub.add_parser("run", help="bisect a range end to end and report the first bad commit")
    _add_target_args(p, many=True)
    p.add_argument("--repo", type=Path, default=Path("."), help="kernel git repository (default: .)")
    p.add_argument("--good", required=True, help="a commit known to be good")
    p.add_argument("--bad", required=True, help="a commit known to be bad")
    p.add_argument("--run-dir", type=Path, help="where the run's evidence and report go")
    p.add_argument("--no-endpoint-check", action="store_true",
                   help="trust --good and --bad without testing them first")
    p.add_argument("--hook", action="append", default=[], metavar="EVENT=COMMAND",
                   help="run COMMAND on EVENT (start, verdict, finish, failure); repeatable")

    p = sub.add_parser("resume", help="continue a run whose controller died or was interrupted")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    p = sub.add_parser("report", help="print the summary of a run, finished or not")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    p = sub.add_parser("status", help="where a running or stopped run is")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    p = sub.add_parser("step", help="test HEAD once; exit 0 good, 1 bad, 125 skip, 128 abort "
                       "(for `git bisect run`)")
    _add_target_args(p)
    p.add_argument("--repo", type=Path, default=Path("."), help="tree to build (default: .)")
    p.add_argument("--evidence-dir", type=Path, help="where this step's evidence goes")

    p = sub.add_parser("check", help="validate inventory and playbook, probe the host; change nothing")
    _add_target_args(p)

    p = sub.add_parser("demo", help="bring up the embedded lab and bisect its seeded regression")
    p.add_argument("--dir", type=Path, help="where the lab and the run go (default: state dir)")
    p.add_argument("--commits", type=int, default=210, help="commits in the generated repo")
    p.add_argument("--seed", type=int, help="seed of the generated repo (default: random)")
    p.add_argument("--scenario", default="net-hang",
                   choices=("net-hang", "panic", "oops-warning", "boot-slow", "console", "flaky"),
                   help="which regression the lab seeds (default: net-hang)")
    p.add_argument("--target", default="qemu", choices=("qemu", "libvirt", "baremetal"),
                   help="what boots the guest: a QEMU per step, a libvirt domain, or a bare-metal box "
                   "(its own kernel, with a BMC) (default: qemu)")
    p.add_argument("--hosts", type=int, default=1, choices=range(1, 8), metavar="N",
                   help="VM hosts in the lab (each its own sshd and QEMU), bisecting together (default 1)")
    p.add_argument("--image", action="store_true",
                   help="build each commit's guest as a disk image (qcow2) that the host converts onto "
                   "the VM's disk, as a NixOS image build does")
    p.add_argument("--real-kernel", action="store_true",
                   help="bisect a real kernel built from Debian's linux-source-6.1 (the first build takes minutes)")
    p.add_argument("--slots", type=int, default=1, choices=range(1, 5), metavar="N",
                   help="VMs each lab host runs at once (inventory `slots:`), testing that many commits "
                        "side by side (default 1)")
    p.add_argument("--build-ahead", type=int, default=0, metavar="N",
                   help="with --real-kernel: commits built ahead while a host tests (default 0: none)")

    p = sub.add_parser("initramfs", help="build an init-as-reproducer initramfs (for the console reproducer)")
    isub = p.add_subparsers(dest="initramfs_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="pack REPRO (a program or script) with busybox and an /init that runs it")
    b.add_argument("repro", type=Path, metavar="REPRO")
    b.add_argument("-o", "--output", type=Path, required=True, help="the initramfs to write")
    b.add_argument("--timeout", type=int, default=600, help="seconds the reproducer may run (default 600)")
    b.add_argument("--file", action="append", type=Path, default=[], dest="files",
                   help="another program the reproducer needs, installed in /usr/bin (repeatable)")

    p = sub.add_parser("schema", help="print the JSON schema of inventory or playbook files")
    p.add_argument("kind", choices=("inventory", "playbook"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Without a handler, Python prints paramiko's warnings (with tracebacks) to stderr.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    logging.getLogger("fleetbisect").addHandler(logging.NullHandler())  # the UI prints; logs go to run.log
    # A log line that cannot be written (a full disk) must not print a traceback: the error
    # that matters reaches the user as a message.
    logging.raiseExceptions = False
    # SIGTERM (systemd, a scheduler, `kill`) stops like Ctrl-C: VM stopped, journal says where.
    signal.signal(signal.SIGTERM, _interrupt)
    masking.register()  # secret-looking environment variables never reach a log
    ui = UI(quiet=args.quiet, json_events=args.json)
    abort_code = STEP_ABORT if args.command == "step" else None
    try:
        return COMMANDS[args.command](args, ui)
    except ConfigError as e:
        for problem in e.problems:
            ui.error(problem)
            if ui.json_events:
                ui.event("config-error", **(problem.as_event() if hasattr(problem, "as_event") else {"message": problem}))
        return abort_code or e.exit_code
    except UserError as e:
        ui.error(f"error: {e}")
        return abort_code or e.exit_code
    except FleetbisectError as e:
        ui.error(f"aborted: {e}")
        return abort_code or e.exit_code
    except KeyboardInterrupt:
        ui.error("interrupted")
        return abort_code or 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(e, ui, args)
        # The journal is fsync'd line by line: what was whole stays whole.
        ui.error(f"disk full writing {e.filename or 'the run directory'}: {e.strerror}. Free some "
                 "space, then `fleetbisect resume RUN_DIR` continues where it stopped")
        return abort_code or 128
    except Exception as e:  # noqa: BLE001 - the one guard: a bug is never a verdict
        return _internal_error(e, ui, args)


def _internal_error(e: BaseException, ui: UI, args) -> int:
    """Anything that escapes a command is a fault of the tool, never a verdict: exit 128 (which
    `git bisect run` reads as "stop", where 1 would mark the commit bad) with one line; the
    traceback goes to the log, and to the terminal with --debug."""
    logging.getLogger("fleetbisect").error("internal error", exc_info=e)
    if args.debug:
        import traceback

        traceback.print_exception(e)
    ui.error(f"internal error (a fleetbisect bug, not a verdict): {type(e).__name__}: {e}"
             + ("" if args.debug else "; --debug shows the traceback"))
    return STEP_ABORT


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _load(args):
    from .config.inventory import load_inventory
    from .config.playbook import load_playbook

    paths = args.inventory or default_inventory()
    if not paths:
        raise UserError("no inventory: pass --inventory FILE|DIR or create ./inventory/")
    # Validate both before anything touches a host.
    problems: list[str] = []
    inventory = playbook = None
    try:
        inventory = load_inventory(paths)
    except ConfigError as e:
        problems += e.problems
    try:
        playbook = load_playbook(args.playbook)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    if hasattr(args, "hosts"):  # `run`: every --host and every host of each --group, in order
        hosts = [inventory.host(h) for h in args.hosts] + [h for g in args.group for h in inventory.group(g)]
        # a host with `slots: N` runs N steps at once: N hosts to the run (NAME, NAME#2, ...)
        hosts = list({slot.name: slot for h in hosts for slot in h.slot_hosts()}.values())
        if not hosts:
            raise UserError("name the host(s) to run on: --host NAME (repeatable) or --group NAME")
        return hosts, playbook
    return inventory.host(args.host), playbook


def cmd_run(args, ui: UI) -> int:
    from .config.inventory import path_name
    from .hooks import EVENTS
    from .run import start_run

    hooks: dict[str, list[str]] = {}
    for h in args.hook:
        event, sep, command = h.partition("=")
        if not sep or event not in EVENTS or not command.strip():
            raise UserError(f"--hook {h!r}: expected EVENT=COMMAND with EVENT one of {', '.join(EVENTS)}")
        hooks.setdefault(event, []).append(command)
    hosts, playbook = _load(args)
    name = path_name(hosts[0].name) + (f"+{len(hosts) - 1}" if len(hosts) > 1 else "")
    run_dir = args.run_dir or state_dir() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    with ui.live():
        report = start_run(
            repo=args.repo, good=args.good, bad=args.bad, host=hosts[0], hosts=hosts, search=args.search,
            inventory=args.inventory or default_inventory(), playbook=playbook,
            playbook_path=args.playbook, run_dir=run_dir, ui=ui,
            check_endpoints=False if args.no_endpoint_check else None, hooks=hooks,
        )
    return print_result(report, ui)


def cmd_resume(args, ui: UI) -> int:
    from .run import resume_run

    with ui.live():
        report = resume_run(args.run_dir, ui)
    return print_result(report, ui)


def print_result(report, ui: UI) -> int:
    """The answer goes to stdout (for scripts), everything else to stderr."""
    from .report import answer_line

    ui.info(f"run directory: {report.run_dir}")
    if ui.json_events:
        pass  # the run-finished event already said it
    elif report.culprit:  # a script reading stdout must never take a suspect for the answer
        print(answer_line(report.status, report.culprit, report.culprit_subject, report.message))
    else:
        ui.error(report.message)
    return 0 if report.status == "found" else 1


def cmd_step(args, ui: UI) -> int:
    from .lease import new_token
    from .run import leased
    from .search.gitbisect import resolve, subject
    from .step import Lab, run_step

    host, playbook = _load(args)
    repo = args.repo.resolve()
    commit = resolve(repo, "HEAD")
    evidence = args.evidence_dir or state_dir() / "steps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{commit[:12]}"
    # The host's lease for this step alone (a run holding it makes this exit 128); a verdict
    # from a step that lost it on the way is not given to git.
    token = new_token()
    with leased(host, f"step-{token}", playbook.policy.retries, ui, token) as keeper:
        record = run_step(
            Lab(repo, host, playbook, ui, lease=keeper), 1, commit, subject(repo, commit), evidence / "steps" / commit[:12]
        )
        keeper.check()
    ui.info(f"{commit[:12]}: {record.verdict.value} ({record.reason}); evidence in {evidence}")
    return record.verdict.exit_code


def cmd_check(args, ui: UI) -> int:
    from .check import check_host

    host, playbook = _load(args)
    return 0 if check_host(host, playbook, ui) else 1


def cmd_demo(args, ui: UI) -> int:
    from .lab.demo import demo

    base = args.dir or state_dir() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    with ui.live():
        return demo(base, ui, commits=args.commits, seed=args.seed, scenario=args.scenario, target=args.target,
                    image=args.image, hosts=args.hosts, slots=args.slots, real_kernel=args.real_kernel, ahead=args.build_ahead)


def cmd_report(args, ui: UI) -> int:
    from rich.console import Console

    from .report import show

    show(args.run_dir, Console())
    return 0


def cmd_status(args, ui: UI) -> int:
    from .report import status

    print(status(args.run_dir))
    return 0


def cmd_initramfs(args, ui: UI) -> int:
    from .initramfs import build_reproducer_image

    out = build_reproducer_image(args.repro, args.output, timeout=args.timeout, files=args.files)
    ui.info(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): boot it with a `console` reproducer playbook")
    return 0


def cmd_schema(args, ui: UI) -> int:
    import json

    from .config.inventory import InventoryFile
    from .config.playbook import Playbook

    model = InventoryFile if args.kind == "inventory" else Playbook
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


COMMANDS = {"schema": cmd_schema, "initramfs": cmd_initramfs, "run": cmd_run, "resume": cmd_resume, "report": cmd_report, "status": cmd_status, "step": cmd_step, "check": cmd_check, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
