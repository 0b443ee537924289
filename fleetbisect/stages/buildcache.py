"""The build cache: the artifacts of a tree already built, so that no tree is built twice.

    cache = BuildCache.for_playbook(playbook, run_dir / "build-cache")  # None: build.cache false
    key = cache.key(repo, commit, playbook, env)    # (tree id, config, command, environment)
    hit = cache.get(key)                            # Cached(commit, release, artifacts) or None
    cache.put(key, commit, release, artifacts)      # after a build that succeeded
    cache.same_image(sha256, commit)                # the commit an identical image was built for

The key is the commit's *tree* (plus the cherry-picks applied for the build), the content of the
playbook's kernel config, the build command and the build's environment, LOCALVERSION included.
So a commit retested (the culprit and its parent at confirmation, a resumed run, a commit built
ahead) reuses its artifacts, and with `build.localversion: false` any commit with the same tree
does too (with the stamp on, the release names the commit, so only that commit can match).

A run keeps its cache in its run directory (`build-cache/`, so a resumed run has it too);
$FLEETBISECT_BUILD_CACHE names one that runs share.
An entry is written in a temporary directory and renamed into place: a half-written entry is
never read. Only builds that succeeded are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..search.gitbisect import git


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(default: Path) -> Path:
    return Path(os.environ.get("FLEETBISECT_BUILD_CACHE") or default)


@dataclass(frozen=True)
class Cached:
    commit: str  # the commit this entry was built for
    release: str | None
    artifacts: dict[str, Path] = field(default_factory=dict)


class BuildCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_playbook(cls, playbook, default: Path) -> "BuildCache | None":
        return cls(cache_dir(default)) if playbook.build.cache else None

    def key(self, repo: Path, commit: str, playbook, env: dict[str, str]) -> str:
        spec = playbook.build
        tree = git(repo, "rev-parse", f"{commit}^{{tree}}").stdout.strip()
        picks = [git(repo, "rev-parse", f"{p}^{{commit}}").stdout.strip() for p in spec.cherry_picks]
        config = hashlib.sha256(Path(spec.config).read_bytes()).hexdigest() if spec.config else None
        # The environment the build sees beyond the machine's own: the playbook's and the stamp.
        seen = {k: env.get(k) for k in sorted({*spec.env, "LOCALVERSION"})}
        blob = json.dumps({"tree": tree, "picks": picks, "config": config, "command": spec.command,
                           "env": seen, "artifacts": playbook.artifacts,
                           "release_file": spec.release_file}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Cached | None:
        d = self._entry(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        artifacts = {name: d / name for name in meta["artifacts"]}
        if not all(p.is_file() for p in artifacts.values()):
            return None
        return Cached(meta["commit"], meta.get("release"), artifacts)

    def put(self, key: str, commit: str, release: str | None, artifacts: dict[str, Path]) -> None:
        d = self._entry(key)
        if (d / "meta.json").exists():
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".put-", dir=d.parent))
        try:
            for name, path in artifacts.items():
                os.link(self._blob(path), tmp / name)
            (tmp / "meta.json").write_text(json.dumps({"commit": commit, "release": release,
                                                        "artifacts": sorted(artifacts)}) + "\n")
            try:
                tmp.rename(d)
            except OSError:  # another build put the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _blob(self, path: Path) -> Path:
        """`path`'s content in the cache, stored once however many entries hold it (a lab kernel
        or an unchanged module is the same bytes at many commits): entries hard-link to it."""
        blobs = self.root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        blob = blobs / sha256_file(path)
        if not blob.exists():
            fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=blobs)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, blob)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return blob

    def same_image(self, sha256: str, commit: str) -> str | None:
        """The commit a byte-identical image was first built for, if another; else None (and
        this commit is remembered as the first)."""
        index = self.root / "images"
        index.mkdir(parents=True, exist_ok=True)
        path = index / sha256
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            first = path.read_text().strip()
            return first if first and first != commit else None
        with os.fdopen(fd, "w") as f:
            f.write(commit + "\n")
        return None
