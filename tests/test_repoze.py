"""``postoffice import-repoze``: a depot written the way repoze.postoffice 0.25 wrote it.

0.25 is a Python 2 package and is not installed: the old depot is written
by a separate process that defines 0.25's classes under their own module
name (``repoze.postoffice.queue``), with 0.25's layout: a ``QueuesFolder``
OOBTree at ``/postoffice``, each ``Queue`` with an IOBTree ``_messages`` of
``_QueuedMessage`` (the flattened message in a blob) and an IOBTree
``_quarantine`` of ``(message, error)``.  The importing process never has
those classes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import transaction

from postoffice import open_queue
from tests.helpers import config_text, run_postoffice, uri_for
from tests.test_cli import served

WRITE_025 = r"""
import sys, types
import transaction, ZODB, zodburi
from BTrees.IOBTree import IOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from persistent.dict import PersistentDict
from persistent.list import PersistentList
from ZODB.blob import Blob

module = types.ModuleType("repoze.postoffice.queue")
for name in ("repoze", "repoze.postoffice"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["repoze.postoffice.queue"] = module

class QueuesFolder(OOBTree):
    pass

class Queue(Persistent):
    def __init__(self):
        self._quarantine = IOBTree()
        self._messages = IOBTree()
        self._freq_data = OOBTree()
        self._message_ids = OOBTree()

class _QueuedMessage(Persistent):
    def __init__(self, raw):
        self._blob_file = blob = Blob()
        with blob.open("w") as out:
            out.write(raw)

class _FreqData(PersistentList):
    def __init__(self):
        super().__init__()
        self.throttles = PersistentDict()

for cls in (QueuesFolder, Queue, _QueuedMessage, _FreqData):
    cls.__module__ = module.__name__
    setattr(module, cls.__name__, cls)

uri, spec = sys.argv[1], __import__("json").loads(sys.argv[2])
factory, kw = zodburi.resolve_uri(uri)
db = ZODB.DB(factory(), **kw)
conn = db.open()
folder = conn.root()["postoffice"] = QueuesFolder()
for name, (waiting, held) in spec.items():
    queue = folder[name] = Queue()
    for n, subject in enumerate(waiting):
        queue._messages[n] = _QueuedMessage(
            f"From: a@outside.example\nTo: x@app.example\nSubject: {subject}\n\nbody\n".encode())
    for n, (subject, error) in enumerate(held):
        message = _QueuedMessage(f"From: a@outside.example\nSubject: {subject}\n\nbad\n".encode())
        queue._quarantine[n] = (message, error)
    freq = folder[name]._freq_data["a@outside.example"] = _FreqData()
    freq.append((0, {}))
transaction.commit()
db.close()
"""

SPEC = {
    "Customer A": (["first", "second", "third"], [["broken", "Traceback ...\nKeyError: 'x'"]]),
    "Old only": (["lonely"], []),
}


def old_depot(folder: Path) -> str:
    folder.mkdir()
    uri = uri_for(folder)
    written = subprocess.run(
        [sys.executable, "-c", WRITE_025, uri, json.dumps(SPEC)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    return uri


def test_import_copies_queued_and_quarantined_mail_in_order(tmp_path: Path) -> None:
    old_uri = old_depot(tmp_path / "old")
    cfg = tmp_path / "postoffice.ini"
    cfg.write_text(
        config_text(uri_for(tmp_path / "new"), queues={"Customer A": "to_hostname: app.example"})
    )
    served(cfg)
    result = run_postoffice("-C", str(cfg), "import-repoze", old_uri)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "postoffice: Customer A: copied 3 messages and 1 quarantined",
        "postoffice: Old only: copied 1 messages and 0 quarantined "
        "(not in the configuration: postoffice queues move)",
    ]
    with open_queue(uri_for(tmp_path / "new"), "Customer A") as queue:
        assert [queue.pop_next()["Subject"] for _ in range(3)] == ["first", "second", "third"]
        transaction.abort()
        ((message, error),) = list(queue.get_quarantined_messages())
        assert message["Subject"] == "broken"
        assert error == "Traceback ...\nKeyError: 'x'"
    with open_queue(uri_for(tmp_path / "new"), "Old only") as queue:
        popped = queue.pop_next()
        assert popped.as_bytes().endswith(b"Subject: lonely\n\nbody\n")
        transaction.abort()


def test_a_025_depot_as_zodb_uri_says_what_to_do(tmp_path: Path) -> None:
    old_uri = old_depot(tmp_path / "old")
    cfg = tmp_path / "postoffice.ini"
    cfg.write_text(config_text(old_uri))
    result = run_postoffice("-C", str(cfg), "check")
    assert result.returncode == 78
    (line,) = result.stderr.splitlines()
    assert "holds a repoze.postoffice 0.25 folder" in line
    assert "postoffice import-repoze OLD_URI" in line


def test_an_old_uri_without_a_025_folder_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "postoffice.ini"
    cfg.write_text(config_text(uri_for(tmp_path / "new")))
    served(cfg)
    result = run_postoffice("-C", str(cfg), "import-repoze", uri_for(tmp_path / "new"))
    assert result.returncode == 65
    assert (
        result.stderr
        == "postoffice: /postoffice in the old database is not a repoze.postoffice 0.25 folder\n"
    )
