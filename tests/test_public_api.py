"""The public surface applications import is exactly what we document."""

from __future__ import annotations

import postoffice


def test_all_is_the_documented_api() -> None:
    assert sorted(postoffice.__all__) == sorted(
        [
            "ConfigError",
            "Consumed",
            "PostofficeError",
            "Queue",
            "QueueEmpty",
            "QueuesFolder",
            "SMTPSender",
            "StorageUnavailable",
            "TemporaryError",
            "UnreadableMessage",
            "consume",
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


def test_every_subpackage_is_packaged() -> None:
    """A wheel holds the packages pyproject.toml lists: a new subpackage must be among them."""
    import tomllib
    from pathlib import Path

    top = Path(postoffice.__file__).parent
    project = tomllib.loads((top.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(top.parent).parts) for init in top.rglob("__init__.py")
    }
    assert found == listed
