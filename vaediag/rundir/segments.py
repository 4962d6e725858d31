"""Tables (per-step and per-evaluation rows) as Arrow IPC stream segments: the append-only
writer, compaction, the two-pass reader and the truncation a resume needs."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from vaediag.rundir.layout import atomic_write

#: Integer columns; every other column is float32, except those in DOUBLE_COLUMNS.
INT_COLUMNS = frozenset({"step", "epoch"})

DOUBLE_COLUMNS = frozenset({"time"})


_SEGMENT_RE = re.compile(r"^(\d{6})\.arrows$")
#: Compacted segments (and those a resume rewrites) are compressed with zstd. The small
#: batches a run flushes as it goes are written uncompressed: zstd compresses each column's
#: buffer on its own, which for a row of 150 statistics cost ~2.8 ms per flush of 50 rows
#: (more than the rest of a step's recording); the segment is compressed when compacted.
_IPC_OPTIONS = ipc.IpcWriteOptions(compression="zstd")
_STREAM_OPTIONS = ipc.IpcWriteOptions(compression=None)


def _column_type(name: str) -> pa.DataType:
    if name in INT_COLUMNS:
        return pa.int64()
    if name in DOUBLE_COLUMNS:
        return pa.float64()
    return pa.float32()


def _segments(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SEGMENT_RE.match(p.name))


def _read_segment(path: Path, fields: list[str] | None = None) -> tuple[pa.Table | None, bool]:
    """All complete record batches of one segment (only ``fields`` of them, when given: the
    others are not even decompressed), and whether it ended cleanly."""
    batches: list[pa.RecordBatch] = []
    schema = None
    complete = True
    try:
        with pa.memory_map(str(path)) as source:
            reader = ipc.open_stream(source)
            schema = reader.schema
            if fields is not None:
                source.seek(0)
                included = [schema.get_field_index(f) for f in fields if f in schema.names]
                reader = ipc.open_stream(source, options=ipc.IpcReadOptions(
                    included_fields=included))
                schema = reader.schema
            for batch in reader:
                batches.append(batch)
    except (pa.ArrowInvalid, OSError, EOFError):
        complete = False  # a truncated last batch (killed writer) or one still being written
    if schema is None:
        return None, complete
    return pa.Table.from_batches(batches, schema=schema), complete

#: A segment that has reached this many rows is closed and rewritten in a few large record
#: batches (compacted), as is every segment when it is closed: rows are flushed in small batches for
#: durability, but a million steps in batches of 50 would take a reader tens of seconds to
#: decompress one tiny buffer at a time. A killed run leaves at most one segment uncompacted.
COMPACT_ROWS = 10_000
#: ... in record batches of at most this many rows: a file cut short (a torn disk write, a
#: truncated copy) loses the batch it was cut in and what follows, never the rows before it,
#: as with TensorBoard's event files. Smaller batches read slower (measured on 200,000 rows x
#: 105 columns: 0.14 s in one batch per segment, 0.17 s at 5,000 rows, 0.42 s at 1,000).
BATCH_ROWS = 5_000


def compact_segment(path: Path) -> None:
    """Rewrite a segment's complete record batches as batches of ``BATCH_ROWS``, atomically."""
    table, _ = _read_segment(path)
    if table is None or table.num_rows == 0:
        return
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=BATCH_ROWS)
    atomic_write(path, sink.getvalue().to_pybytes())


@dataclass
class _OpenSegment:
    """The segment a :class:`TableWriter` is appending to."""

    path: Path
    schema: pa.Schema
    sink: pa.OSFile
    writer: ipc.RecordBatchStreamWriter
    rows: int = 0


class _RowBlock:
    """Rows not yet written, held as one float64 block (rows x columns) and filled a part at
    a time: a part is a tuple of column names and as many values, whose positions in the
    block are looked up once per tuple. A row is then a few numpy assignments, whatever its
    width, and writing the block is one transpose, not a Python loop over rows and columns.
    A column a row lacks holds NaN (read back as missing)."""

    def __init__(self, rows: int = 64, width: int = 32):
        self.columns: dict[str, int] = {}  # name -> position, in order of appearance
        self.values = np.full((rows, width), np.nan)
        self.count = 0
        self._positions: dict[tuple[str, ...], np.ndarray] = {}

    def positions(self, names: tuple[str, ...]) -> np.ndarray:
        found = self._positions.get(names)
        if found is None:
            for name in names:
                if name not in self.columns:
                    self.columns[name] = len(self.columns)
            if len(self.columns) > self.values.shape[1]:  # wider: copy once, rarely
                wider = np.full((len(self.values), 2 * len(self.columns)), np.nan)
                wider[:, :self.values.shape[1]] = self.values
                self.values = wider
            found = self._positions[names] = np.fromiter(
                (self.columns[n] for n in names), dtype=np.intp, count=len(names))
        return found

    def add(self, parts: Sequence[tuple[tuple[str, ...], Any]]) -> None:
        at = [self.positions(names) for names, _ in parts]  # every column placed first
        if self.count == len(self.values):
            self.values = np.concatenate([self.values, np.full_like(self.values, np.nan)])
        row = self.values[self.count]
        for positions, (_, values) in zip(at, parts, strict=True):
            row[positions] = values
        self.count += 1

    def take(self) -> tuple[list[str], np.ndarray]:
        """The column names and the rows so far ((columns, rows), each column contiguous);
        the block is emptied."""
        columns = self.values[:self.count, :len(self.columns)].T.copy()  # C order: by column
        self.values[:self.count] = np.nan
        self.count = 0
        return list(self.columns), columns


def _column_array(values: np.ndarray, single: np.ndarray, kind: pa.DataType) -> pa.Array:
    """One column of a :class:`_RowBlock` (``values`` in float64, NaN where missing, and
    ``single`` the same in float32) as ``kind``: an integer column stores a null where a row
    lacks it; a float column stores NaN."""
    if pa.types.is_integer(kind):
        missing = np.isnan(values)
        return pa.array(np.where(missing, 0, values).astype(np.int64), type=kind,
                        mask=missing if missing.any() else None)
    return pa.array(single if kind == pa.float32() else values, type=kind)


class TableWriter:
    """Append-only writer of one table (per-step or per-eval rows) as Arrow IPC segments.

    A segment's columns are all the columns seen so far in this session; a row that lacks one
    stores NaN there (a null in an integer column). When a row brings a new column, the
    writer starts a new segment, so wide or late-appearing statistics never force a rewrite of
    what is on disk. A segment is compacted into batches of ``BATCH_ROWS`` when it is closed,
    and closed every ``COMPACT_ROWS`` rows.

    Rows are buffered in a :class:`_RowBlock`: :meth:`append` takes a dict, and
    :meth:`append_parts` the values of a row in parts (a tuple of column names and as many
    numbers each), which costs a few numpy assignments per row (the Monitor's per-step rows).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        existing = _segments(directory)
        self._next_index = int(existing[-1].name[:6]) + 1 if existing else 0
        self._block = _RowBlock()
        self._segment: _OpenSegment | None = None

    def append(self, row: dict[str, Any]) -> None:
        self._block.add([(tuple(row), [math.nan if v is None else v for v in row.values()])])

    def append_parts(self, parts: Sequence[tuple[tuple[str, ...], Any]]) -> None:
        """One row, given in parts: ``(column names, values)`` pairs (a sequence or an array
        of as many numbers as names)."""
        self._block.add(parts)

    def __len__(self) -> int:
        return self._block.count

    def flush(self) -> None:
        if not self._block.count:
            return
        names, columns = self._block.take()
        segment = self._current(names)
        single = columns.astype(np.float32)  # most columns: each row a contiguous column
        arrays = [_column_array(columns[j], single[j], f.type)
                  for j, f in enumerate(segment.schema)]
        self._write(segment, pa.RecordBatch.from_arrays(arrays, schema=segment.schema))

    def _current(self, names: list[str]) -> _OpenSegment:
        """The open segment, or a new one when there is none or a row brought a column
        (``names``: every column seen so far, in order)."""
        if self._segment is None or len(names) != len(self._segment.schema):
            self._close_segment()
            schema = pa.schema([(name, _column_type(name)) for name in names])
            path = self.directory / f"{self._next_index:06d}.arrows"
            self._next_index += 1
            sink = pa.OSFile(str(path), "wb")
            self._segment = _OpenSegment(path, schema, sink,
                                         ipc.new_stream(sink, schema, options=_STREAM_OPTIONS))
        return self._segment

    def _write(self, segment: _OpenSegment, batch: pa.RecordBatch) -> None:
        segment.writer.write_batch(batch)
        segment.sink.flush()
        segment.rows += batch.num_rows
        if segment.rows >= COMPACT_ROWS:  # the next rows open a new segment
            self._close_segment()

    def write_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Write many rows at once, given column by column (for tools that convert or
        synthesise runs; the trainer writes row by row). Buffered rows are written first."""
        self.flush()
        self._block.positions(tuple(columns))
        segment = self._current(list(self._block.columns))
        n = len(next(iter(columns.values())))
        arrays = [pa.array(np.asarray(columns[f.name], dtype=f.type.to_pandas_dtype()),
                           type=f.type) if f.name in columns else pa.nulls(n, f.type)
                  for f in segment.schema]
        self._write(segment, pa.RecordBatch.from_arrays(arrays, schema=segment.schema))

    def _close_segment(self) -> None:
        if self._segment is not None:
            self._segment.writer.close()
            self._segment.sink.close()
            compact_segment(self._segment.path)
        self._segment = None

    def close(self) -> None:
        self.flush()
        self._close_segment()


def read_table(directory: Path) -> tuple[pd.DataFrame, list[str]]:
    """Read every segment of a table into one DataFrame sorted by step; and problems found.

    Two passes, so that a million rows never sit in memory twice: the first reads each
    segment's schema and its step column alone (which gives its row count), the second fills
    preallocated columns one segment at a time. A column some segment lacks reads as NaN
    there (an integer column then becomes float).
    """
    segments = _segments(directory)
    sizes, schemas, problems = _survey(directory, segments)
    total = sum(sizes)
    if not total:
        return pd.DataFrame({"step": pd.Series(dtype="int64")}), problems
    present = [schema for schema, size in zip(schemas, sizes, strict=True) if size and schema]
    columns = _allocate(present, total)
    at = 0
    for path, size in zip(segments, sizes, strict=True):
        if size:
            _fill(columns, path, at, size)
            at += size
    frame = pd.DataFrame(columns, copy=False)
    if not frame["step"].is_monotonic_increasing:
        frame = frame.sort_values("step", kind="stable", ignore_index=True)
    return frame, problems


def _survey(directory: Path, segments: list[Path]
            ) -> tuple[list[int], list[pa.Schema | None], list[str]]:
    """The first pass: each segment's row count (from its step column alone) and schema, and
    the segments that end in an incomplete write."""
    problems: list[str] = []
    sizes: list[int] = []
    schemas: list[pa.Schema | None] = []
    for i, path in enumerate(segments):
        table, complete = _read_segment(path, fields=["step"])
        if not complete:
            what = "last" if i == len(segments) - 1 else "a"
            problems.append(f"{directory.name}/{path.name}: {what} segment ends in an incomplete "
                            f"write; its complete rows were read")
        schemas.append(_schema_of(path))
        sizes.append(0 if table is None else table.num_rows)
    return sizes, schemas, problems


def _allocate(schemas: list[pa.Schema], total: int) -> dict[str, np.ndarray]:
    """Every column of the table, preallocated: int64 where every segment has it as an
    integer, else float32 or float64 filled with NaN."""
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            types.setdefault(f.name, f.type)
    columns: dict[str, np.ndarray] = {}
    for name, kind in types.items():
        if pa.types.is_integer(kind) and all(name in schema.names for schema in schemas):
            columns[name] = np.zeros(total, dtype=np.int64)
        else:
            dtype = np.float32 if kind == pa.float32() else np.float64
            columns[name] = np.full(total, np.nan, dtype=dtype)
    return columns


def _fill(columns: dict[str, np.ndarray], path: Path, at: int, size: int) -> None:
    """The second pass, for one segment: its first ``size`` rows into ``columns`` at ``at``."""
    table, _ = _read_segment(path)
    if table is None:
        return
    rows = min(size, table.num_rows)
    for name in table.column_names:
        values = table.column(name).slice(0, rows)
        if values.null_count:
            values = values.cast(pa.float64())
            if columns[name].dtype == np.int64:  # an integer column with missing values
                columns[name] = columns[name].astype(np.float64)
        columns[name][at:at + rows] = values.to_numpy()


def _schema_of(path: Path) -> pa.Schema | None:
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError, EOFError):
        return None


def truncate_table(directory: Path, keep: Any) -> int:
    """Drop rows for which ``keep(step_array)`` is False; returns how many were dropped.

    Each affected segment is rewritten atomically; empty ones are removed.
    """
    dropped = 0
    for path in _segments(directory):
        table, complete = _read_segment(path)
        if table is None:
            path.unlink()
            continue
        mask = keep(table.column("step").to_numpy())
        if mask.all() and complete:
            continue
        dropped += int((~mask).sum())
        kept = table.filter(pa.array(mask))
        if kept.num_rows == 0:
            path.unlink()
            continue
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, kept.schema, options=_IPC_OPTIONS) as writer:
            writer.write_table(kept.combine_chunks(), max_chunksize=BATCH_ROWS)  # as compacted
        atomic_write(path, sink.getvalue().to_pybytes())
    return dropped
