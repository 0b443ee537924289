"""The git-bisect driver against a real git repository (no host needed)."""

import subprocess

import pytest

from fleetbisect.errors import UserError
from fleetbisect.search.gitbisect import Bisect, resolve
from fleetbisect.verdict import Verdict


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.email", "t@example.invalid")
    git(r, "config", "user.name", "t")
    shas = []
    for i in range(40):
        (r / "value").write_text(f"{i}\n")
        git(r, "add", "value")
        git(r, "commit", "-q", "-m", f"commit {i}")
        shas.append(git(r, "rev-parse", "HEAD").strip())
    return r, shas


def bisect_with(repo, shas, first_bad, skip=()):
    r = repo
    b = Bisect.create(r, r.parent / "wt", shas[0], shas[-1])
    steps = 0
    while True:
        steps += 1
        head = b.head()
        n = shas.index(head)
        verdict = Verdict.SKIP if n in skip else (Verdict.BAD if n >= first_bad else Verdict.GOOD)
        m = b.mark(verdict, head)
        if m.done:
            b.finish(r)
            return m, steps


def test_finds_the_first_bad_commit_in_log2_steps(repo):
    r, shas = repo
    m, steps = bisect_with(r, shas, 23)
    assert m.culprit == shas[23]
    assert steps <= 7  # ceil(log2(39)) + 1


def test_only_skipped_commits_left_names_the_candidates(repo):
    r, shas = repo
    m, _ = bisect_with(r, shas, 23, skip={22, 23})
    assert m.culprit is None
    assert set(m.candidates) >= {shas[23]}


def test_users_checkout_and_their_bisect_are_untouched(repo):
    r, shas = repo
    git(r, "bisect", "start", shas[-1], shas[0])
    before_head = git(r, "rev-parse", "HEAD")
    (r / "untracked.txt").write_text("mine")
    bisect_with(r, shas, 10)
    assert git(r, "rev-parse", "HEAD") == before_head
    assert (r / "untracked.txt").read_text() == "mine"
    assert "git bisect start" in git(r, "bisect", "log")
    assert "wt" not in git(r, "worktree", "list")


def test_resolve_rejects_unknown_revisions(repo):
    r, _ = repo
    with pytest.raises(UserError, match="not a commit"):
        resolve(r, "no-such-branch")


def test_marks_leave_the_tree_alone(repo):
    """git names the next commit (BISECT_HEAD); the run checks out what it builds, so a build
    ahead may use the tree while the step is tested."""
    r, shas = repo
    b = Bisect.create(r, r.parent / "wt", shas[0], shas[-1])
    before = git(b.tree, "rev-parse", "HEAD").strip()
    head = b.head()
    b.mark(Verdict.GOOD, head)
    assert b.head() != head
    assert git(b.tree, "rev-parse", "HEAD").strip() == before
    b.finish(r)
