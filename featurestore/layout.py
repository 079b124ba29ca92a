"""How the feature store lays its data out in LMDB (shared by the store and the snapshots).

Named databases, all keyed by ``<set id> NUL <rest>`` where a set is involved (NUL cannot occur
in set or clip ids, so prefixes never collide):

- ``info``      ``format`` -> FORMAT, the marker that tells our store from any other LMDB
- ``sets``      set id -> canonical JSON metadata (without the count)
- ``counts``    set id -> number of vectors, uint64 little-endian, updated in the same txn
- ``vectors``   set id NUL clip id -> raw little-endian vector bytes
- ``sha256``    set id NUL content sha256 (hex) -> clip id (dedupe index)
- ``clip_sha``  set id NUL clip id -> content sha256 (reverse, keeps the index exact on overwrite)
- ``clip_info`` set id NUL clip id -> canonical JSON facts about how the vector was made (e.g. the
  teacher's ``frames_used``); optional: stores written before it existed open without it
"""

from __future__ import annotations

import struct

FORMAT = b"lastkd-featurestore/1"
FORMAT_KEY = b"format"

DB_INFO = b"info"
DB_SETS = b"sets"
DB_COUNTS = b"counts"
DB_VECTORS = b"vectors"
DB_SHA = b"sha256"
DB_CLIP_SHA = b"clip_sha"
DB_CLIP_INFO = b"clip_info"
ALL_DBS = (DB_INFO, DB_SETS, DB_COUNTS, DB_VECTORS, DB_SHA, DB_CLIP_SHA, DB_CLIP_INFO)
OPTIONAL_DBS = (DB_CLIP_INFO,)  # added after format 1 shipped: a read-only open tolerates its absence

MAX_DBS = 8
MAX_READERS = 1024
SEP = b"\x00"
DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"

_COUNT = struct.Struct("<Q")


def prefix(set_key: bytes) -> bytes:
    """Key prefix of every entry of one set."""
    return set_key + SEP


def pack_count(count: int) -> bytes:
    """Encode a vector count."""
    return _COUNT.pack(count)


def unpack_count(raw: bytes | memoryview | None) -> int:
    """Decode a vector count (a missing record counts zero)."""
    return 0 if raw is None else _COUNT.unpack(bytes(raw))[0]
