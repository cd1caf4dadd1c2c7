"""The public surface applications import is exactly what we document."""

from __future__ import annotations

import postoffice


def test_all_is_the_documented_api() -> None:
    assert sorted(postoffice.__all__) == sorted(
        [
            "ConfigError",
            "PostofficeError",
            "Queue",
            "QueueEmpty",
            "QueuesFolder",
            "SMTPSender",
            "StorageUnavailable",
            "TemporaryError",
            "find_queue",
            "open_queue",
            "send_mail",
        ]
    )
    for name in postoffice.__all__:
        assert getattr(postoffice, name) is not None


def test_queue_empty_is_an_index_error() -> None:
    """Old consumers caught IndexError; they keep working."""
    assert issubclass(postoffice.QueueEmpty, IndexError)
    assert issubclass(postoffice.StorageUnavailable, postoffice.TemporaryError)
