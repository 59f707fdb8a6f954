"""The reliability suite (see README.md here): long variants run only when asked for.

``@pytest.mark.slow`` tests are skipped unless ``RELEX_SLOW=1`` or ``-m slow`` is given,
so ``pytest tests`` (CI) stays fast; ``RELEX_SLOW=1 pytest tests/reliability`` runs all.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RELEX_SLOW") == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long variant: set RELEX_SLOW=1 (or -m slow) to run it")
    for item in items:
        if item.get_closest_marker("slow") and str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _journal_records_at_once(monkeypatch):
    """Kill-point tests count the work a resumed run reuses: make every output record durable
    at once (production batches them every 10 s; test_interrupts checks that mode too)."""
    monkeypatch.setenv("RELEX_JOURNAL_SYNC_SECONDS", "0")
