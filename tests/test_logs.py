"""Where the log goes: ``[logging]``, ``-v``, and one decision line from both front doors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from postoffice import config
from postoffice.errors import ConfigError
from tests.helpers import Process, client, mail, send, wait_for, write_lmtp_config


def with_logging(folder: Path, **options: str) -> Path:
    """The LMTP test configuration with a ``[logging]`` section of ``options``."""
    path = write_lmtp_config(folder)
    lines = "".join(f"{name} = {value}\n" for name, value in options.items())
    path.write_text(path.read_text() + "\n[logging]\n" + lines)
    return path


def serve(folder: Path, cfg: Path, *flags: str) -> Process:
    server = Process(folder, cfg, module="postoffice.cli", args=(*flags, "serve"))
    server.wait_for("listening on", stream="out")
    return server


def deliver(folder: Path, rcpt: str = "one@alpha.test") -> None:
    with client(folder / "lmtp.sock") as lmtp:
        ((code, text),) = send(lmtp, [rcpt], mail([rcpt]))
    assert code == 250, text


def test_serve_logs_to_the_file_logging_names_and_not_to_stderr(tmp_path: Path) -> None:
    log = tmp_path / "postoffice.log"
    server = serve(tmp_path, with_logging(tmp_path, target=str(log)))
    try:
        deliver(tmp_path)
        wait_for(lambda: "to=<one@alpha.test>" in log.read_text(), 30, "the decision line")
    finally:
        assert server.stop() == 0
    (line,) = [x for x in log.read_text().splitlines() if "to=<one@alpha.test>" in x]
    assert " status=sent (250 2.0.0 <one@alpha.test> queued in Alpha as " in line
    assert "to=<" not in server.err.read_text()


def test_a_level_of_warning_keeps_the_decisions_out(tmp_path: Path) -> None:
    server = serve(tmp_path, with_logging(tmp_path, level="warning"))
    try:
        deliver(tmp_path)
    finally:
        assert server.stop() == 0
    # The stop line is INFO too: with it missing, nothing below WARNING was written.
    assert "status=sent" not in server.err.read_text()
    assert " INFO " not in server.err.read_text()


def test_verbose_shows_the_session_not_the_transactions(tmp_path: Path) -> None:
    server = serve(tmp_path, write_lmtp_config(tmp_path), "-v")
    try:
        deliver(tmp_path)
        server.wait_for("recip: one@alpha.test")  # aiosmtpd's line for the RCPT command
    finally:
        assert server.stop() == 0
    err = server.err.read_text()
    assert " txn" not in err  # no line per transaction
    assert "Hello." not in err  # nor the message itself


def test_the_pipe_writes_the_same_line_where_logging_says(tmp_path: Path) -> None:
    log = tmp_path / "deliver.log"
    cfg = with_logging(tmp_path, target=str(log))
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTOFFICE_")}
    result = subprocess.run(
        [sys.executable, "-m", "postoffice.pipe", "-C", str(cfg), "-f", "a@outside.test",
         "one@alpha.test"],
        input=mail(["one@alpha.test"]), capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, b"")
    (line,) = [x for x in log.read_text().splitlines() if "to=<one@alpha.test>" in x]
    assert "postoffice-deliver[" in line
    assert " from=<a@outside.test> to=<one@alpha.test> size=" in line
    assert " status=sent (250 2.0.0 <one@alpha.test> queued in Alpha as " in line


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("level", "loud", "'loud' is not one of debug, info, warning, error"),
        ("target", "logs/po.log", "stderr, syslog or an absolute file path"),
        ("facility", "kern", "'kern' is not one of"),
        ("colour", "yes", "colour"),
    ],
)
def test_a_bad_logging_option_is_named(tmp_path: Path, option: str, value: str, said: str) -> None:
    cfg = with_logging(tmp_path, **{option: value})
    with pytest.raises(ConfigError) as raised:
        config.load(cfg)
    assert "[logging]" in str(raised.value) and option in str(raised.value)
    assert said in str(raised.value)


def test_a_log_file_serve_cannot_open_stops_it_with_78(tmp_path: Path) -> None:
    cfg = with_logging(tmp_path, target=str(tmp_path / "no-such-folder" / "po.log"))
    server = Process(tmp_path, cfg, module="postoffice.cli", args=("serve",))
    assert server.proc.wait(60) == 78
    assert "[logging] target = " in server.err.read_text()
    assert not (tmp_path / "lmtp.sock").exists()
