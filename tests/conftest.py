"""Fixtures shared by the unit and the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.nobody import find_nobody_command


@pytest.fixture(scope="module")
def nobody_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The words that run ``python -m postoffice.pipe`` as user nobody."""
    return find_nobody_command(tmp_path_factory)
