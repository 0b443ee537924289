"""The playbook: how to build, push, boot and reproduce, and how outcomes become verdicts.

Shell snippets here (`build.command`, a `command` reproducer) are trusted configuration, like a
Makefile: they are run as written. Data the tool adds (commit ids, paths) never gets pasted into
them; it travels in the environment or as quoted argv words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .. import masking
from ..errors import ConfigError
from ..verdict import DEFAULT_POLICY, UNTESTED, OutcomeKind
from .loader import Bytes, Int, Seconds, Strict, StrictBool, by_kind, digest, read_yaml, sort_problems, validate

ACTIONS = ("good", "bad", "skip", "retry", "abort")


def _env_value(v):
    if not isinstance(v, str):  # never echo it: a build.env value may be a secret
        raise ValueError("must be a string (value not shown)")
    return v


_DISTCC_HOST = r"^[A-Za-z0-9_.:\[\]-]+(/[1-9][0-9]{0,3})?$"


class Distcc(Strict):
    """Compile through distcc daemons (stages/distcc.py). The build gets the compiler through
    distcc's masquerade directory first on PATH (so a kernel Makefile's `gcc` goes through it
    untouched), `CC="distcc CC"` for Makefiles that read $CC, `DISTCC_HOSTS` and `-j` in
    MAKEFLAGS. `check` connects to every daemon and compiles through each."""

    hosts: list[Annotated[str, Field(pattern=_DISTCC_HOST)]] = Field(
        min_length=1, description="distcc host specs, HOST[:PORT][/LIMIT]: 10.0.0.5:3632/8")
    jobs: int | None = Int(1, 4096, None, description="make -j; default: the hosts' limits added up")
    cc: str = Field("gcc", pattern=r"^[A-Za-z0-9_.+-]+$", description="the compiler distcc runs")
    # When no daemon answers, compile locally (distcc's own default). False makes a dead daemon
    # fail the build (a skip) instead of a slow local build.
    fallback: StrictBool = True
    masquerade: str = Field("/usr/lib/distcc", pattern=r"^/[^:\s]*$")

    @property
    def make_jobs(self) -> int:
        return self.jobs or sum(int(h.rsplit("/", 1)[1]) if "/" in h else 4 for h in self.hosts)


class Build(Strict):
    command: str = "make olddefconfig && make -j$(nproc)"
    timeout: Seconds = 3600.0
    env: dict[str, Annotated[str, BeforeValidator(_env_value)]] = Field(default_factory=dict)
    cherry_picks: list[str] = Field(default_factory=list)  # fixes applied for the build only
    localversion: StrictBool = True  # stamp LOCALVERSION=-fb<sha12> so the guest can prove its kernel
    release_file: str | None = "include/config/kernel.release"
    distcc: Distcc | None = None  # compile through distcc daemons

    @model_validator(mode="after")
    def _stamp_read_back(self):
        if self.localversion and self.release_file is None:
            raise ValueError("localversion stamps the kernel release, and release_file is where a step "
                             "reads it back: set release_file, or localversion: false (then the running "
                             "kernel is not verified, and check and the report say so)")
        return self


class Boot(Strict):
    cmdline: str = "console=ttyS0 panic=-1"
    root: str | None = None  # a disk image on the host, attached read-only (snapshot=on)
    memory: int = Int(64, 1 << 20, 1024, description="MiB")
    cpus: int = Int(1, 1024, 1)
    qemu_args: list[str] = Field(default_factory=list)
    timeout: Seconds = 300.0  # from QEMU start to a guest that answers SSH


class Image(Strict):
    """The disk the target boots from, when the build makes one (artifact `image`, e.g.
    `result/nixos.qcow2` from `nix build .#qemuImage`). Each step it is converted on the host
    into `dest` (`qemu-img convert -O FORMAT`, then grown to `size`): free space is checked
    first, the pushed blob is left as it is, and the previous disk stays until the new one is
    complete (stages/image.py). `send` says how it travels: `sparse` sends a raw image as a
    qcow2 made here (zero blocks are not sent; a qcow2 goes as it is), `compressed` as a qcow2
    with zstd-compressed clusters (pays on links slower than ~1 Gbit/s: bench/image_push.py),
    `plain` the file as built."""

    format: Literal["raw", "qcow2"] = "raw"
    size: Bytes | None = None  # grown to this virtual size (never shrunk); default: the image's
    dest: str | None = Field(None, description="absolute path on the host; default WORK_DIR/disk.FORMAT")
    send: Literal["sparse", "compressed", "plain"] = "sparse"

    @field_validator("dest")
    @classmethod
    def _dest(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or ".." in v.split("/") or v.endswith("/")):
            raise ValueError(f"{v!r}: an absolute file path on the host, without '..'")
        return v


ARTIFACTS = ("kernel", "initrd", "image")


class Verify(Strict):
    # What prints the running kernel's release in the guest; compared with the build's.
    command: str = "uname -r"


class Push(Strict):
    timeout: Seconds = 600.0


class ScpStress(Strict):
    """Copy `size` bytes into the guest `iterations` times, each under `timeout`; a copy that
    moves no byte for `stall` seconds is a hang at once (`timeout` stays the outer bound).
    `method`: `openssh-scp` (OpenSSH `scp -O`, as a user's script runs it), `scp` (the scp
    protocol over fleetbisect's own SSH connection) or `sftp` (for guests with only an
    sftp-server). `source: host` makes the file on the VM host and copies it from there (the
    host's own ssh to the guest, the guest's pinned key): no stress byte crosses the
    controller's link."""

    kind: Literal["scp-stress"]
    size: Bytes
    iterations: int = Int(1, 100_000, 15)
    timeout: Seconds
    stall: Seconds = 5.0
    method: Literal["openssh-scp", "scp", "sftp"] = "openssh-scp"
    source: Literal["controller", "host"] = "controller"
    dest: str = "/tmp/fleetbisect-stress.bin"

    @field_validator("stall")
    @classmethod
    def _stall_inside_timeout(cls, v: float, info) -> float:
        timeout = info.data.get("timeout")
        if timeout is not None and v >= timeout:
            raise ValueError(f"{v:g}s must be shorter than timeout ({timeout:g}s): a copy that moves "
                             "nothing for `stall` seconds is a hang before the timeout")
        return v


def _regex(p: str) -> str:
    import re

    try:
        re.compile(p, re.MULTILINE)
    except re.error as e:
        raise ValueError(f"{p!r} is not a regular expression: {e}")
    return p


class CommandRepro(Strict):
    """Run a command (in the guest, or on the host); exit status and output decide."""

    kind: Literal["command"]
    command: str
    where: Literal["guest", "host"] = "guest"
    timeout: Seconds
    expect_exit: int = Int(0, 255, 0)
    fail_patterns: list[str] = Field(default_factory=list)
    pass_patterns: list[str] = Field(default_factory=list)
    # Opt-in: a command that prints nothing (stdout or stderr) for this long is a hang at once.
    stall: Seconds | None = None

    @field_validator("fail_patterns", "pass_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [_regex(p) for p in v]


class DmesgRepro(Strict):
    """Read the kernel log in the guest (after an optional trigger command); a kernel report
    of one of `fail_kinds` (see console.py), or a line matching `fail_patterns`, fails."""

    kind: Literal["dmesg"]
    trigger: str | None = None  # e.g. a workload that provokes the WARNING
    command: str = "dmesg"
    timeout: Seconds = 60.0
    fail_kinds: list[Literal["panic", "oops", "warning", "hung-task", "soft-lockup", "hard-lockup",
                             "rcu-stall"]] = Field(
        default_factory=lambda: ["panic", "oops", "warning", "hung-task", "soft-lockup",
                                 "hard-lockup", "rcu-stall"])
    fail_patterns: list[str] = Field(default_factory=list)

    @field_validator("fail_patterns")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [_regex(p) for p in v]


class BootTime(Strict):
    """The guest must be up within `max` seconds of the kernel's own clock; later is a failure,
    as in a boot-time regression. `measure: uptime` reads /proc/uptime once the guest answers
    (kernel start to a usable system); `measure: init` reads the kernel log's
    `Run /init as init process` timestamp (kernel start to userspace)."""

    kind: Literal["boot-time"]
    max: Seconds
    measure: Literal["uptime", "init"] = "uptime"
    timeout: Seconds = 30.0


class ConsoleRepro(Strict):
    """Init as the reproducer: the guest runs it as PID 1 with no network, it prints a verdict
    line on the serial console and powers off. Nothing is reached over SSH: the console is all.
    The first line matching `fail` or `pass` decides; neither before `timeout` is a hang."""

    kind: Literal["console"]
    pass_pattern: str = r"^FLEETBISECT-RESULT: PASS"
    fail_pattern: str = r"^FLEETBISECT-RESULT: FAIL"
    timeout: Seconds = 120.0  # from QEMU start

    @field_validator("pass_pattern", "fail_pattern")
    @classmethod
    def _regexes(cls, v: str) -> str:
        return _regex(v)


Reproducer = by_kind(ScpStress, CommandRepro, DmesgRepro, BootTime, ConsoleRepro)


class Signature(Strict):
    """The failure this bisect is about. A step that fails some other way (another crash, a
    boot failure) is `unrelated`: skipped, so an unrelated bug cannot steer the search."""

    outcomes: list[Literal["fail", "hang", "boot-failed"]] = Field(default_factory=list)
    pattern: str | None = None  # searched in the kernel reports the step found (title, trace)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        return None if v is None else _regex(v)


class Policy(Strict):
    """Outcome → action. The untested outcomes can never be good or bad."""

    retries: int = Int(0, 10, 2)  # attempts again after an infrastructure fault
    # Runs of the reproducers per step (a flaky bug): stop at the first that is not a pass.
    repeats: int = Int(1, 100, 1)
    # Test the endpoints first: a good end that fails or a bad end that passes stops the run.
    check_endpoints: StrictBool = True
    # After the search, retest the culprit (must be bad) and its parent (must be good) this
    # many times each; 0 trusts the search.
    confirm: int = Int(0, 10, 1)
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


class Hooks(Strict):
    """Shell commands run on events; the event is in FLEETBISECT_* environment variables."""

    start: list[str] = Field(default_factory=list)
    verdict: list[str] = Field(default_factory=list)
    finish: list[str] = Field(default_factory=list)
    failure: list[str] = Field(default_factory=list)


class Playbook(Strict):
    name: str = Field("", min_length=1, description="default: the file's name without .yaml")
    description: str = ""
    build: Build = Field(default_factory=Build)
    artifacts: dict[str, str] = Field(default_factory=lambda: {"kernel": "arch/x86/boot/bzImage"})
    push: Push = Field(default_factory=Push)
    boot: Boot = Field(default_factory=Boot)
    verify: Verify = Field(default_factory=Verify)
    image: Image = Field(default_factory=Image)  # used when there is an `image` artifact
    # One reproducer, or several run in order in the same boot (e.g. boot-time, then scp-stress).
    reproducer: Annotated[list[Reproducer], BeforeValidator(lambda v: [v] if isinstance(v, dict) else v,
                                                            json_schema_input_type=Union[Reproducer, list[Reproducer]])]
    signature: Signature | None = None
    policy: Policy = Field(default_factory=Policy)
    hooks: Hooks = Field(default_factory=Hooks)
    digest: SkipJsonSchema[str] = ""  # sha256 of the file, filled in by the loader

    @field_validator("artifacts")
    @classmethod
    def _kernel(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - set(ARTIFACTS)
        if unknown:
            raise ValueError(f"unknown artifact {sorted(unknown)[0]!r} (valid: {', '.join(ARTIFACTS)})")
        if "kernel" not in v and "image" not in v:
            raise ValueError("needs a kernel artifact (e.g. kernel: arch/x86/boot/bzImage) or a disk "
                             "image (e.g. image: result/nixos.qcow2)")
        if "initrd" in v and "kernel" not in v:
            raise ValueError("an initrd is booted with a kernel: add a kernel artifact (an image "
                             "alone boots with its own bootloader)")
        for rel in v.values():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"{rel!r}: artifacts are paths inside the tree")
        return v

    @field_validator("image")
    @classmethod
    def _image_artifact(cls, v: Image, info) -> Image:  # runs only when `image:` is written
        artifacts = info.data.get("artifacts")
        if artifacts is not None and "image" not in artifacts:
            raise ValueError("says how to deploy a disk image, and artifacts has no `image` "
                             "(e.g. image: result/nixos.qcow2)")
        return v

    @property
    def disk_image(self) -> Image | None:
        """How to deploy the build's disk image, or None when the build makes none."""
        return self.image if "image" in self.artifacts else None

    @field_validator("reproducer")
    @classmethod
    def _console_alone(cls, v):
        if not v:
            raise ValueError("needs at least one reproducer")
        if len(v) > 1 and any(r.kind == "console" for r in v):
            raise ValueError("a console reproducer is the whole boot: it cannot be combined")
        return v

    @property
    def reproducers(self) -> list:
        return list(self.reproducer)

    @property
    def console_only(self) -> bool:
        """The guest is never reached over SSH: init is the reproducer."""
        return self.reproducers[0].kind == "console"

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
    try:
        playbook = validate(Playbook, data, path, lines)
    except ConfigError as e:
        raise ConfigError(sort_problems(e.problems))
    masking.register_build_env(playbook.build.env)  # the build's secrets are masked wherever we write
    return playbook
