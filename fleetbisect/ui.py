"""The one rich Console, the live view, the heartbeat and the run's log.

- On a terminal: a live panel (range, steps done and left, current stage with elapsed time and
  deadline, ETA, verdicts so far) above the scrolling messages.
- Not on a terminal (nohup, systemd, CI): plain timestamped lines, and a heartbeat line at
  least once a minute so a watcher can tell a long stage from a dead controller.
- `--json`: one JSON event per line on stdout, for other tools; messages stay on stderr.
- Always: everything at debug level to the run directory's `run.log`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .config.yamlsafe import printable
from .masking import mask, mask_json

log = logging.getLogger("fleetbisect")

HEARTBEAT = 60.0


@dataclass
class Progress:
    """What the live view and the heartbeat show; updated by the run as it goes."""

    host: str = ""
    commits: int = 0
    left: int = 0  # commits git still chooses between
    step: int = 0
    commit: str = ""
    stage: str = ""
    stage_started: float = 0.0
    stage_budget: float | None = None
    step_started: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    verdicts: list[tuple[str, str]] = field(default_factory=list)  # (sha12, verdict)
    # Several hosts: what each one does now (host -> [step, commit, stage, stage started]).
    hosts: dict[str, list] = field(default_factory=dict)

    @property
    def steps_left(self) -> int:
        return math.ceil(math.log2(self.left)) if self.left > 1 else (1 if self.left == 1 else 0)

    def eta(self) -> float | None:
        if not self.step_seconds:
            return None
        return sum(self.step_seconds) / len(self.step_seconds) * self.steps_left

    def line(self) -> str:
        now = time.monotonic()
        parts = [f"step {self.step} {self.commit[:12]}"]
        if self.stage:
            budget = f"/{self.stage_budget:.0f}s" if self.stage_budget else ""
            parts.append(f"{self.stage} {now - self.stage_started:.0f}s{budget}")
        parts.append(f"~{self.steps_left} steps left")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        return ", ".join(parts)


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class UI:
    def __init__(self, console: Console | None = None, quiet: bool = False, json_events: bool = False):
        self.console = console or Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.json_events = json_events
        self.plain = not self.console.is_terminal
        self.progress = Progress()
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # --- messages ------------------------------------------------------------------------

    def _emit(self, style: str, text: str, stamp: bool = True, always: bool = False) -> None:
        # One message is one line: a newline or a terminal escape in a name or a path from the
        # input is shown escaped, so no input can forge a line of output.
        text = printable(mask(text))
        if self.quiet and not always:
            return
        with self._lock:
            if self.plain:
                if stamp:
                    text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}"
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), soft_wrap=True)

    def info(self, text: str) -> None:
        log.info(text)
        self._emit("", text)

    def step(self, text: str) -> None:
        log.info(text)
        self._emit("bold", text)

    def good(self, text: str) -> None:
        log.info(text)
        self._emit("green", text)

    def warn(self, text: str) -> None:
        log.warning(text)
        self._emit("yellow", text)

    def error(self, text: str) -> None:
        """An error line starts with what it is about (`FILE:LINE field: ...`), on a terminal
        and off it: no timestamp in front, so editors and scripts can jump to it."""
        log.error(text)
        self._emit("bold red", text, stamp=False, always=True)  # -q: "only the result and errors"

    def detail(self, text: str) -> None:
        log.debug(text)

    # --- events --------------------------------------------------------------------------

    def event(self, kind: str, **data) -> None:
        """A machine-readable event: logged, and printed on stdout with --json."""
        log.debug("event %s %s", kind, data)
        if self.json_events:
            line = json.dumps(mask_json({"time": round(time.time(), 3), "event": kind, **data}), default=str)
            with self._lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        p = self.progress
        host = data.get("host") if kind != "run-started" else None
        if host:  # one line per host in the live view
            now = p.hosts.setdefault(host, [0, "", "", 0.0])
            if kind == "step-started":
                now[:] = [data["index"], data["commit"], "", time.monotonic()]
            elif kind == "stage-started":
                now[2:] = [data["stage"], time.monotonic()]
            elif kind == "step-finished":
                now[2:] = [f"idle ({data['commit'][:12]} {data['verdict']})", time.monotonic()]
            elif kind == "host-set-aside":
                now[2:] = ["set aside", time.monotonic()]
        if kind == "run-started":
            p.host, p.commits, p.left = data["host"], data["commits"], data["commits"]
        elif kind == "step-started":
            p.step, p.commit, p.stage, p.left = data["index"], data["commit"], "", data.get("left", p.left)
            p.step_started = time.monotonic()
        elif kind == "stage-started":
            p.stage, p.stage_started, p.stage_budget = data["stage"], time.monotonic(), data.get("budget")
        elif kind == "step-finished":
            p.step_seconds.append(time.monotonic() - p.step_started)
            p.verdicts.append((data["commit"][:12], data["verdict"]))
            p.stage = ""
        self._refresh()

    def for_host(self, host: str) -> "HostUI":
        """This UI for an executor: its messages say the host, its events carry it."""
        return HostUI(self, host)

    # --- live view and heartbeat -----------------------------------------------------------

    @contextmanager
    def live(self) -> Iterator[None]:
        """The live view on a terminal, the heartbeat elsewhere, for the length of a run."""
        if self.quiet:
            yield
            return
        self._stop.clear()
        if not self.plain:
            self._live = Live(self._render(), console=self.console, refresh_per_second=2,
                              get_renderable=self._render, transient=False)
            self._live.start()
        else:
            self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            self._beat.start()
        try:
            yield
        finally:
            self._stop.set()
            if self._live:
                self._live.stop()
                self._live = None
            if self._beat:
                self._beat.join(timeout=2)
                self._beat = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            p = self.progress
            if len(p.hosts) > 1:
                now = time.monotonic()
                self._emit("", "heartbeat: " + "; ".join(
                    f"{h} step {st} {c[:12]} {stage} {now - since:.0f}s" if st else f"{h} {stage}"
                    for h, (st, c, stage, since) in sorted(p.hosts.items())))
            elif p.step:
                self._emit("", f"heartbeat: {p.line()}")

    def _refresh(self) -> None:
        if self._live:
            self._live.refresh()

    def _render(self):
        p = self.progress
        table = Table.grid(padding=(0, 2))
        table.add_row(Text("host", style="dim"), p.host)
        table.add_row(Text("range", style="dim"), f"{p.commits} commits, ~{p.steps_left} steps left")
        if len(p.hosts) > 1:
            for host, (step, commit, stage, since) in sorted(p.hosts.items()):
                table.add_row(Text(host, style="dim"),
                              f"step {step} {commit[:12]} {stage} {time.monotonic() - since:.0f}s" if step else stage)
        elif p.step:
            table.add_row(Text("now", style="dim"), p.line())
        if p.verdicts:
            shown = "  ".join(f"{c} {v}" for c, v in p.verdicts[-8:])
            table.add_row(Text("verdicts", style="dim"), shown)
        return Group(Text("fleetbisect", style="bold"), table)


class HostUI:
    """The run's UI as one host's executor sees it (several run at once)."""

    def __init__(self, ui: UI, host: str):
        self.ui, self.host = ui, host
        self.quiet, self.json_events, self.console = ui.quiet, ui.json_events, ui.console

    def event(self, kind: str, **data) -> None:
        self.ui.event(kind, **{"host": self.host, **data})

    def __getattr__(self, name: str):
        fn = getattr(self.ui, name)
        if name in ("info", "step", "good", "warn", "error", "detail"):
            return lambda text: fn(f"{self.host}: {text}")
        return fn


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Debug-level log of everything into the run directory, for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("fleetbisect")
    ours.setLevel(logging.DEBUG)
    ours.addHandler(handler)
    # paramiko's own complaints (a failed handshake's traceback) belong in the file, not on the
    # terminal: the error the user needs reaches them as a RemoteError message.
    transport = logging.getLogger("paramiko")
    transport.addHandler(handler)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        transport.removeHandler(handler)
        handler.close()
