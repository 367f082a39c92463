"""The README's commands are the ones CI runs, word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quickstart_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    quickstart = blocks[1].strip()  # after the install block
    assert quickstart.startswith("python3 -m venv") and "bytelm train" in quickstart
    assert quickstart in ci
    assert "python -m pytest" in blocks[3] and "python -m pytest" in ci


def test_readme_benchmark_table_is_the_committed_full_results():
    readme = (ROOT / "README.md").read_text()
    summary = (ROOT / "benchmarks" / "results" / "full" / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("|")]
    assert len(rows) >= 6
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README's benchmark table differs from benchmarks/results/full/summary.md: {missing}"
    assert "python -m benchmarks.run --suite full" in readme
