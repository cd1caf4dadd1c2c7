"""Opening the depot: what an administrator reads when its URI is wrong or secret."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import zodburi

from postoffice.database import open_db, open_db_waiting, redact, redact_uri
from postoffice.errors import ConfigError, StorageUnavailable
from tests.helpers import uri_for


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgres://po:s3cr%40t@db.example/mail?x=1", "postgres://po:***@db.example/mail?x=1"),
        ("zeo://u:hunter2@127.0.0.1:9100?blob_dir=/b", "zeo://u:***@127.0.0.1:9100?blob_dir=/b"),
        (
            "zeo://127.0.0.1:1?password=hunter2&wait_timeout=1",
            "zeo://127.0.0.1:1?password=***&wait_timeout=1",
        ),
        (
            "postgres://db/mail?dsn=dbname%3Dmail%20password%3Dhunter2%20host%3D%2Frun",
            "postgres://db/mail?dsn=dbname%3Dmail%20password%3D***%20host%3D%2Frun",
        ),
        (
            "file:///srv/po/Data.fs?blobstorage_dir=/srv/po/blobs",
            "file:///srv/po/Data.fs?blobstorage_dir=/srv/po/blobs",
        ),
        ("postgres://po@db/mail", "postgres://po@db/mail"),
    ],
)
def test_a_printed_uri_never_shows_its_password(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


def test_an_error_message_quoting_the_password_hides_it_too() -> None:
    uri = "postgres://po:s3cr%40t@db.example/mail"
    text = redact(f"cannot open {uri}: authentication failed (password 's3cr@t')", uri)
    assert "s3cr" not in text
    assert "postgres://po:***@db.example/mail" in text


def test_a_scheme_without_resolver_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RelStorage is a test dependency: hide its resolvers, as where it is not installed.
    found = zodburi.entry_points

    def without_relstorage(**kw: str) -> list[Any]:
        return [ep for ep in found(**kw) if not ep.value.startswith("relstorage.")]

    monkeypatch.setattr(zodburi, "entry_points", without_relstorage)
    with pytest.raises(ConfigError) as caught:
        open_db("postgres://po:hunter2@127.0.0.1/mail")
    message = str(caught.value)
    assert "no resolver for postgres: URIs is installed" in message
    assert "postoffice[postgresql]" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("postgres://po:hunter2@127.0.0.1/mail", "no port: RelStorage needs postgres://USER"),
        ("postgres://127.0.0.1:5432/mail", "no user:"),
        ("postgres://db.example/mail?dsn=dbname%3Dmail", "nothing between // and ?"),
        ("postgres://po:hunter2@db.example:5432/mail?keep_histroy=0", "unknown parameters"),
    ],
)
def test_a_postgres_uri_relstorage_would_misread_is_one_clear_line(uri: str, says: str) -> None:
    pytest.importorskip("relstorage")
    with pytest.raises(ConfigError) as caught:
        open_db(uri)
    message = str(caught.value)
    assert says in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_a_misspelt_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="no resolver for zoe: URIs"):
        open_db("zoe:///srv/po/zeo.sock")


# --- waiting for a FileStorage another process holds --------------------------------


class FakeTime:
    """The clock and sleep of the wait loop: no test waits ten real seconds."""

    def __init__(self, on_sleep: object = None) -> None:
        self.now = 0.0
        self.sleeps = 0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if callable(self.on_sleep):
            self.on_sleep(self.sleeps)


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "locked by another process" in r.getMessage()]


def test_a_lock_held_too_long_is_one_log_line_then_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = uri_for(tmp_path)
    holder = open_db(uri)  # the lock, as another postoffice-deliver holds it
    try:
        fake = FakeTime()
        with (
            caplog.at_level(logging.INFO, logger="postoffice.database"),
            pytest.raises(StorageUnavailable),
        ):
            open_db_waiting(uri, wait=10.0, sleep=fake.sleep, clock=fake.clock)
        assert fake.sleeps >= 40  # it kept trying for the whole wait...
        assert len(waiting_lines(caplog)) == 1  # ...and said so once
    finally:
        holder.close()


def test_a_lock_given_up_while_waiting_opens_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = uri_for(tmp_path)
    holder = open_db(uri)

    def release(sleeps: int) -> None:
        if sleeps == 3:
            holder.close()

    fake = FakeTime(release)
    with caplog.at_level(logging.INFO, logger="postoffice.database"):
        db = open_db_waiting(uri, wait=10.0, sleep=fake.sleep, clock=fake.clock)
    db.close()
    assert fake.sleeps == 3
    assert len(waiting_lines(caplog)) == 1
