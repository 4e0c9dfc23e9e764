"""Result output: an aligned table (rich), CSV, JSON lines, or a Parquet file.

:class:`Printer` writes every result of one command to one destination
(stdout or ``--output FILE``) and puts status lines ("4 rows in 0.12 s") where
they keep machine-readable output clean: after the table on a terminal,
otherwise on stderr.
"""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import json
import math
import sys
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UsageError

__all__ = ["Printer", "plain_value", "json_value", "human_size"]


def human_size(n: float) -> str:
    """``5.8 KiB``, ``10.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def json_value(value: Any) -> Any:
    """A JSON-compatible form of a value from ``Table.to_pylist()``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value.as_tuple().exponent >= 0 else float(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # Arrow maps come back as lists of (key, value) tuples.
        return [json_value(v) for v in value]
    return str(value)


def plain_value(value: Any, null: str = "") -> str:
    """A value as text for CSV and table cells."""
    if value is None:
        return null
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat(sep=" ") if isinstance(value, datetime.datetime) else value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(json_value(value), ensure_ascii=False)
    return str(value)


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()


def _row_values(table: pa.Table) -> Iterator[list[Any]]:
    names = table.column_names
    for row in _rows(table):
        yield [row[name] for name in names]


def _is_numeric(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


class Printer:
    """Writes results in one format to stdout or a file."""

    def __init__(self, fmt: str, *, output: str | None = None, max_rows: int | None = None,
                 stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.fmt = fmt
        self.output = output
        self.max_rows = max_rows
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if fmt == "parquet" and not output:
            raise UsageError("--format parquet needs --output FILE")
        self._file: IO[str] | None = None
        self._results_written = 0

    # -- destinations ---------------------------------------------------------------

    @property
    def interactive(self) -> bool:
        """Table output straight to a terminal: status lines go with it."""
        return self.fmt == "table" and not self.output and self.stdout.isatty()

    def _stream(self) -> IO[str]:
        if not self.output:
            return self.stdout
        if self._file is None:
            try:
                self._file = open(self.output, "w", encoding="utf-8", newline="")
            except OSError as exc:
                raise OSError(exc.errno, f"cannot write {self.output}: {exc.strerror}") from exc
        return self._file

    def status(self, text: str) -> None:
        """A line about the result (row count, time, message)."""
        stream = self.stdout if self.interactive else self.stderr
        print(text, file=stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- results ------------------------------------------------------------------------

    def result(self, table: pa.Table, *, message: str | None = None, elapsed: float | None = None) -> None:
        """Print one statement's result (rows, or its message) and its status line."""
        timing = f" in {elapsed:.2f} s" if elapsed is not None else ""
        if message is not None and table.column_names == ["plan"]:   # EXPLAIN
            if self.fmt == "table":
                print(message, file=self._stream(), flush=True)
            else:
                self.rows(table)
            return
        if message is not None:
            self.status(f"{message}{timing}" if elapsed is not None else message)
            return
        if table.num_columns == 0:
            self.status(f"OK{timing}")
            return
        total = table.num_rows
        self.rows(table)
        noun = "row" if total == 1 else "rows"
        self.status(f"{total} {noun}{timing}")

    def rows(self, table: pa.Table) -> None:
        total = table.num_rows
        if self.fmt != "parquet" and self.max_rows is not None and total > self.max_rows:
            table = table.slice(0, self.max_rows)
            print(f"shoal: output truncated to {self.max_rows} of {total} rows (--max-rows)",
                  file=self.stderr, flush=True)
        writer = {"table": self._table, "csv": self._csv, "json": self._json, "parquet": self._parquet}[self.fmt]
        writer(table)
        self._results_written += 1

    def _table(self, table: pa.Table) -> None:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        stream = self._stream()
        terminal = stream.isatty()
        console = Console(file=stream, highlight=False, soft_wrap=False,
                          width=None if terminal else 100_000, force_terminal=terminal or None,
                          no_color=not terminal)
        view = Table(box=box.ROUNDED if terminal else box.ASCII2, show_edge=True, pad_edge=True)
        for field in table.schema:
            view.add_column(Text(field.name, style="bold" if terminal else ""),
                            justify="right" if _is_numeric(field.type) else "left",
                            no_wrap=not terminal, overflow="fold")
        for values in _row_values(table):
            view.add_row(*[Text("NULL", style="dim") if v is None else Text(plain_value(v)) for v in values])
        console.print(view)
        stream.flush()

    def _csv(self, table: pa.Table) -> None:
        stream = self._stream()
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(table.column_names)
        for values in _row_values(table):
            writer.writerow([plain_value(v) for v in values])
        stream.flush()

    def _json(self, table: pa.Table) -> None:
        stream = self._stream()
        for row in _rows(table):
            stream.write(json.dumps({k: json_value(v) for k, v in row.items()}, ensure_ascii=False))
            stream.write("\n")
        stream.flush()

    def _parquet(self, table: pa.Table) -> None:
        if self._results_written:
            raise UsageError("--format parquet writes one result per file; the statements produced several")
        path = Path(str(self.output)).expanduser()
        try:
            pq.write_table(table, str(path))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
