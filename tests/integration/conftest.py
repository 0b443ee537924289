"""Fixtures of the embedded lab: guest assets, a generated kernel repo, an inventory for the
lab host (`lab_host` comes from tests/conftest.py), the lab playbook and variants of it."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fleetbisect.lab.image import ensure_assets
from fleetbisect.lab.kernelrepo import generate_repo

from fleetbisect.config.inventory import load_inventory
from fleetbisect.config.playbook import load_playbook
from fleetbisect.lab.demo import lab_playbook, write_lab_inventory

# The small repo the stage tests use: which commit does what is fixed, so tests can name them.
CULPRIT, BUILD_FAILS, NO_SSH = 13, 5, 9


@pytest.fixture(scope="session")
def assets():
    return ensure_assets()


@pytest.fixture(scope="session")
def lab_repo(assets, tmp_path_factory):
    return generate_repo(
        tmp_path_factory.mktemp("repo") / "linux", assets, commits=24, seed=7,
        culprit=CULPRIT, build_fails=[BUILD_FAILS], no_ssh=[NO_SSH],
    )


@pytest.fixture(scope="session")
def inventory_file(lab_host, assets, tmp_path_factory):
    return write_lab_inventory(tmp_path_factory.mktemp("inv") / "lab.yaml", [lab_host], assets)


@pytest.fixture(scope="session")
def host_cfg(inventory_file, lab_host):
    return load_inventory([inventory_file]).host(lab_host.name)


@pytest.fixture
def playbook_variant(tmp_path):
    """The lab playbook with some fields changed: variant({"boot": {"timeout": 8}})."""

    def make(changes: dict | None = None):
        data = yaml.safe_load(lab_playbook().read_text())
        for section, fields in (changes or {}).items():
            if isinstance(fields, dict):
                data.setdefault(section, {}).update(fields)
            else:
                data[section] = fields
        path = tmp_path / "playbook.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_playbook(path), path

    return make


@dataclass
class Tree:
    path: Path

    def checkout(self, sha: str) -> None:
        subprocess.run(["git", "-C", str(self.path), "checkout", "-q", "--detach", sha], check=True)


@pytest.fixture
def tree(lab_repo, tmp_path):
    """A worktree of the lab repo, like the one a run builds in."""
    wt = tmp_path / "wt"
    subprocess.run(["git", "-C", str(lab_repo.path), "worktree", "add", "-q", "--detach", str(wt)], check=True)
    yield Tree(wt)
    subprocess.run(["git", "-C", str(lab_repo.path), "worktree", "remove", "--force", str(wt)], check=False)
