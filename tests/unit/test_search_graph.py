"""The deterministic search against REAL `git bisect` on generated repositories with merges,
skipped stretches, --first-parent and pathspec limits: the same culprit, or the same set."""

import math
import random
import subprocess

import pytest

from fleetbisect.errors import UserError
from fleetbisect.search import select
from fleetbisect.search.base import Result
from fleetbisect.search.graph import CommitGraph, runs


def git(repo, *args, check=True):
    return subprocess.run(["git", "-C", str(repo), *args], check=check, capture_output=True, text=True).stdout


def make_repo(path, seed, n=120):
    """A history of about n commits: a mainline, side branches forked from it (and from other
    branches) merged back, each commit adding a file under a/ or b/. Built with fast-import."""
    rnd = random.Random(seed)
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    out, mark = [], 0
    files: dict[str, dict[str, str]] = {}  # branch -> its tree

    def commit(branch, parent_marks, extra_files):
        nonlocal mark
        mark += 1
        tree = dict(files.get(branch, {}))
        for f in extra_files:
            tree.update(files[f])
        name = f"{'ab'[rnd.random() < 0.3]}/{mark}"
        tree[name] = str(mark)
        files[branch] = tree
        out.append(f"commit refs/heads/{branch}\nmark :{mark}\ncommitter T <t@example.invalid> {1700000000 + mark} +0000\n"
                   f"data {len(str(mark))}\n{mark}\n")
        if parent_marks:
            out.append(f"from :{parent_marks[0]}\n")
            for p in parent_marks[1:]:
                out.append(f"merge :{p}\n")
        for k, v in tree.items():
            out.append(f"M 100644 inline {k}\ndata {len(v)}\n{v}\n")
        return mark

    heads = {"main": commit("main", [], [])}
    good = heads["main"]
    side = 0
    while mark < n:
        r = rnd.random()
        open_ = [b for b in heads if b != "main"]
        if r < 0.12:
            side += 1
            src = rnd.choice(["main", *open_]) if open_ else "main"
            b = f"s{side}"
            files[b] = dict(files[src])
            heads[b] = commit(b, [heads[src]], [])
        elif r < 0.45 and open_:
            b = rnd.choice(open_)
            heads[b] = commit(b, [heads[b]], [])
        elif r < 0.55 and open_:
            b = rnd.choice(open_)
            heads["main"] = commit("main", [heads["main"], heads[b]], [b])
            del heads[b]
        else:
            heads["main"] = commit("main", [heads["main"]], [])
    for b in [b for b in heads if b != "main"]:
        heads["main"] = commit("main", [heads["main"], heads[b]], [b])
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input="".join(out), text=True, check=True)
    git(path, "checkout", "-q", "main")
    return path, git(path, "rev-list", "--max-parents=0", "main").strip(), git(path, "rev-parse", "main").strip()


SCRIPT = """#!/bin/sh
c=$(git rev-parse HEAD)
v=$(grep "^$c " "$VERDICTS" | cut -d' ' -f2)
exit ${v:-0}
"""


def git_bisect(repo, good, bad, verdicts, first_parent=False, paths=()):
    vfile = repo.parent / "verdicts"
    vfile.write_text("".join(f"{c} {code}\n" for c, code in verdicts.items()))
    script = repo.parent / "oracle.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    git(repo, "bisect", "reset", check=False)
    git(repo, "bisect", "start", *(["--first-parent"] if first_parent else []), bad, good, "--", *paths)
    proc = subprocess.run(["git", "-C", str(repo), "bisect", "run", str(script)], capture_output=True, text=True,
                          env={"VERDICTS": str(vfile), "PATH": "/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    git(repo, "bisect", "reset")
    first = [line.split()[0] for line in out.splitlines() if "is the first bad commit" in line]
    if first:
        return first[-1], None
    assert "only 'skip'ped commits left" in out, out
    block = out.split("could be any of:")[1].split("We cannot bisect more")[0]
    return None, {line.strip() for line in block.split() if len(line.strip()) == 40}


def ours(graph, verdict, hosts=1):
    s = select("kary")(graph)
    while not s.done:
        batch = s.propose(hosts)
        assert batch
        for c in batch:
            s.started(c, "h")
        for c in batch:
            s.record(c, verdict(c), "h")
    a = s.answer()
    if hosts == 1:  # git's cost: about log2 of the range, plus the skipped commits tried
        skips = sum(1 for line in a.log if line.startswith("skip"))
        assert a.runs - skips <= math.ceil(math.log2(graph.n)) + 3, a.log
    return a.culprit, (None if a.culprit else set(a.candidates))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["plain", "first-parent", "paths"])
def test_same_answer_as_git_bisect(tmp_path, seed, mode):
    repo, good, bad = make_repo(tmp_path / "repo", seed, n=60 + 20 * seed)
    first_parent, paths = mode == "first-parent", (["b"] if mode == "paths" else [])
    graph = CommitGraph.from_git(repo, good, bad, first_parent=first_parent, paths=paths)
    rnd = random.Random(seed)
    everything = git(repo, "rev-list", bad, "--not", good).split()
    culprit = rnd.choice(graph.commits[:-1])
    descendants = set(git(repo, "rev-list", "--ancestry-path", f"{culprit}..{bad}").split()) | {culprit}
    # A skipped stretch around the culprit (so that several candidates may be left) in half the cases.
    skips = set()
    if seed % 2:
        at = graph.index[culprit]
        skips = set(graph.commits[max(0, at - 2): at + 2]) - {bad}
    verdicts = {c: (125 if c in skips else 1 if c in descendants else 0) for c in everything}
    want = git_bisect(repo, good, bad, verdicts, first_parent, paths)

    def verdict(c):
        return {125: Result.SKIP, 1: Result.BAD, 0: Result.GOOD}[verdicts[c]]

    for hosts in (1, 3):
        got = ours(graph, verdict, hosts)
        if want[0] or got[0]:
            assert got == want, (hosts, got, want)
        else:  # both sets must be ones git itself would give for some order of tests
            for cands in (got[1], want[1]):
                assert culprit in cands and cands == git_candidate_set(graph, cands, verdicts), hosts


def git_candidate_set(graph, cands, verdicts):
    """What `git bisect` names when `b`, the one bad untested-skip in `cands`, is its bad ref and
    only skipped commits are left: b's ancestors that no testable good ancestor of b rules out."""
    (b,) = [c for c in cands if verdicts[c] == 1]
    bi = graph.index[b]
    left = graph.anc[bi]
    for y in range(graph.n):
        if graph.is_ancestor(y, bi) and verdicts[graph.commits[y]] == 0:
            left &= ~graph.anc[y]
    return {graph.commits[i] for i in range(graph.n) if left >> i & 1}


def test_graph_order_and_ancestors(tmp_path):
    repo, good, bad = make_repo(tmp_path / "repo", 3, n=80)
    g = CommitGraph.from_git(repo, good, bad)
    assert g.commits[-1] == bad and g.merges > 0
    for i, ps in enumerate(g.parents):
        assert all(p < i for p in ps)  # parents first
    for i in range(0, g.n, 7):  # the bitsets agree with git
        want = set(git(repo, "rev-list", g.commits[i], "--not", good).split())
        assert {g.commits[j] for lo, hi in g.intervals(i) for j in range(lo, hi)} == want
    fp = set(git(repo, "rev-list", "--first-parent", bad, "--not", good).split())
    for c in fp:  # the mainline's ancestors are a prefix of the order
        assert g.intervals(g.index[c]) == ((0, g.index[c] + 1),)


def test_runs_of_bits():
    assert runs(0) == ()
    assert runs(0b1110011) == ((0, 2), (4, 7))


def test_a_range_that_is_empty_is_a_user_error(tmp_path):
    repo, good, bad = make_repo(tmp_path / "repo", 1, n=10)
    with pytest.raises(UserError):
        CommitGraph.from_git(repo, bad, good)
