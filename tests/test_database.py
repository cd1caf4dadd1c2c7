"""Opening the depot: what an administrator reads when its URI is wrong or secret."""

from __future__ import annotations

import pytest

from postoffice.database import open_db, redact, redact_uri
from postoffice.errors import ConfigError


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


def test_a_scheme_without_resolver_says_which_extra_to_install() -> None:
    with pytest.raises(ConfigError) as caught:
        open_db("postgres://po:hunter2@127.0.0.1/mail")
    message = str(caught.value)
    assert "no resolver for postgres: URIs is installed" in message
    assert "postoffice[postgresql]" in message
    assert "hunter2" not in message


def test_a_misspelt_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="no resolver for zoe: URIs"):
        open_db("zoe:///srv/po/zeo.sock")
