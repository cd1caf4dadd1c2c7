"""Fixtures that give integration tests real Postfix parts, cleaned up at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.postfix_instance import (
    PostfixInstance,
    make_traversable,
    require_root,
    require_tool,
)

PostfixFactory = Callable[..., PostfixInstance]


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[PostfixFactory]:
    """Create and start private Postfix instances under ``tmp_path``; stop them all after.

    The callable takes PostfixInstance's arguments after ``base_dir``
    (``transports``, ``extra_master_cf``, ``extra_main_cf``, ``recipient_limits=``). Each
    instance gets its own folder, root-owned and 0755 as Postfix demands, with
    pytest's 0700 parents opened for traversal by the postfix user.
    """
    require_tool("postfix")
    require_tool("postqueue")
    require_root()
    make_traversable(tmp_path)
    instances: list[PostfixInstance] = []

    def create(
        transports: Mapping[str, str],
        extra_master_cf: str = "",
        extra_main_cf: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> PostfixInstance:
        base = tmp_path / f"postfix-{len(instances)}"
        instance = PostfixInstance(base, transports, extra_master_cf, extra_main_cf, **kwargs)
        instances.append(instance)
        instance.start()
        return instance

    try:
        yield create
    finally:
        for instance in reversed(instances):
            instance.stop()
