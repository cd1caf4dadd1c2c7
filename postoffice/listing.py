"""What the administrator's commands print: aligned tables for people, JSON for scripts.

Every listing command builds rows once (frozen dataclasses with
``as_json``) and prints them through here, so that ``--json`` and the
table always show the same rows, and every table is laid out alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> list[str]:
    """Lines of a table: a header and one line a row, columns padded to the widest cell.

    ``empty`` is printed instead when there is no row, so that nobody has
    to guess whether a header with nothing below it means none or an error.
    The last column is not padded (it holds free text: an error, a reason).
    """
    if not rows:
        return [empty]
    cells = [[str(c) for c in columns]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        for line in cells
    ]


def show(
    rows: Sequence[Any],
    columns: Sequence[str],
    cells: Sequence[Sequence[object]],
    empty: str,
    json_output: bool,
) -> None:
    """Print a listing: ``rows`` as JSON with ``--json``, else ``cells`` as a table."""
    print(as_json(list(rows)) if json_output else "\n".join(table(columns, cells, empty)))


def show_records(
    records: Sequence[Any], columns: Sequence[str], empty: str, json_output: bool
) -> None:
    """:func:`show` for records that give their own ``as_json()`` and ``cells()``."""
    show(
        [record.as_json() for record in records],
        columns,
        [record.cells() for record in records],
        empty,
        json_output,
    )


def as_json(value: Any) -> str:
    """JSON as every ``--json`` prints it (indented, keys in the order built)."""
    return json.dumps(value, indent=2)
