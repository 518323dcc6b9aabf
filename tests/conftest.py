"""Fixtures and hooks shared by the whole suite.

Integration fixtures (a running Kafka broker and Redis, started by `scripts/services start` or
`make services`) live in tests/integration/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ needs the real services: mark it `integration` even if its
    module forgot to, so `-m "not integration"` always gives a run that needs no broker or Redis."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
