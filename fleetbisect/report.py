"""The run's report: `report.json` (machine-readable), rewritten atomically after every step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from .files import write_atomic, write_json_atomic
from .step import StepRecord

REPORT_VERSION = 1


@dataclass
class Report:
    run_dir: Path
    repo: str
    good: str
    bad: str
    host: str
    playbook: str
    playbook_digest: str
    started: float = field(default_factory=time.time)
    steps: list[StepRecord] = field(default_factory=list)
    culprit: str | None = None
    culprit_subject: str | None = None
    culprit_author: str | None = None
    candidates: list[str] = field(default_factory=list)
    # running | found | unconfirmed | inconclusive | endpoint-failed | setup-error | aborted | interrupted
    status: str = "running"
    message: str = ""
    confirmed: bool | None = None  # None: not retested (confirm: 0, or no culprit)
    # How the running kernel was proved to be the build: verified | release-only | not-verified
    kernel_identity: str = "verified"
    kernel_identity_note: str = ""
    # A search other than git's bisect (several hosts, a flaky reproducer)
    search: str = "bisect"
    search_answer: dict | None = None  # search.Answer: confidence, runs, runner-up, log
    calibration: dict | None = None  # flaky: the bad end's hit rate and its interval
    set_aside: dict[str, str] = field(default_factory=dict)  # host -> why it was set aside
    step_hosts: dict[int, str] = field(default_factory=dict)  # step index -> host that ran it

    def to_json(self) -> dict:
        return {
            "version": REPORT_VERSION,
            "repo": self.repo,
            "good": self.good,
            "bad": self.bad,
            "host": self.host,
            "playbook": self.playbook,
            "playbook_digest": self.playbook_digest,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "elapsed": round(time.time() - self.started, 1),
            "status": self.status,
            "message": self.message,
            "culprit": self.culprit,
            "culprit_subject": self.culprit_subject,
            "culprit_author": self.culprit_author,
            "confirmed": self.confirmed,
            "kernel_identity": self.kernel_identity,
            "kernel_identity_note": self.kernel_identity_note,
            "candidates": self.candidates,
            "bisect_log": "bisect.log",
            "search": self.search,
            "search_answer": self.search_answer,
            "calibration": self.calibration,
            "set_aside": self.set_aside,
            "steps": [{**s.to_json(), "host": self.step_hosts.get(s.index, self.host)} for s in self.steps],
        }

    def write(self) -> Path:
        """report.json and report.md, rewritten after every step."""
        data = self.to_json()
        log = self.run_dir / "bisect.log"
        data_md = dict(data, bisect_log_text=log.read_text() if log.exists() else "")
        write_atomic(self.run_dir / "report.md", render_markdown(data_md))
        write_atomic(self.run_dir / "report.html", render_html(data_md))
        return write_json_atomic(self.run_dir / "report.json", data)



def render_markdown(data: dict) -> str:
    """report.md: for a bug report or a mailing-list post."""
    out = [f"# fleetbisect run on {data['host']}", ""]
    if data["culprit"]:
        held = {True: "confirmed on retest", False: "NOT confirmed on retest", None: "not retested"}
        title = "First bad commit" if data["status"] == "found" else "Suspect (NOT confirmed)"
        out += [f"**{title}:** `{data['culprit']}` {data.get('culprit_subject') or ''}",
                "", f"Author: {data.get('culprit_author') or '?'}",
                "", f"{_held(data, held)}. {data['message']}", ""]
    else:
        out += [f"**Status:** {data['status']}: {data['message']}", ""]
    out += [
        f"- repository: `{data['repo']}`",
        f"- range: good `{data['good'][:12]}`, bad `{data['bad'][:12]}`",
        f"- playbook: `{data['playbook']}` (digest `{data['playbook_digest'][:12]}`)",
        f"- running kernel checked: {data.get('kernel_identity', '?')} ({data.get('kernel_identity_note', '')})",
        f"- started {data['started']}, {data['elapsed']:.0f}s, {len(data['steps'])} steps",
        "",
    ]
    out += _search_lines(data)
    out += [
        "| # | host | commit | verdict | why | " + " | ".join(STAGES) + " | evidence |",
        "|---|---|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for s in data["steps"]:
        durs = " | ".join(f"{s['durations'][k]:.1f}s" if k in s["durations"] else "" for k in STAGES)
        ev = " ".join(f"[{Path(e).name}]({e})" for e in s["evidence"])
        reason = s["reason"].replace("|", "\\|")
        role = "" if s.get("role", "bisect") == "bisect" else f" ({s['role']})"
        out.append(f"| {s['index']} | {s.get('host', '')} | `{s['commit'][:12]}` {s['subject']}{role} | {s['verdict']} | {reason} | "
                   f"{durs} | {ev} |")
    out += _culprit_evidence(data)
    out += ["", "## git bisect log", "", "```", data.get("bisect_log_text", "").rstrip(), "```", ""]
    return "\n".join(out)


def _held(data: dict, held: dict) -> str:
    """How far the culprit is to be trusted: its retest, or (flaky) its posterior probability."""
    ans = data.get("search_answer")
    if data.get("search") == "bayes" and ans:
        return f"Probability {ans['confidence']:.4f} after {ans['runs']} runs (flaky reproducer, not retested)"
    return held[data.get("confirmed")]


def _search_lines(data: dict) -> list[str]:
    """The search's answer (confidence, runs, runner-up), the calibration, the hosts set aside."""
    out = []
    ans, cal = data.get("search_answer"), data.get("calibration")
    if ans:
        out.append(f"- search: {data.get('search')}, {ans['runs']} runs; confidence {ans['confidence']:.4f}"
                   + (f"; runner-up `{ans['runner_up'][:12]}`" if ans.get("runner_up") else ""))
    if cal:
        out.append(f"- reproducer hit rate on the bad end: {cal['hit_rate']:.2f} ({cal['failures']}/{cal['runs']} "
                   f"runs failed; {cal['level']:.0%} interval {cal['low']:.2f}-{cal['high']:.2f}); the good end "
                   f"passed {cal['good_runs']} of {cal['good_runs']}")
    for host, why in (data.get("set_aside") or {}).items():
        out.append(f"- host {host} set aside: {why}")
    return out + ([""] if out else [])


def _culprit_evidence(data: dict) -> list[str]:
    """What the culprit did, in the kernel's own words: outcomes and the console lines behind them."""
    steps = [s for s in data["steps"] if data["culprit"] and s["commit"] == data["culprit"]]
    if not steps:
        return []
    s = steps[0]
    out = ["", f"## What {data['culprit'][:12]} did", ""]
    for o in s["outcomes"]:
        out.append(f"- **{o['kind']}**: {o['summary']}")
    for o in s["outcomes"]:
        for f in [*o.get("details", {}).get("console", ()), *o.get("details", {}).get("findings", ())][:1]:
            where = "console.log" if f in o.get("details", {}).get("console", ()) else "the kernel log"
            out += ["", f"{f['kind']} `{f['title']}` ({where}, line {f['line']}):", "", "```",
                    *f.get("lines", [])[:40], "```"]
    return out


STAGES = ("build", "push", "boot", "ready", "reproduce", "cleanup")
COLOURS = {"build": "#8da0cb", "push": "#66c2a5", "boot": "#fc8d62", "ready": "#e78ac3",
           "reproduce": "#a6d854", "cleanup": "#b3b3b3"}
VERDICT_COLOURS = {"good": "#1a9850", "bad": "#d73027", "skip": "#999999", "abort": "#000000"}


def render_html(data: dict) -> str:
    """report.html: the same facts, with a timeline of the steps (stage durations as bars)."""
    from html import escape as h

    longest = max((sum(s["durations"].values()) for s in data["steps"]), default=1.0) or 1.0
    rows = []
    for s in data["steps"]:
        bars = "".join(
            f'<span class="bar" style="width:{100 * s["durations"][k] / longest:.2f}%;background:{COLOURS[k]}" '
            f'title="{k} {s["durations"][k]:.1f}s"></span>'
            for k in STAGES if s["durations"].get(k)
        )
        ev = " ".join(f'<a href="{h(e)}">{h(Path(e).name)}</a>' for e in s["evidence"])
        role = "" if s.get("role", "bisect") == "bisect" else f' <em>({h(s["role"])})</em>'
        rows.append(
            f'<tr><td>{s["index"]}</td><td><code>{s["commit"][:12]}</code> {h(s["subject"])}{role}</td>'
            f'<td style="color:{VERDICT_COLOURS.get(s["verdict"], "#000")}"><b>{s["verdict"]}</b></td>'
            f'<td>{h(s["reason"])}</td><td class="tl">{bars}</td>'
            f'<td>{sum(s["durations"].values()):.0f}s</td><td>{ev}</td></tr>'
        )
    if data["culprit"]:
        head = f'First bad commit: <code>{data["culprit"]}</code> {h(data.get("culprit_subject") or "")}'
    else:
        head = f'{h(data["status"])}'
    legend = " ".join(f'<span class="bar" style="width:1em;background:{c}"></span> {k}' for k, c in COLOURS.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fleetbisect run on {h(data["host"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
td.tl {{ width: 35%; }} .bar {{ display: inline-block; height: 1em; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{head}</h1>
<p>{h(data["message"] or "")}</p>
<p>repository <code>{h(data["repo"])}</code>, good <code>{data["good"][:12]}</code>,
bad <code>{data["bad"][:12]}</code>, host {h(data["host"])}, playbook <code>{h(data["playbook"])}</code>;
started {h(data["started"])}, {data["elapsed"]:.0f}s, {len(data["steps"])} steps.</p>
<p>{legend}</p>
<table><tr><th>#</th><th>commit</th><th>verdict</th><th>why</th><th>timeline</th><th>time</th><th>evidence</th></tr>
{chr(10).join(rows)}
</table>
<h2>git bisect log</h2><pre>{h(data.get("bisect_log_text", ""))}</pre>
</body></html>
"""


def load(run_dir: Path) -> dict:
    import json

    from .errors import UserError

    path = run_dir / "report.json"
    if not path.exists():
        raise UserError(f"{run_dir} is not a fleetbisect run directory (no report.json)")
    return json.loads(path.read_text())


def answer_line(status: str, culprit: str | None, subject: str | None, message: str) -> str:
    """The one line a script reads: `first bad commit:` only for a culprit that was found and
    held (or was not retested); a culprit that failed its retest is a suspect, said so."""
    if culprit and status == "found":
        return f"first bad commit: {culprit} {subject or ''}".rstrip()
    if culprit:
        return f"suspect (NOT confirmed, {status}): {culprit} {subject or ''}: {message}"
    return f"no culprit ({status}): {message}"


def show(run_dir: Path, console) -> None:
    """`fleetbisect report RUN_DIR`: the summary of any run, finished or not."""
    from rich.table import Table

    data = load(run_dir)
    console.print(escape(answer_line(data["status"], data["culprit"], data.get("culprit_subject"),
                                     data["message"] or "")), style="bold")
    if data["culprit"] and data["status"] == "found":
        console.print(escape(data["message"] or ""))
    console.print(
        f"{data['repo']}  good {data['good'][:12]}  bad {data['bad'][:12]}  on {data['host']}  "
        f"{len(data['steps'])} steps in {data['elapsed']:.0f}s"
    )
    table = Table(show_header=True, header_style="bold")
    for col in ("#", "commit", "verdict", "why", *STAGES):
        table.add_column(col)
    for s in data["steps"]:
        table.add_row(
            str(s["index"]), f"{s['commit'][:12]} {escape(s['subject'][:40])}", s["verdict"],
            escape(s["reason"][:60]),
            *(f"{s['durations'][k]:.1f}" if k in s["durations"] else "" for k in STAGES),
        )
    console.print(table)
    console.print(f"report: {run_dir / 'report.md'}")


def status(run_dir: Path) -> str:
    """`fleetbisect status RUN_DIR`: where a running or stopped run is, and whether a controller
    still drives it. On this machine the run-directory lock says so (the kernel drops it when
    the controller dies); a controller on another machine cannot be checked from here, so the
    age of its last lease renewal and last event are shown instead."""
    import socket

    from .journal import LOCK, holder_of, lock_is_held, read, replay
    from .lease import TTL

    events, note = read(run_dir)
    state = replay(events)
    last = events[-1] if events else {}
    holder = holder_of(run_dir) or next(
        (e.get("controller") for e in reversed(events) if e.get("controller")), None) or {}
    lines = [f"run {state.config.get('run_id', '?')} on "
             f"{', '.join(state.config.get('hosts') or [state.config.get('host', '?')])}"
             f"{' (' + state.config['search'] + ' search)' if state.config.get('search', 'bisect') != 'bisect' else ''}: "
             f"{len(state.steps)} steps done"
             + ("" if state.config.get("hosts") else f", {len(state.marks)} marks")]
    now = time.time()
    last_at = (f"last event {last.get('event')} at "
               + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0)))
               + f" ({_age(now - last.get('time', now))} ago)")
    pid, where = holder.get("pid", "?"), holder.get("host")
    if where and where != socket.gethostname():
        alive = None  # cannot tell from here
        try:
            renewed = f"; lease last renewed {_age(now - (run_dir / LOCK).stat().st_mtime)} ago"
        except OSError:
            renewed = ""
        state_line = (f"driven from {where} (pid {pid}), cannot check from here{renewed}; {last_at}. "
                      f"A live controller renews its lease every {TTL // 3}s; one silent for over "
                      f"{TTL}s is dead or cut off, and `resume` takes over once its lease expired")
    else:
        held = lock_is_held(run_dir)
        alive = held if held is not None else _pid_alive(pid)  # no lock file: a run from before it
        state_line = (f"running (controller pid {pid} on this machine); {last_at}" if alive else
                      f"stopped (controller pid {pid} is not running); {last_at}")
    if state.finished:
        lines.append(f"finished: {state.finished.get('status')}: {state.finished.get('message', '')}")
    else:
        lines.append(state_line)
        if state.interrupted_step and not state.config.get("hosts"):
            lines.append(f"step {state.interrupted_step['index']} ({state.interrupted_step['commit'][:12]}) "
                         "was started and not finished" + (": resume tests it again" if alive is False else ""))
        if alive is False:
            lines.append(f"continue with: fleetbisect resume {run_dir}")
    hosts = [h for h in (state.config.get("hosts") or []) if h]
    if hosts:  # several hosts (or a search of its own): where each one is
        busy = {e.get("host"): e for e in state.in_flight.values()}
        done = {}
        for r in state.steps:
            done[r.get("host")] = done.get(r.get("host"), 0) + 1
        for h in hosts:
            e = busy.get(h)
            now_doing = (f"step {e['index']} {e['commit'][:12]} ({e.get('role', 'bisect')})"
                         + (" running" if alive and not state.finished else " started, not finished") if e else "idle")
            why = state.set_aside.get(h)
            lines.append(f"  {h}: {done.get(h, 0)} steps done; " + (f"set aside: {why}" if why else now_doing))
    if note:
        lines.append(note)
    return "\n".join(lines)


def _pid_alive(pid) -> bool:
    import os

    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(seconds: float) -> str:
    from .ui import fmt_duration

    return fmt_duration(max(0.0, seconds))
