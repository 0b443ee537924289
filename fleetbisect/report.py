"""The run's report: `report.json` (machine-readable), rewritten atomically after every step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_json_atomic
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
    candidates: list[str] = field(default_factory=list)
    status: str = "running"  # running | found | inconclusive | aborted | interrupted
    message: str = ""

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
            "candidates": self.candidates,
            "bisect_log": "bisect.log",
            "steps": [s.to_json() for s in self.steps],
        }

    def write(self) -> Path:
        return write_json_atomic(self.run_dir / "report.json", self.to_json())

