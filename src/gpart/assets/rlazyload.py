"""Read one object from an R package's lazy-load database (data/Rdata.rdx + Rdata.rdb) without R.

R stores each object of a package's data/ as a separately compressed, serialised chunk in Rdata.rdb;
Rdata.rdx is the index (object name -> offset, length). The `rdata` package parses the serialised form.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from pathlib import Path


def read_lazyload(data_dir: Path, name: str):
    """The R object `name` converted to Python (a data.frame becomes a pandas DataFrame)."""
    import rdata

    index = _unserialize(rdata, _decompress((data_dir / "Rdata.rdx").read_bytes()))
    offset, length = (int(x) for x in index["variables"][name])
    with open(data_dir / "Rdata.rdb", "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(length)
    return _unserialize(rdata, _decompress(chunk))


def _unserialize(rdata, raw: bytes):
    return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"), default_encoding="utf8")


def _decompress(buf: bytes) -> bytes:
    """Undo R's compression: the index is gzip; a chunk is a 4-byte big-endian length, then a type byte
    (Z = xz as a raw LZMA2 stream, 2 = bzip2, 0 = none) or, with no type byte, zlib."""
    if buf[:2] == b"\x1f\x8b":
        return gzip.decompress(buf)
    kind, body = buf[4:5], buf[5:]
    if kind == b"Z":
        return lzma.decompress(body, format=lzma.FORMAT_RAW,
                               filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    if kind == b"2":
        return bz2.decompress(body)
    if kind == b"0":
        return body
    return zlib.decompress(buf[4:])
