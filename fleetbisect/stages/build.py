"""Build stage: run the playbook's build command in a tree, locally. Failure is a skip.

The command is the playbook's own shell snippet (trusted config, like a Makefile); data such as
the commit id reaches it only through the environment (LOCALVERSION), never pasted in.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..deadline import Deadline
from ..localexec import kill_orphan, run_logged
from .. import masking
from ..masking import open_masked
from ..search.gitbisect import git
from ..verdict import OutcomeKind
from .buildcache import BuildCache, sha256_file  # noqa: F401 - sha256_file: the stages' digest
from . import distcc


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    summary: str
    log: Path
    seconds: float
    release: str | None = None  # the kernel release the build stamped, if the tree says
    artifacts: dict[str, Path] = field(default_factory=dict)
    disk_full: bool = False  # it failed for want of space: no verdict about the commit at all
    kind: OutcomeKind = OutcomeKind.BUILD_FAILED  # what a failure says: failed, timeout, setup
    # How the build went, for the report: `cached_from` (the commit whose build was reused),
    # `ccache` ({hits, misses, rate}), `same_image_as` (a commit that built a byte-identical image).
    info: dict = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        out = []
        if self.info.get("cached_from"):
            out.append(f"reused the build of {self.info['cached_from'][:12]} (same tree, config and command)")
        cc = self.info.get("ccache")
        if cc:
            out.append(f"ccache: {cc['hits']} of {cc['hits'] + cc['misses']} compilations hit ({cc['rate']:.0%})")
        if self.info.get("same_image_as"):
            out.append(f"the kernel image is byte-identical to the one built for {self.info['same_image_as'][:12]}")
        return out


def localversion(commit: str) -> str:
    return f"-fb{commit[:12]}"


PIDFILE = "build.pid"
CCACHE_DIRS = ("/usr/lib/ccache", "/usr/lib64/ccache", "/usr/local/lib/ccache")  # gcc -> ccache links


def build(tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline,
          pidfile: Path | None = None, cache: BuildCache | None = None, on=None, nice: int = 0) -> BuildResult:
    """Apply cherry-picks, run the build command, collect artifacts, undo the cherry-picks.

    A tree already built with the same config, command and environment reuses its artifacts
    (stages/buildcache.py; with `cache` only). The tree is the run's own and stays between
    steps, so `make` is incremental; the playbook's kernel config is copied to .config and
    `make olddefconfig` run before the command; ccache is used when it is installed.
    The log is masked as it streams. `pidfile` (default: build.pid next to the log) names the
    running build's process group; a build a dead controller left there is killed first.
    `on`: the machine to build on (an inventory BuildHost), instead of here. `nice`: the
    build's scheduling priority (builds ahead yield the cores to the guest under test)."""
    if on is not None:
        from .remotebuild import build_on

        return build_on(on, tree, playbook, commit, log_path, deadline)
    spec = playbook.build
    pidfile = log_path.with_name(PIDFILE) if pidfile is None else pidfile
    env = dict(os.environ)
    env.update({k: str(v) for k, v in spec.env.items()})
    if spec.distcc:
        env = distcc.local_environment(spec.distcc, env)
    masking.register(env)  # secret-looking names in the environment it inherits
    masking.register_build_env(spec.env)
    if spec.localversion:
        env["LOCALVERSION"] = localversion(commit)
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kill_orphan(pidfile)
    key = cache.key(tree, commit, playbook, env) if cache else None
    hit = cache.get(key) if key else None
    if hit is not None:
        with open_masked(log_path, "wb") as log:
            log.write(f"fleetbisect: {commit} reuses the build of {hit.commit} from {cache.root} "
                      "(same tree, config, command and environment)\n".encode())
        return BuildResult(True, "built (cached)", log_path, time.monotonic() - started, hit.release,
                           dict(hit.artifacts), info={"cached_from": hit.commit})
    _reproducible(env, tree, commit)
    stats = _use_ccache(env, log_path)
    with open_masked(log_path, "wb") as log:
        try:
            if spec.config:  # from the playbook's config, never what the last commit left
                shutil.copyfile(spec.config, tree / ".config")
                if run_logged(["make", "olddefconfig"], tree, env, log, deadline, pidfile, nice) != 0:
                    return BuildResult(False, "make olddefconfig failed", log_path, time.monotonic() - started)
            for pick in spec.cherry_picks:
                status = run_logged(
                    ["git", "cherry-pick", "--no-commit", pick], tree, env, log, deadline, pidfile, nice
                )
                if status != 0:
                    return BuildResult(
                        False, f"cherry-pick {pick} does not apply", log_path,
                        time.monotonic() - started,
                    )
            status = run_logged(["bash", "-c", spec.command], tree, env, log, deadline, pidfile, nice)
        finally:
            if spec.cherry_picks:
                git(tree, "reset", "--hard", "--quiet", commit)
    seconds = time.monotonic() - started
    if status is None:
        return BuildResult(False, f"build timed out after {spec.timeout:.0f}s (build.timeout)", log_path,
                           seconds, kind=OutcomeKind.BUILD_TIMEOUT)
    if status != 0:
        if _disk_full(log_path):
            return BuildResult(False, f"the build ran out of disk space in {tree} (exit {status})",
                               log_path, seconds, disk_full=True)
        return BuildResult(False, f"build failed (exit {status})", log_path, seconds)

    artifacts: dict[str, Path] = {}
    missing = []
    for name, rel in playbook.artifacts.items():
        path = tree / rel
        (artifacts.__setitem__(name, path) if path.is_file() else missing.append(f"{name}={rel}"))
    if missing:
        return BuildResult(
            False, "build produced no " + ", ".join(missing), log_path, seconds
        )
    release = None
    if spec.release_file:
        rf = tree / spec.release_file
        if rf.is_file():
            release = rf.read_text().strip() or None
    if spec.localversion and (release is None or not release.endswith(localversion(commit))):
        # The build did not stamp this commit into the kernel: a build command that ignores
        # LOCALVERSION, or stale artifacts. No step could prove its kernel: a setup mistake.
        return BuildResult(
            False,
            f"the build did not stamp {localversion(commit)} into the kernel release "
            f"({spec.release_file}: {release!r}): does build.command pass LOCALVERSION to make, "
            "or leave stale artifacts? (or set build.localversion: false, and the running kernel "
            "is checked by its release only)",
            log_path, seconds, kind=OutcomeKind.SETUP_ERROR,
        )
    info: dict = {}
    if stats is not None and sum((cc := _ccache_stats(stats))[k] for k in ("hits", "misses")):
        info["ccache"] = cc  # a build that compiled nothing says nothing about ccache
    if cache is not None:
        image = artifacts.get("kernel") or artifacts.get("image")
        same = cache.same_image(sha256_file(image), commit) if image else None
        if same:
            info["same_image_as"] = same
        cache.put(key, commit, release, artifacts)
        # the step reads its artifacts from the cache, never from the tree: a build ahead may
        # rebuild the tree for another commit while this one is pushed (stages/buildahead.py)
        entry = cache.get(key)
        if entry is not None:
            artifacts = dict(entry.artifacts)
    result = BuildResult(True, "built", log_path, seconds, release, artifacts, info=info)
    with open(log_path, "ab") as log:
        for note in result.notes:
            log.write(f"fleetbisect: {note}\n".encode())
    return result


def _reproducible(env: dict[str, str], tree: Path, commit: str) -> None:
    """The same tree gives the same image: the kernel's build timestamp, user, host and build
    number come from the commit, not the clock (unless the playbook or the caller set them)."""
    date = git(tree, "log", "-1", "--format=%cD", commit, check=False).stdout.strip()
    if date:
        env.setdefault("KBUILD_BUILD_TIMESTAMP", date)
    env.setdefault("KBUILD_BUILD_USER", "fleetbisect")
    env.setdefault("KBUILD_BUILD_HOST", "fleetbisect")
    env.setdefault("KBUILD_BUILD_VERSION", "1")


def _use_ccache(env: dict[str, str], log_path: Path) -> Path | None:
    """Put ccache's compiler links first on PATH when ccache is installed; returns the file its
    per-compilation statistics go to (None: no ccache)."""
    if not shutil.which("ccache", path=env.get("PATH")):
        return None
    links = next((d for d in CCACHE_DIRS if Path(d, "gcc").exists()), None)
    if links is None:
        return None
    if links not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([links, env.get("PATH", os.defpath)])
    stats = log_path.with_suffix(".ccache-stats")  # one per build log: builds ahead run side by side
    stats.unlink(missing_ok=True)
    env["CCACHE_STATSLOG"] = str(stats)
    return stats


def _ccache_stats(path: Path) -> dict:
    """Hits and misses from ccache's stats log (a `# FILE` line, then its counters)."""
    hits = misses = 0
    try:
        records = path.read_text(errors="replace").split("\n# ")
    except OSError:
        records = []
    for rec in records:
        counters = set(rec.splitlines()[1:])
        if counters & {"direct_cache_hit", "preprocessed_cache_hit"}:
            hits += 1
        elif "cache_miss" in counters:
            misses += 1
    total = hits + misses
    return {"hits": hits, "misses": misses, "rate": round(hits / total, 4) if total else 0.0}


def kill_orphan_build(run_dir: Path) -> list[int]:
    """Kill the builds a dead controller left running in a run directory (its steps' pid
    files); called when the run resumes. Returns the pids signalled."""
    killed = []
    for pidfile in [run_dir / PIDFILE, *sorted(run_dir.glob(f"steps/*/{PIDFILE}")),
                    *sorted(run_dir.glob(f"ahead/*.{PIDFILE}"))]:  # builds ahead (stages/buildahead.py)
        killed += kill_orphan(pidfile)
    return killed


def _disk_full(log_path: Path) -> bool:
    with open(log_path, "rb") as f:
        f.seek(max(0, log_path.stat().st_size - 65536))
        tail = f.read()
    return b"No space left on device" in tail or b"Disk quota exceeded" in tail

