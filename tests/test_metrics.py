"""``[metrics]``: serve's figures scraped over HTTP, as Prometheus scrapes them."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import Process, client, in_ci, mail, send, write_lmtp_config

if in_ci():  # the test extra installs it: in CI a missing package is a failure
    import prometheus_client.parser as prometheus_parser
else:
    prometheus_parser = pytest.importorskip("prometheus_client.parser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_metrics(folder: Path, listen: str) -> Path:
    path = write_lmtp_config(folder)
    path.write_text(path.read_text() + f"\n[metrics]\nlisten = {listen}\n")
    return path


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_counts_deliveries_refusals_and_what_waits(tmp_path: Path) -> None:
    port = free_port()
    server = Process(
        tmp_path, with_metrics(tmp_path, f"127.0.0.1:{port}"), module="postoffice.cli",
        args=("serve",),
    )  # fmt: skip
    try:
        server.wait_for("listening on", stream="out")
        with client(tmp_path / "lmtp.sock") as lmtp:
            for _ in range(2):
                assert send(lmtp, ["one@alpha.test"], mail(["one@alpha.test"]))[0][0] == 250
            assert send(lmtp, ["x@nowhere.test"], mail(["x@nowhere.test"]))[0][0] == 550
            figures = scrape(port)
        sent = ("postoffice_deliveries_total", (("queue", "Alpha"), ("status", "sent")))
        refused = ("postoffice_deliveries_total", (("queue", ""), ("status", "refused")))
        assert figures[sent] == 2
        assert figures[refused] == 1
        assert figures[("postoffice_refusals_total", (("rule", "no_queue"),))] == 1
        assert figures[("postoffice_queue_depth", (("queue", "Alpha"),))] == 2
        assert figures[("postoffice_queue_depth", (("queue", "Beta"),))] == 0
        assert figures[("postoffice_queue_oldest_age_seconds", (("queue", "Alpha"),))] >= 0
        assert figures[("postoffice_quarantined", (("queue", "Alpha"),))] == 0
        assert figures[("postoffice_dead_letters", ())] == 0
        assert figures[("postoffice_depot_up", ())] == 1
        assert figures[("postoffice_sessions_open", ())] == 1  # the client above
        assert figures[("postoffice_commit_seconds_count", ())] >= 2
        assert ("postoffice_conflicts_retried_total", ()) in figures
    finally:
        assert server.stop() == 0
    assert "commits retried after a conflict" in server.err.read_text()


def test_metrics_beyond_loopback_are_refused_at_start(tmp_path: Path) -> None:
    server = Process(
        tmp_path, with_metrics(tmp_path, "0.0.0.0:9127"), module="postoffice.cli",
        args=("serve",),
    )  # fmt: skip
    assert server.proc.wait(60) == 78
    assert "allow_remote = yes in [metrics]" in server.err.read_text()
    assert not (tmp_path / "lmtp.sock").exists()
    assert not (tmp_path / "var").exists()  # refused before the database opened
    check = Process(
        tmp_path, tmp_path / "postoffice.ini", module="postoffice.cli", args=("check",),
        name="check",
    )  # fmt: skip
    assert check.proc.wait(60) == 78
