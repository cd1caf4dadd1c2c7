"""The test suite.  ``tests.helpers`` holds what several test modules build."""

import pytest

# The helpers assert as the tests do; their failures read as the tests' own.
pytest.register_assert_rewrite("tests.helpers")
