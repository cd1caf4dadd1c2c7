"""What every part of the harness shares: the envelope, units, a run's plan and its samples.

Nothing here (nor anywhere in the harness but ``worker.py``) imports the
package: the peers must still be measurable where postoffice cannot run.
The plan and the samples are dataclasses because ``--json`` writes them
out field by field, in this order.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
QUEUE = "Bench"
SENDER = "sender@client.bench.example"
RECIPIENT = "rcpt@app.bench.example"
KIB = 1024
MIB = 1024 * 1024
# The consumer loops of the drain part, in pops a commit: postoffice.consume()
# with per_commit=1, 10, and its default (postoffice.consumer.PER_COMMIT), the
# loop docs/consumers.md recommends and the drain target is judged on.
RECOMMENDED_LOOP = 50
DRAIN_LOOPS = (1, 10, RECOMMENDED_LOOP)

# ``--keep``: leave the temporary folders for a look afterwards.
KEEP = False


class BenchError(Exception):
    """A run that cannot be counted: the reason is shown in the table's place."""


@dataclass
class Plan:
    servers: list[str]
    sizes: list[int]
    sessions: list[int]
    rounds: int
    messages: int
    sink_messages: int
    prefill: int
    # Messages of each scale run: a run of 3,000 lasts about 1.5 s, too short
    # for a stable ratio between two runs (it moved from 0.77 to 0.93).
    scale_messages: int
    rss_message: int
    rss_sessions: int
    consume: int
    parts: set[str]
    profile: float
    profile_gil: bool = False
    profile_full: bool = False
    profile_server: str = "postoffice"
    blob_messages: int = 400


@dataclass
class Sample:
    """One run: one server, one case, fresh store."""

    server: str
    size: int
    sessions: int
    messages: int
    round: int
    seconds: float = 0.0
    delivered: int = 0
    cpu_seconds: float = 0.0  # user + system
    cpu_system_seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        """None for a run that does not count, so that it stays out of every median."""
        if self.error is not None or self.seconds <= 0:
            return None
        return self.messages / self.seconds


@dataclass(slots=True)
class Results:
    """What the parts of one invocation measured, each left empty when it did not run.

    Slots, because ``experiments.run`` fills the fields by name.
    """

    samples: list[Sample] = field(default_factory=list)
    scaled: list[Sample] = field(default_factory=list)
    rss: dict[str, dict[str, Any]] | None = None
    consumed: list[dict[str, Any]] = field(default_factory=list)
    drained: list[dict[str, Any]] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    blobs: list[dict[str, Any]] = field(default_factory=list)
    profiled: dict[str, Any] | None = None
    relayed: list[Sample] = field(default_factory=list)

    def failed(self) -> bool:
        """Whether any run did not count (the profile aside): the exit status says so."""
        return (
            any(s.error for s in self.samples + self.scaled + self.relayed)
            or any("error" in r for r in (self.rss or {}).values())
            or any("error" in r for r in self.consumed)
            or any("error" in r for r in self.drained)
            or any("error" in r for r in self.served)
            or any("error" in r for r in self.blobs)
        )


def human_size(size: float) -> str:
    """1 KiB, 1.5 MiB: sizes as the tables and the targets name them."""
    for unit, factor in (("MiB", MIB), ("KiB", KIB)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def remove(path: Path) -> None:
    """A run's folder goes as soon as the run is counted, unless ``--keep`` asked otherwise."""
    if KEEP:
        return
    shutil.rmtree(path, ignore_errors=True)
