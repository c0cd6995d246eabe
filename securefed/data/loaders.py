"""Read CSV, TSV, JSONL and JSON (one array of objects) files into columns.

A table is a dict from field name to a list of values, one per row. Errors name the
file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

Table = dict[str, list[Any]]
Format = Literal["csv", "tsv", "jsonl", "json"]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def infer_format(path: Path) -> Format:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv", "jsonl", "json"):
        return suffix  # type: ignore[return-value]
    raise DataError(f"{path}: cannot tell the format from the extension; set data.format to csv, tsv, jsonl or json")


def load_table(
    path: Path, fmt: Format | None = None, *, header: bool = True, columns: list[str] | None = None
) -> Table:
    """Load a whole file as columns. Headerless CSV/TSV files take their names from `columns`."""
    fmt = fmt or infer_format(path)
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            if fmt == "jsonl":
                return _read_jsonl(fh, path)
            if fmt == "json":
                return _read_json_array(fh, path)
            return _read_delimited(fh, path, "\t" if fmt == "tsv" else ",", header, columns)
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None


def write_table(table: Table, rows: Sequence[int], path: Path, fmt: Format, *, header: bool = True) -> None:
    """Write the given rows of a table in a format `load_table` reads back as they were."""
    names = list(table)
    with path.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "json":
            json.dump([{name: table[name][row] for name in names} for row in rows], fh, ensure_ascii=False, indent=1)
            return
        if fmt == "jsonl":
            for row in rows:
                fh.write(json.dumps({name: table[name][row] for name in names}, ensure_ascii=False) + "\n")
            return
        # TSV as it is read: no quoting, so a quote character is plain text, and a tab or newline cannot be written
        tsv = fmt == "tsv"
        writer = csv.writer(fh, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                            quotechar=None if tsv else '"', lineterminator="\n")
        if header:
            writer.writerow(names)
        for row in rows:
            try:
                writer.writerow([table[name][row] for name in names])
            except csv.Error:
                raise DataError(f"{path}: row {row + 1} holds a tab or a line break, which TSV cannot carry") from None


def _read_delimited(fh, path: Path, delimiter: str, header: bool, columns: list[str] | None) -> Table:
    # QUOTE_NONE for TSV: SST-2 and AG News contain bare quote characters inside fields.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
    try:
        names = next(reader) if header else columns
    except StopIteration:
        raise DataError(f"{path}: file is empty") from None
    if not names:
        raise DataError(f"{path}: no header row and no data.columns to name the fields")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names {names}")
    table: Table = {name: [] for name in names}
    for row in reader:
        if not row:
            continue
        if len(row) != len(names):
            raise DataError(f"{path}:{reader.line_num}: expected {len(names)} fields, found {len(row)}")
        for name, value in zip(names, row):
            table[name].append(value)
    return table


def _read_jsonl(fh, path: Path) -> Table:
    records = []
    for lineno, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
    return _columns(records, "line")


def _read_json_array(fh, path: Path) -> Table:
    try:
        records = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected one JSON array of objects")
    return _columns([(f"{path}: record {i + 1}", record) for i, record in enumerate(records)], "record")


def _columns(records: list[tuple[str, Any]], unit: str) -> Table:
    """Columns from (where, record) pairs; every record an object with the first one's fields."""
    table: Table = {}
    for rows, (where, record) in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object per {unit}")
        if rows == 0:
            table = {key: [] for key in record}
        if record.keys() != table.keys():
            raise DataError(f"{where}: fields {sorted(record)} differ from the first {unit}'s {sorted(table)}")
        for key, value in record.items():
            table[key].append(value)
    return table


def column(table: Table, name: str, path: Path, setting: str) -> list[Any]:
    """A column by name, with an error that says which setting asked for it."""
    if name not in table:
        raise DataError(f"{path}: no field {name!r} ({setting}); fields are {', '.join(table) or 'none'}")
    return table[name]
