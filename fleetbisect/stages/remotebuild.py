"""Build on another machine over SSH: a build host of the inventory, or the box under test
itself (a bare-metal host that builds its own kernel calls `build_on` with its own entry).

    result = build_on(builder, tree, playbook, commit, log_path, deadline)

1. The commit (and any cherry-picks) is pushed from the controller's repository to a bare
   repository on the builder, `WORK_DIR/repo.git`, with real `git push` through the OpenSSH
   client, configured exactly as the paramiko path resolves and checks the host (its own
   ssh_config and known_hosts: strict host key checking, batch mode; remote/openssh.py).
2. It is checked out in `WORK_DIR/trees/<slot>`, a worktree of its own per local worktree
   (`slot`) that stays between steps, so `make` there is incremental, and the playbook's build
   command runs in it, all in one SSH session per step, bounded on the builder by `timeout -k`
   and on the controller by the build deadline. The environment (LOCALVERSION, build.env,
   distcc's) travels on stdin into a 0600 file that is removed before the build starts, never
   on a command line.
3. The log (0600 on the builder, overwritten by the next build) comes back masked into the
   step's build.log; the artifacts come back into a local content-addressed cache (only those
   whose sha256 is not there yet), and the push stage sends them on to the test host as it
   does after a local build. When the builder is the test host itself, the build also leaves
   the kernel and initrd in the host's blob store, where the push stage finds them: nothing is
   sent back.

A build that fails is the commit's (skip, as after a local build); a builder that cannot be
reached or a push/pull that fails is infrastructure: retried, then the run stops (RunAborted)
with the reason: never a verdict.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .. import masking
from ..deadline import Deadline
from ..errors import InfraError, RunAborted
from ..masking import open_masked
from ..remote.base import CommandTimedOut, Remote, RemoteError
from ..remote.endpoint import resolve
from ..remote.openssh import TARGET, ssh_config
from ..remote.ssh import SSHRemote
from ..search.gitbisect import git
from ..verdict import OutcomeKind
from . import distcc
from .build import BuildResult, _disk_full, localversion

log = logging.getLogger("fleetbisect.build")

PULL_TIMEOUT = 600.0
REF = "refs/fleetbisect/build"
GIT_BOILERPLATE = ("fatal: Could not read from remote", "Please make sure you have", "and the repository exists")


class Paths:
    """Where things live on the builder: one bare repository, and one worktree per worktree of
    the controller (`slot`), so that builds from several local trees at once (build-ahead,
    several hosts of a fleet, two controllers) never share one, and each stays incremental."""

    def __init__(self, work_dir: str, slot: str = "tree"):
        self.work = work_dir
        self.slot = slot
        self.repo = posixpath.join(work_dir, "repo.git")
        self.tree = posixpath.join(work_dir, "trees", slot)
        self.env = posixpath.join(work_dir, "trees", f"{slot}.env")
        self.log = posixpath.join(work_dir, "trees", f"{slot}.log")


def slot(tree: Path) -> str:
    """The builder's worktree for a local tree: named after this machine and the tree's path."""
    key = f"{socket.gethostname()}:{Path(tree).resolve()}"
    return f"{Path(tree).name[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def env_script(playbook, commit: str) -> str:
    """The build's environment as a POSIX sh script (`export K='v'` lines), values quoted."""
    spec = playbook.build
    env = {k: str(v) for k, v in spec.env.items()}
    if spec.localversion:
        env["LOCALVERSION"] = localversion(commit)
    lines = []
    if spec.distcc:
        env.update(distcc.environment(spec.distcc))
        lines.append(f'export PATH={shlex.quote(spec.distcc.masquerade)}:"$PATH"')
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items() if k.isidentifier()]
    return "\n".join(lines) + "\n"


# One session per step does all the work on the builder (each session costs a round trip and
# a process start there). $1 bare repo, $2 worktree, $3 env file, $4 log, $5 commit, $6 build
# command, $7 release file ("" for none), $8 seconds to wait for the worktree's lock, $9 the test
# host's blob store when the builder is the test host ("" otherwise), $10 count of cherry-picks,
# then the picks, then the artifacts as NAME=PATH. The environment script comes on stdin.
# Prints `fleetbisect-* ...` lines.
STEP = r"""repo=$1 tree=$2 envf=$3 logf=$4 commit=$5 cmd=$6 relf=$7 wait=$8 blobs=$9 npicks=${10}; shift 10
umask 077
mkdir -p "$(dirname "$tree")" || exit 97
# One build at a time in a worktree: one that a dead controller left running holds the lock
# (its processes inherit it) until it ends; waiting longer than $wait seconds is a fault.
if command -v flock >/dev/null; then
  exec 9>"$tree.lock"
  flock -w "$wait" 9 || { echo "fleetbisect-status 96"; exit 0; }
fi
cat > "$envf" || exit 97
(
  set -e
  if [ -e "$tree/.git" ]; then
    git -C "$tree" cherry-pick --abort >/dev/null 2>&1 || true
    git -C "$tree" checkout -q --detach --force "$commit"
  else
    git -C "$repo" worktree prune
    git -C "$repo" worktree add -q --detach "$tree" "$commit"
  fi
) >"$logf" 2>&1 || { rm -f "$envf"; echo "fleetbisect-status 97"; cat "$logf" >&2; exit 0; }
echo "fleetbisect-started 1"
picks=""; i=0
while [ $i -lt "$npicks" ]; do picks="$picks $1"; shift; i=$((i + 1)); done
(
  cd "$tree" || exit 97
  . "$envf"; rm -f "$envf"
  for pick in $picks; do
    echo "$ git cherry-pick --no-commit $pick"
    git cherry-pick --no-commit "$pick" || { echo "fleetbisect: cherry-pick $pick does not apply"; exit 98; }
  done
  echo "$ bash -c $cmd"
  exec bash -c "$cmd"
) >"$logf" 2>&1 </dev/null
echo "fleetbisect-status $?"
rm -f "$envf"
[ -z "$relf" ] || [ ! -f "$tree/$relf" ] || echo "fleetbisect-release $(head -c 4096 "$tree/$relf" | tr -d '\n')"
for f; do
  name=${f%%=*} f=${f#*=}
  if [ ! -f "$tree/$f" ]; then echo "fleetbisect-sum missing"; continue; fi
  sum=$(sha256sum < "$tree/$f" | cut -d' ' -f1)
  echo "fleetbisect-sum $sum"
  # the builder is the test host: straight into its blob store (an image travels encoded: not it)
  if [ -n "$blobs" ] && [ "$name" != image ] && [ ! -e "$blobs/$sum" ]; then
    mkdir -p "$blobs" && cp "$tree/$f" "$blobs/.$sum.$$" && chmod 644 "$blobs/.$sum.$$" && mv -f "$blobs/.$sum.$$" "$blobs/$sum"
  fi
done
[ -z "$picks" ] || git -C "$tree" reset -q --hard "$commit"
"""

def _git_ssh_env(params, tmp: Path) -> dict[str, str]:
    config = tmp / "ssh_config"
    config.write_text(ssh_config(params, resolve(params), tmp / "known_hosts"))
    return {**os.environ, "GIT_SSH_COMMAND": shlex.join(["ssh", "-F", str(config)]),
            "GIT_SSH_VARIANT": "ssh", "GIT_TERMINAL_PROMPT": "0"}


def push_commits(params, tree: Path, repo_path: str, shas: list[str], deadline: Deadline,
                 ref: str = REF) -> None:
    """`git push` the commits to the builder's bare repository (`ref`-N), over
    the OpenSSH client with the host key checked. Raises RemoteError on failure."""
    with tempfile.TemporaryDirectory(prefix="fleetbisect-git-ssh-") as tmp:
        env = _git_ssh_env(params, Path(tmp))
        refspecs = [f"{sha}:{ref}-{i}" for i, sha in enumerate(shas)]
        argv = ["git", "-C", str(tree), "push", "--quiet", "--force", f"{TARGET}:{repo_path}", *refspecs]
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=max(1.0, deadline.remaining()))
        except subprocess.TimeoutExpired:
            raise RemoteError(params.name, "git push timed out") from None
    if proc.returncode != 0:  # what ssh said, not git's boilerplate about access rights
        said = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(GIT_BOILERPLATE)]
        raise RemoteError(params.name, f"git push to {repo_path} failed: " + " | ".join(said[-3:]))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetbisect" / "artifacts"


def pull_artifacts(remote: Remote, paths: Paths, playbook, sums: list[str], dest: Path, deadline: Deadline
                   ) -> tuple[dict[str, Path], list[str], dict[str, int]]:
    """The artifacts (whose sha256 the build step printed) into `dest/<sha256>`, only those not
    there yet; (artifacts, missing, bytes pulled per artifact)."""
    dest.mkdir(parents=True, exist_ok=True)
    artifacts, missing, pulled = {}, [], {}
    for (name, rel), sha in zip(playbook.artifacts.items(), sums, strict=True):
        if sha == "missing":
            missing.append(f"{name}={rel}")
            continue
        local = dest / sha
        if not local.is_file():
            part = dest / f".{sha}.part"
            pulled[name] = remote.get(posixpath.join(paths.tree, rel), part, deadline=deadline).bytes
            part.rename(local)
        artifacts[name] = local
    return artifacts, missing, pulled


_READY: set[tuple[str, str]] = set()  # (builder, work_dir) whose bare repository exists


def build_on(builder, tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline, *,
             retries: int | None = None, dest: Path | None = None) -> BuildResult:
    """Build `commit` of the repository `tree` belongs to on `builder` (an inventory BuildHost:
    name, ssh_params(), work_dir). Faults of the builder or the link are retried `retries`
    times (default: the playbook's), then raise RunAborted."""
    retries = playbook.policy.retries if retries is None else retries
    masking.register_build_env(playbook.build.env)
    last = ""
    for attempt in range(retries + 1):
        try:
            return _build_once(builder, tree, playbook, commit, log_path, deadline, dest or cache_dir())
        except InfraError as e:  # a host key or config problem (UserError) is not retried
            last = str(e)
            _READY.discard((builder.name, builder.work_dir))  # its work dir may be gone: set it up again
            log.warning("build on %s failed (attempt %d/%d): %s", builder.name, attempt + 1, retries + 1, e)
            if deadline.expired:
                break
    raise RunAborted(f"build host {builder.name}: {last} (tried {attempt + 1} times; a fault of the "
                     "build host or its link, not of the commit)")


def _build_once(builder, tree: Path, playbook, commit: str, log_path: Path, deadline: Deadline,
                dest: Path) -> BuildResult:
    spec = playbook.build
    paths = Paths(builder.work_dir, slot(tree))
    params = builder.ssh_params()
    started = time.monotonic()
    picks = [git(tree, "rev-parse", f"{p}^{{commit}}").stdout.strip() for p in spec.cherry_picks]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with SSHRemote.connect(params, deadline=deadline) as remote:
        if (builder.name, paths.work) not in _READY:
            remote.run(["sh", "-c", 'mkdir -p "$1" && { [ -d "$2" ] || git init -q --bare "$2"; }', "sh",
                        paths.work, paths.repo], deadline=deadline, check=True)
            _READY.add((builder.name, paths.work))
        push_commits(params, tree, paths.repo, [commit, *picks], deadline, f"{REF}/{paths.slot}")
        argv = ["sh", "-c", STEP, "sh", paths.repo, paths.tree, paths.env, paths.log, commit, spec.command,
                spec.release_file or "", str(max(1, int(deadline.remaining() / 2))), builder.blobs or "",
                str(len(picks)), *picks, *(f"{k}={v}" for k, v in playbook.artifacts.items())]
        try:
            res = remote.run(argv, deadline=deadline, stdin=env_script(playbook, commit).encode())
            out = dict(line.split(" ", 1) for line in res.stdout.splitlines()
                       if line.startswith("fleetbisect-") and " " in line and not line.startswith("fleetbisect-sum"))
            sums = [line.split(" ", 1)[1] for line in res.stdout.splitlines() if line.startswith("fleetbisect-sum ")]
            status: int | None = int(out.get("fleetbisect-status", "97"))
        except CommandTimedOut as e:
            if "fleetbisect-started" not in (e.partial.stdout if e.partial else ""):
                raise RemoteError(builder.name, f"the deadline passed before the build could start in {paths.tree} "
                                  "(waiting for another build there, or a slow checkout)") from None
            status, out, sums = None, {}, []
        if status == 96:
            raise RemoteError(builder.name, f"{paths.tree} is busy with another build (one a controller that "
                              "died left running?): waited for it in vain")
        if status == 97:
            raise RemoteError(builder.name, f"could not check out {commit[:12]} in {paths.tree}: "
                              + " | ".join(res.stderr.strip().splitlines()[-3:]))
        _fetch_log(remote, paths, log_path, builder.name)
        seconds = time.monotonic() - started
        if status is None:
            return BuildResult(False, f"build on {builder.name} timed out after {spec.timeout:.0f}s "
                               "(build.timeout)", log_path, seconds, kind=OutcomeKind.BUILD_TIMEOUT)
        if status == 98:
            return BuildResult(False, "a cherry-pick does not apply", log_path, seconds)
        if status != 0:
            if _disk_full(log_path):
                return BuildResult(False, f"the build ran out of disk space on {builder.name} (exit {status})",
                                   log_path, seconds, disk_full=True)
            return BuildResult(False, f"build on {builder.name} failed (exit {status})", log_path, seconds)
        release = out.get("fleetbisect-release", "").strip() or None
        if len(sums) != len(playbook.artifacts):
            raise RemoteError(builder.name, f"the build step reported {len(sums)} artifacts of "
                              f"{len(playbook.artifacts)}: {res.stdout.strip()[-300:]}")
        artifacts, missing, pulled = pull_artifacts(remote, paths, playbook, sums, dest, deadline)
    seconds = time.monotonic() - started
    if missing:
        return BuildResult(False, "build produced no " + ", ".join(missing), log_path, seconds)
    with open_masked(log_path, "ab") as f:
        f.write(f"fleetbisect: artifacts pulled from {builder.name}: "
                f"{', '.join(f'{k} {v} bytes' for k, v in pulled.items()) or 'none changed'}\n".encode())
    if spec.localversion and (release is None or not release.endswith(localversion(commit))):
        return BuildResult(
            False, f"the build on {builder.name} did not stamp {localversion(commit)} into the kernel "
            f"release ({spec.release_file}: {release!r})", log_path, seconds, kind=OutcomeKind.SETUP_ERROR)
    return BuildResult(True, f"built on {builder.name}", log_path, seconds, release, artifacts)


def _fetch_log(remote: Remote, paths: Paths, log_path: Path, name: str) -> None:
    """The builder's log (0600 there, overwritten by the next build) into `log_path`, masked."""
    with tempfile.TemporaryDirectory(prefix="fleetbisect-log-") as tmp:
        raw = Path(tmp) / "build.log"
        try:
            remote.get(paths.log, raw, deadline=Deadline.after(PULL_TIMEOUT))
        except InfraError as e:
            raw.write_text(f"fleetbisect: no build log from {name}: {e}\n")
        with open_masked(log_path, "wb") as out, open(raw, "rb") as src:
            out.write(f"fleetbisect: building on {name} in {paths.tree}\n".encode())
            shutil.copyfileobj(src, out)
