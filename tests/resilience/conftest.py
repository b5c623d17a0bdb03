"""Resilience tests: every test here causes a real fault and is marked `resilience`."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/resilience/" in str(item.fspath):
            item.add_marker(pytest.mark.resilience)
