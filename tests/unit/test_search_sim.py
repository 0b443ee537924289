"""bench/simulate.py --quick runs the real searches and prints the table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import simulate  # noqa: E402


def test_quick_table(capsys):
    assert simulate.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1.0"], ["0.5"])]
    assert len(rows) == 2 * 2 * 3
    for p, n, method, right, *_ in rows:
        if p == "1.0" or method == "bayes":
            assert float(right.rstrip("%")) >= 90, (p, n, method, right)
