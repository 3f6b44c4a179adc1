"""Wait for W&B to finish writing a run file (`run-<id>.wandb`), read without a W&B server.

    wait_for_exit_record(run_file, timeout_s=30)   # True once the run's exit record is on disk

`MetricLogger.finish` (metrics.py) and the analysis's W&B summary run (analysis/wandb_summary.py) call it:
W&B's `run.finish()` can return before wandb-core has flushed the `.wandb` file (its writer is buffered and
closed asynchronously), so a just-finished run is complete on disk only once its exit record is there.
The record decoding here (`read_records`, from the chunks of the log) is what tests/wandb_reader.py builds
on to read a run's config, history and summary back.

The `.wandb` layout (wandb 0.31 ships no reader; in offline mode this file is the only complete record of a
run), checked against files written by wandb-core 0.31:

* a 7-byte file header: b":W&B", magic 0xBEE1 (little endian), version 0;
* then a LevelDB log: 32 KiB blocks (the first block includes the file header). Each chunk
  has a 7-byte header `<crc:u32 LE><length:u16 LE><type:u8>` and the payload. Type 1 is a
  whole record; 2/3/4 are the first/middle/last pieces of a record split across blocks.
  A block tail shorter than 7 bytes is zero padding. The checksum is zlib's CRC-32 (IEEE,
  not CRC-32C) of the payload, seeded with the CRC-32 of the type byte, unmasked;
* each record is a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Union

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """A `.wandb` file has a bad header or a corrupt chunk."""


def read_records(path: Union[str, Path]) -> Iterator[Any]:
    """Yield every `Record` of a `.wandb` file in order.

    A truncated tail (a process killed mid-write, or a run still being written) ends the
    iteration quietly; a bad header or checksum raises `WandbFileError`.
    """
    from wandb.proto import wandb_internal_pb2  # loads wandb (slow to import): only when a run file is read

    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_payloads(path: Union[str, Path]) -> Iterator[bytes]:
    """Yield the raw record payloads of a `.wandb` file, joining records split across blocks."""
    data = Path(path).read_bytes()
    if data[: len(FILE_HEADER)] != FILE_HEADER:
        raise WandbFileError(f"{path}: header {data[:7]!r} is not {FILE_HEADER!r} (W&B log v0)")
    pending: Optional[bytearray] = None
    for offset, kind, payload in iter_chunks(data, path):
        if kind == FULL:
            pending = None
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif pending is not None:
            pending += payload
            if kind == LAST:
                yield bytes(pending)
                pending = None


def iter_chunks(data: bytes, path: Union[str, Path] = "<bytes>") -> Iterator[tuple]:
    """Yield (offset, type, payload) of each chunk of a whole `.wandb` file's bytes.

    Stops at a truncated or zero-filled tail; raises `WandbFileError` on a bad checksum.
    """
    offset = len(FILE_HEADER)
    while True:
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_SIZE:
            offset += left_in_block
            continue
        if offset + CHUNK_HEADER_SIZE > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, offset)
        start = offset + CHUNK_HEADER_SIZE
        if kind == 0 and length == 0 or start + length > len(data):
            return
        payload = data[start : start + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or _crc(kind, payload) != crc:
            raise WandbFileError(f"{path}: corrupt chunk at byte {offset} (type {kind})")
        yield offset, kind, payload
        offset = start + length


def _crc(kind: int, payload: bytes) -> int:
    """W&B's chunk checksum: CRC-32 of the payload, continuing from the CRC-32 of the type."""
    return zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF


def has_exit_record(path: Union[str, Path]) -> bool:
    """True when the `.wandb` file already holds the run's exit record (the run finished)."""
    try:
        return any(record.HasField("exit") for record in read_records(path))
    except (OSError, WandbFileError):  # not created yet, or not even the header written
        return False


def wait_for_exit_record(path: Union[str, Path], timeout_s: float = 30.0) -> bool:
    """Wait until `path` holds its exit record; False if `timeout_s` passes first.

    wandb 0.31's `run.finish()` can return before wandb-core has flushed the `.wandb` file
    (its writer is buffered and closed asynchronously), so read a just-finished run after this.
    """
    deadline = time.monotonic() + timeout_s
    while not has_exit_record(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
