"""The playbook: how to build, push, boot and reproduce, and how outcomes become verdicts.

Shell snippets here (`build.command`, a `command` reproducer) are trusted configuration, like a
Makefile: they are run as written. Data the tool adds (commit ids, paths) never gets pasted into
them; it travels in the environment or as quoted argv words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from ..verdict import DEFAULT_POLICY, UNTESTED, OutcomeKind
from .loader import Bytes, Seconds, Strict, digest, read_yaml, validate

ACTIONS = ("good", "bad", "skip", "retry", "abort")


class Build(Strict):
    command: str = "make olddefconfig && make -j$(nproc)"
    timeout: Seconds = 3600.0
    env: dict[str, str] = Field(default_factory=dict)
    cherry_picks: list[str] = Field(default_factory=list)  # fixes applied for the build only
    localversion: bool = True  # stamp LOCALVERSION=-fb<sha12> so the guest can prove its kernel
    release_file: str | None = "include/config/kernel.release"


class Boot(Strict):
    cmdline: str = "console=ttyS0 panic=-1"
    root: str | None = None  # a disk image on the host, attached read-only (snapshot=on)
    memory: int = Field(default=1024, ge=64, description="MiB")
    cpus: int = Field(default=1, ge=1)
    qemu_args: list[str] = Field(default_factory=list)
    timeout: Seconds = 300.0  # from QEMU start to a guest that answers SSH


class Verify(Strict):
    # What prints the running kernel's release in the guest; compared with the build's.
    command: str = "uname -r"


class Push(Strict):
    timeout: Seconds = 600.0


class ScpStress(Strict):
    """Copy `size` bytes into the guest `iterations` times, each under `timeout`."""

    kind: Literal["scp-stress"]
    size: Bytes
    iterations: int = Field(default=15, ge=1)
    timeout: Seconds
    dest: str = "/tmp/fleetbisect-stress.bin"


class CommandRepro(Strict):
    """Run a command (in the guest, or on the host); exit status and output decide."""

    kind: Literal["command"]
    command: str
    where: Literal["guest", "host"] = "guest"
    timeout: Seconds
    expect_exit: int = 0
    fail_patterns: list[str] = Field(default_factory=list)
    pass_patterns: list[str] = Field(default_factory=list)

    @field_validator("fail_patterns", "pass_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a regular expression: {e}")
        return v


Reproducer = Annotated[Union[ScpStress, CommandRepro], Field(discriminator="kind")]


class Policy(Strict):
    """Outcome → action. The untested outcomes can never be good or bad."""

    retries: int = Field(default=2, ge=0, le=10)  # attempts again after an infrastructure fault
    outcomes: dict[OutcomeKind, Literal["good", "bad", "skip", "retry", "abort"]] = Field(default_factory=dict)

    @field_validator("outcomes")
    @classmethod
    def _honest(cls, v: dict) -> dict:
        for kind, action in v.items():
            if kind in UNTESTED and action in ("good", "bad"):
                raise ValueError(
                    f"{kind.value}: {action} refused: a {kind.value} step did not test the "
                    f"kernel, so it can only be skip, retry or abort"
                )
        return v


class Playbook(Strict):
    name: str
    description: str = ""
    build: Build = Field(default_factory=Build)
    artifacts: dict[str, str] = Field(default_factory=lambda: {"kernel": "arch/x86/boot/bzImage"})
    push: Push = Field(default_factory=Push)
    boot: Boot = Field(default_factory=Boot)
    verify: Verify = Field(default_factory=Verify)
    reproducer: Reproducer
    policy: Policy = Field(default_factory=Policy)
    digest: SkipJsonSchema[str] = ""  # sha256 of the file, filled in by the loader

    @field_validator("artifacts")
    @classmethod
    def _kernel(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"kernel", "initrd"}
        if unknown:
            raise ValueError(f"unknown artifact {sorted(unknown)[0]!r} (valid: kernel, initrd)")
        if "kernel" not in v:
            raise ValueError("needs a kernel artifact (e.g. kernel: arch/x86/boot/bzImage)")
        for rel in v.values():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"{rel!r}: artifacts are paths inside the tree")
        return v

    @property
    def push_timeout(self) -> float:
        return self.push.timeout

    def policy_map(self) -> dict[OutcomeKind, str]:
        return {**DEFAULT_POLICY, **self.policy.outcomes}


def load_playbook(path: Path) -> Playbook:
    path = Path(path)
    data, lines = read_yaml(path)
    if isinstance(data, dict):
        data = {"name": path.stem, **data, "digest": digest(path)}
    return validate(Playbook, data, path, lines)
