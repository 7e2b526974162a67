"""pytest-benchmark suite: `pytest benches/ --benchmark-only` (see benches/README.md).

The repository's own `pytest` run collects tests/ only (pyproject.toml:
testpaths), so nothing here runs in CI; this directory is collected only when
it is named on the command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (requirements-dev.txt)")

HERE = Path(__file__).resolve().parent
DEFAULT_STORAGE = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Saved runs (--benchmark-autosave / --benchmark-save) go to benches/.benchmarks
    # wherever pytest is started from, so --benchmark-compare finds them;
    # an explicit --benchmark-storage wins.
    if config.getoption("benchmark_storage", None) == DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{HERE / '.benchmarks'}"
