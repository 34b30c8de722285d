"""Parquet files joined by their row groups, without decoding or re-encoding a value.

A Parquet file is `PAR1`, the column chunks of its row groups, a footer (a Thrift
FileMetaData in the compact protocol), the footer's length and `PAR1`. The footer
locates every column chunk by absolute file offset. Files written with the same schema
and settings are joined by copying their bodies one after another and writing one
footer: the first file's, with `num_rows` summed and the row-group list replaced by all
files' row groups, their offsets moved by where their body landed.

The layout of a footer (where its numbers sit, `parquet_layout`) is found once, when a
file is written, so joining (`stitch_parquet`) only copies bytes and writes a few
hundred varints. Page indexes and bloom filters (written into the body, with offsets of
their own) are not supported: write the files without them, as
`posttrade.core.reports.blotter_parquet` does.

Used by ptrc's reports (`posttrade.agents.reports`): the trade blotter's Parquet file is
the day's spooled chunks joined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_T_BOOL_TRUE, _T_BOOL_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64, _T_DOUBLE = 1, 2, 3, 4, 5, 6, 7
_T_BINARY, _T_LIST, _T_SET, _T_MAP, _T_STRUCT = 8, 9, 10, 11, 12
_SHIFT, _ORDINAL = 0, 1  # what a slot holds: a file offset, or a row group's ordinal


class _Thrift:
    """A reader of Thrift's compact protocol that knows where each value sits."""

    def __init__(self, buf: bytes | memoryview, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.buf[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self):
        """(field id, type) of a struct's fields, until its stop byte."""
        last = 0
        while True:
            header = self.buf[self.pos]
            self.pos += 1
            if header == 0:
                return
            kind, delta = header & 0x0F, header >> 4
            last = last + delta if delta else self.zigzag()
            yield last, kind

    def list_header(self) -> tuple[int, int]:
        header = self.buf[self.pos]
        self.pos += 1
        size = header >> 4
        return (self.varint() if size == 15 else size), header & 0x0F

    def skip(self, kind: int) -> None:
        if kind in (_T_BOOL_TRUE, _T_BOOL_FALSE):
            return  # a struct field's bool is its type
        if kind == _T_BYTE:
            self.pos += 1
        elif kind in (_T_I16, _T_I32, _T_I64):
            self.varint()
        elif kind == _T_DOUBLE:
            self.pos += 8
        elif kind == _T_BINARY:
            length = self.varint()  # read before `pos` is: the varint moves it
            self.pos += length
        elif kind in (_T_LIST, _T_SET):
            size, element = self.list_header()
            for _ in range(size):
                if element in (_T_BOOL_TRUE, _T_BOOL_FALSE):
                    self.pos += 1  # a list's bools are a byte each
                else:
                    self.skip(element)
        elif kind == _T_MAP:
            size = self.varint()
            if size:
                types = self.buf[self.pos]
                self.pos += 1
                for _ in range(size):
                    for element in (types >> 4, types & 0x0F):
                        if element in (_T_BOOL_TRUE, _T_BOOL_FALSE):
                            self.pos += 1
                        else:
                            self.skip(element)
        elif kind == _T_STRUCT:
            for _, field_kind in self.fields():
                self.skip(field_kind)
        else:
            raise ValueError(f"not a Parquet footer (Thrift type {kind})")

    def slot(self, what: int) -> tuple[int, int, int, int]:
        start = self.pos
        value = self.zigzag()
        return (start, self.pos, what, value)


@dataclass(frozen=True)
class ParquetLayout:
    """Where a Parquet file's footer keeps the numbers a join changes (offsets in the footer)."""

    footer_start: int  # in the file
    footer_end: int
    num_rows: int
    num_rows_span: tuple[int, int]
    row_groups_span: tuple[int, int]  # the list, header included
    # per row group: (start, end, slots); a slot is (start, end, _SHIFT|_ORDINAL, value)
    row_groups: tuple[tuple[int, int, tuple[tuple[int, int, int, int], ...]], ...]

    def to_json(self) -> list:
        return [self.footer_start, self.footer_end, self.num_rows, list(self.num_rows_span),
                list(self.row_groups_span), [[s, e, [list(slot) for slot in slots]] for s, e, slots in self.row_groups]]

    @classmethod
    def from_json(cls, data: Sequence) -> ParquetLayout:
        footer_start, footer_end, num_rows, rows_span, groups_span, groups = data
        return cls(footer_start, footer_end, num_rows, tuple(rows_span), tuple(groups_span),
                   tuple((s, e, tuple(tuple(slot) for slot in slots)) for s, e, slots in groups))


def parquet_layout(data: bytes | memoryview) -> ParquetLayout:
    """Find the numbers a join changes in a Parquet file's footer."""
    view = memoryview(data)
    if len(view) < 12 or view[:4] != b"PAR1" or view[-4:] != b"PAR1":
        raise ValueError("not a Parquet file")
    footer_end = len(view) - 8
    footer_start = footer_end - int.from_bytes(view[-8:-4], "little")
    footer = view[footer_start:footer_end]
    reader = _Thrift(footer)
    num_rows, rows_span, groups_span, groups = None, None, None, []
    for field, kind in reader.fields():  # FileMetaData
        if field == 3 and kind == _T_I64:
            start, end, _, num_rows = reader.slot(_SHIFT)
            rows_span = (start, end)
        elif field == 4 and kind == _T_LIST:
            list_start = reader.pos
            size, _ = reader.list_header()
            for _ in range(size):
                groups.append(_row_group_layout(reader))
            groups_span = (list_start, reader.pos)
        else:
            reader.skip(kind)
    if num_rows is None or groups_span is None or rows_span[0] > groups_span[0]:
        raise ValueError("a Parquet footer without num_rows before row_groups")
    return ParquetLayout(footer_start, footer_end, num_rows, rows_span, groups_span, tuple(groups))


def _row_group_layout(reader: _Thrift) -> tuple[int, int, tuple]:
    start = reader.pos
    slots = []
    for field, kind in reader.fields():  # RowGroup
        if field == 1 and kind == _T_LIST:  # columns
            size, _ = reader.list_header()
            for _ in range(size):
                for cc_field, cc_kind in reader.fields():  # ColumnChunk
                    if cc_field == 2 and cc_kind == _T_I64:  # file_offset
                        slots.append(reader.slot(_SHIFT))
                    elif cc_field == 3 and cc_kind == _T_STRUCT:  # ColumnMetaData
                        for md_field, md_kind in reader.fields():
                            # data_page_offset, index_page_offset, dictionary_page_offset, bloom_filter_offset
                            if md_field in (9, 10, 11, 14) and md_kind == _T_I64:
                                if md_field == 14:
                                    raise ValueError("Parquet bloom filters cannot be joined")
                                slots.append(reader.slot(_SHIFT))
                            else:
                                reader.skip(md_kind)
                    elif cc_field in (4, 6):  # offset_index_offset, column_index_offset
                        raise ValueError("Parquet page indexes cannot be joined")
                    else:
                        reader.skip(cc_kind)
        elif field == 5 and kind == _T_I64:  # file_offset
            slots.append(reader.slot(_SHIFT))
        elif field == 7 and kind == _T_I16:  # ordinal
            slots.append(reader.slot(_ORDINAL))
        else:
            reader.skip(kind)
    return (start, reader.pos, tuple(slots))


def stitch_parquet(parts: Sequence[tuple[bytes | memoryview, ParquetLayout]]) -> list[bytes | memoryview]:
    """One Parquet file, as buffers to write in order, holding the row groups of `parts`:
    Parquet files of one schema written with the same settings."""
    if not parts:
        raise ValueError("nothing to join")
    out: list[bytes | memoryview] = [b"PAR1"]
    position = 4
    groups: list[bytes | memoryview] = []
    group_count = 0
    rows = 0
    for data, layout in parts:
        view = memoryview(data)
        footer = view[layout.footer_start:layout.footer_end]
        shift = position - 4  # the body moves from offset 4 to `position`
        for start, end, slots in layout.row_groups:
            at = start
            for slot_start, slot_end, what, value in slots:
                groups.append(footer[at:slot_start])
                groups.append(_varint(value + shift if what == _SHIFT else group_count))
                at = slot_end
            groups.append(footer[at:end])
            group_count += 1
        rows += layout.num_rows
        body = view[4:layout.footer_start]
        out.append(body)
        position += len(body)
    if group_count > 32767:
        raise ValueError(f"{group_count} row groups: more than a Parquet footer can number")
    first, base = parts[0]
    footer = memoryview(first)[base.footer_start:base.footer_end]
    list_header = bytes([group_count << 4 | _T_STRUCT]) if group_count < 15 else bytes([0xF0 | _T_STRUCT]) + _uvarint(group_count)
    merged = [
        footer[:base.num_rows_span[0]], _varint(rows), footer[base.num_rows_span[1]:base.row_groups_span[0]],
        list_header, *groups, footer[base.row_groups_span[1]:],
    ]
    footer_size = sum(len(piece) for piece in merged)
    return out + merged + [footer_size.to_bytes(4, "little"), b"PAR1"]


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint(n: int) -> bytes:
    """A Thrift compact integer: zigzag, then a varint."""
    return _uvarint((n << 1) ^ (n >> 63))
