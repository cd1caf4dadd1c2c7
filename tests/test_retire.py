"""``postoffice queues move`` and ``queues purge``: a queue dropped from the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import transaction

from postoffice import config, open_queue
from postoffice.deliver import Depot
from tests.helpers import HERE_URI, config_text, message, run_postoffice

OLD = {"A": "to_hostname: a.example", "Old": "to_hostname: old.example"}
NEW = {"A": "to_hostname: a.example"}


def retired_queue(tmp_path: Path, waiting: int, quarantined: int) -> Path:
    """A depot whose queue Old holds mail, and a configuration that no longer names it."""
    path = tmp_path / "postoffice.ini"
    path.write_text(config_text(HERE_URI, queues=OLD))
    depot = Depot(config.load(path))
    try:
        for n in range(waiting + quarantined):
            depot.deliver("s@outside.example", [f"u{n}@old.example"], message(n))
    finally:
        depot.close()
    with open_queue(config.load(path).zodb_uri, "Old") as queue:
        for _ in range(quarantined):
            queue.quarantine(queue.pop_next(), "kept for a person")
        transaction.commit()
    path.write_text(config_text(HERE_URI, queues=NEW))
    return path


def depths(cfg: Path) -> dict[str, tuple[int, int]]:
    result = run_postoffice("-C", str(cfg), "queues", "--json")
    assert result.returncode == 0, result.stderr
    return {r["name"]: (r["depth"], r["quarantined"]) for r in json.loads(result.stdout)["queues"]}


def test_check_says_how_to_move_a_retired_queue(tmp_path: Path) -> None:
    cfg = retired_queue(tmp_path, waiting=2, quarantined=1)
    result = run_postoffice("-C", str(cfg), "check")
    assert result.returncode == 0
    assert "queue 'Old' is no longer in the configuration but holds 2 messages" in result.stdout
    assert "postoffice queues move 'Old' --to QUEUE" in result.stdout


def test_move_takes_waiting_and_quarantined_mail_in_order_and_drops_the_queue(
    tmp_path: Path,
) -> None:
    cfg = retired_queue(tmp_path, waiting=150, quarantined=2)  # more than one batch
    result = run_postoffice("-C", str(cfg), "queues", "move", "Old", "--to", "A")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "postoffice: moved 150 messages and 2 quarantined from 'Old' to 'A'; queue 'Old' removed\n"
    )
    assert depths(cfg) == {"A": (150, 2)}
    with open_queue(config.load(cfg).zodb_uri, "A") as queue:
        subjects = [queue.pop_next()["Subject"] for _ in range(150)]
        transaction.abort()
        kept = [error for _message, error in queue.get_quarantined_messages()]
    # The two quarantined were popped first; the rest keep their order.
    assert subjects == [f"number {n}" for n in range(2, 152)]
    assert kept == ["kept for a person", "kept for a person"]


def test_move_and_purge_refuse_what_would_lose_or_mix_mail(tmp_path: Path) -> None:
    cfg = retired_queue(tmp_path, waiting=1, quarantined=0)
    to_nowhere = run_postoffice("-C", str(cfg), "queues", "move", "Old", "--to", "Nope")
    assert to_nowhere.returncode == 65
    assert to_nowhere.stderr == "postoffice: no queue 'Nope' (known queues: 'A', 'Old')\n"
    into_itself = run_postoffice("-C", str(cfg), "queues", "move", "Old", "--to", "Old")
    assert into_itself.returncode == 64
    configured = run_postoffice("-C", str(cfg), "queues", "purge", "A")
    assert configured.returncode == 64
    assert "is in the configuration; remove it there first" in configured.stderr
    assert depths(cfg) == {"A": (0, 0), "Old": (1, 0)}


def test_purge_deletes_a_retired_queue_and_says_what_it_held(tmp_path: Path) -> None:
    cfg = retired_queue(tmp_path, waiting=3, quarantined=1)
    result = run_postoffice("-C", str(cfg), "queues", "purge", "Old")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "postoffice: purged queue 'Old': deleted 3 messages and 1 quarantined\n"
    assert depths(cfg) == {"A": (0, 0)}
