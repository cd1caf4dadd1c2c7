"""The depot in ZODB: the queues folder, the queues, and what they remember.

Layout under ``zodb_path`` (``/postoffice`` by default)::

    QueuesFolder                                         (folder.py)
      queues: OOBTree  name -> Queue
      dead_letters: LOBTree  id -> DeadLetter   (mail we failed to decide)
      review_lanes: LANES x (LOBTree id -> QuarantineRecord, Length)
                             (refusals discarded for review; made at the
                              first use, a process adding to its own lane)
      review, review_count: the one such pair before lanes: read, emptied
      recent_lanes, recent, recent_count: the same, for the last deliveries
                             (replay, with replay_keep; review.py)

    Queue                                                (queue.py)
      _lanes:      LANES x MessageTree (LOBTree)  key -> MessageRecord
                             (FIFO by key across the lanes; a process appends
                              to the lane of its key salt, and removes the
                              consumed records at its head)
      _messages:   MessageTree, the one FIFO tree before lanes: read, consumed,
                             never appended to
      _length:     Length    messages waiting (not claimed by a consumer)
      _holders:    LOBTree   key -> (lease end, holder id) of claimed messages
      _claims:     OOTreeSet (lease end, key), the same claims by age   (fifo.py)
      _quarantine: LOBTree   key -> QuarantineRecord
      _quarantine_length: Length                                (quarantine.py)
      _ledger_lanes: LANES x (Ledger, LedgerTimes), a process writing to
                   the lane of its key salt, every lane read:
                   Ledger (LLBTree)  keyed hash of (message-id, recipient)
                                 -> check bits << 32 | arrival   (duplicates, 24 h)
                   LedgerTimes (LLBTree)  time key -> ledger key   (pruning)
      _ledger, _ledger_by_time: the one such pair before lanes: read, pruned
      _ledger_salt: bytes     the key of the ledger's hash   (duplicates.py)
      _sender_lanes: LANES x (OOBTree, OOTreeSet), written and read as the
                   ledger's lanes:
                   OOBTree   throttle key -> (arrivals tuple, throttled until)
                   OOTreeSet (last activity, key)              (throttle.py)
      _senders, _senders_by_time: the one such pair before lanes: read,
                   pruned, written only to lift a throttle or forget a key

The records, trees with small nodes and keys are in ``records.py``; the
claimer that makes a consumer's pops exclusive across processes in
``claims.py``; the consumer's view of a stored message in ``stored.py``.

That layout is the data format: the pickled state of a ``Queue`` (and of
the folder and the records) is its ``__dict__``, so the parts of a queue
are plain objects over those attributes, never persistent ones of their
own.  And a ZODB record names its class by module and name: every
persistent class of the package sets ``__module__ = "postoffice.store"``
and is re-exported here, so it pickles as ``postoffice.store.<Name>``, as
it did when the store was one module, and the records already written
load (``tests/test_store_format.py`` pins the names and reads a database
that the single-module store wrote).
"""

from postoffice.decide import throttle_window
from postoffice.store.claims import (
    CLAIM_AHEAD,
    CLAIM_AHEAD_FOR,
    CLAIM_AHEAD_WHEN,
    CLAIM_LEASE,
    CLEANUP_AT,
)
from postoffice.store.folder import (
    FolderState,
    QueuesFolder,
    choose_lane,
    find_folder,
    reconcile,
    retired,
)
from postoffice.store.queue import Queue
from postoffice.store.records import (
    BLOB_THRESHOLD,
    PRUNE_BATCH,
    DeadLetter,
    Ledger,
    LedgerTimes,
    MessageRecord,
    MessageTree,
    QuarantineRecord,
    new_key,
)
from postoffice.store.review import KeptArea
from postoffice.store.stored import StoredMessage, stored_message

__all__ = [
    "BLOB_THRESHOLD",
    "CLAIM_AHEAD",
    "CLAIM_AHEAD_FOR",
    "CLAIM_AHEAD_WHEN",
    "CLAIM_LEASE",
    "CLEANUP_AT",
    "PRUNE_BATCH",
    "DeadLetter",
    "FolderState",
    "KeptArea",
    "Ledger",
    "LedgerTimes",
    "MessageRecord",
    "MessageTree",
    "QuarantineRecord",
    "Queue",
    "QueuesFolder",
    "StoredMessage",
    "choose_lane",
    "find_folder",
    "new_key",
    "reconcile",
    "retired",
    "stored_message",
    "throttle_window",
]
