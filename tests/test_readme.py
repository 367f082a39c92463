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


def test_readme_links_to_the_logbook_and_every_relative_link_resolves():
    """The README shows the current state and points to docs/logbook.md for how it got there; a link in either,
    relative to its own file, names a file of the repository."""
    readme = (ROOT / "README.md").read_text()
    assert "(docs/logbook.md)" in readme
    logbook = (ROOT / "docs" / "logbook.md").read_text()
    assert "| bytelm 0.1, the paper's design (2 seeds) | 3.765 | 4.609 | 3.644 |" in logbook  # the record moved whole
    for doc in (ROOT / "README.md", ROOT / "docs" / "logbook.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            assert (doc.parent / target.split("#")[0]).exists(), f"{doc.name}: link {target} resolves to nothing"
