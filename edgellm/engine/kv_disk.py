"""The disk tier of the KV store (kv_store.py): one file per saved block, shared by processes and runs.

A file is `<key hex>.kvb`: the magic line, a JSON header, then the block's bytes. The header names
the format version, the model identity, the dtype, the layout (the block tensor's shape), the token
count, the key and a CRC-32 of the payload. A file whose header or checksum does not match what
this engine expects (truncated, corrupted, written for another model or dtype) is never loaded: it
counts as a miss and is deleted, so the block is written afresh.

Writes go to a temporary file in the same directory, then `os.replace` onto the final name: a
reader sees the old file or the new one, never part of one, whatever other processes do at the
same time. Writing happens on a background thread (`flush()` waits for it). Any OSError (directory
unwritable, disk full) turns the tier off with one warning; the requests go on without it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

MAGIC = b"EDGELLM-KV\n"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 16
_ALIGN = 64  # the payload starts at a multiple of this (the header line is padded), so it can be viewed in place


def block_bytes(block: torch.Tensor) -> bytes:
    """The raw bytes of a CPU block (any dtype, bfloat16 included)."""
    return block.contiguous().view(torch.uint8).numpy().tobytes()


class DiskTier:
    def __init__(self, directory: str | Path, identity: dict):
        """identity: model, dtype and layout (the block shape), as every file must carry them."""
        self.directory = Path(directory)
        self.identity = dict(identity)
        self.dtype = getattr(torch, identity["dtype"].removeprefix("torch."))
        self.enabled = True
        self.rejected = 0  # files found and refused (bad header, checksum, identity)
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict = {}  # key -> (block, ready) queued and not yet on disk: has() and read() see them
        self._writer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(f"{self.directory} is not writable")
        except OSError as exc:
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        if self.enabled:
            warnings.warn(f"edgellm KV store: disk tier {self.directory} turned off ({exc})", RuntimeWarning,
                          stacklevel=3)
        self.enabled = False

    def path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}.kvb"

    def has(self, key: bytes) -> bool:
        return self.enabled and (key in self._pending or self.path(key).is_file())

    def read(self, key: bytes) -> torch.Tensor | None:
        """The block saved under `key` as a CPU tensor, or None (absent or refused); one still waiting for
        the writer comes from memory (a prompt right behind the one that saved it finds its blocks)."""
        if not self.enabled:
            return None
        pending = self._pending.get(key)
        if pending is not None:
            block, ready = pending
            if ready is not None:
                ready.synchronize()
            return block
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                # Read straight into the buffer the block will live in: no copy after the read.
                data = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8, )
                f.readinto(memoryview(data.numpy()))
        except OSError:
            return None
        block = self._decode(data, key)
        if block is None:
            self.rejected += 1
            try:
                path.unlink()
            except OSError:
                pass
        return block

    def read_prefix(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The blocks of the longest run of `keys` saved here, from the first: the files that exist
        are read and checked on a thread pool (reading and CRC-32 release the GIL), as one block
        after another would leave the disk and the cores mostly idle."""
        present = []
        for key in keys:
            if not self.has(key):
                break
            present.append(key)
        if len(present) <= 1:
            blocks = [self.read(k) for k in present]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                thread_name_prefix="edgellm-kv-read")
            blocks = list(self._pool.map(self.read, present))
        run = []
        for block in blocks:
            if block is None:
                break
            run.append(block)
        return run

    def _decode(self, data: torch.Tensor, key: bytes) -> torch.Tensor | None:
        """The block in a file's bytes (a uint8 tensor), a view of them, or None if anything is off."""
        raw = memoryview(data.numpy())
        if bytes(raw[:len(MAGIC)]) != MAGIC:
            return None
        end = bytes(raw[len(MAGIC):len(MAGIC) + _MAX_HEADER]).find(b"\n")
        if end < 0:
            return None
        end += len(MAGIC)
        try:
            header = json.loads(bytes(raw[len(MAGIC):end]))
        except ValueError:
            return None
        expected = {**self.identity, "format_version": FORMAT_VERSION, "key": key.hex()}
        if not isinstance(header, dict) or any(header.get(k) != v for k, v in expected.items()):
            return None
        start = end + 1
        shape = self.identity["layout"]
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=self.dtype).element_size()
        if len(raw) - start != nbytes or header.get("checksum") != zlib.crc32(raw[start:]):
            return None
        payload = data[start:]
        if start % _ALIGN:  # (files this version writes put the payload at an aligned offset)
            payload = payload.clone()
        return payload.view(self.dtype).reshape(shape)

    def write(self, key: bytes, block: torch.Tensor, ready=None) -> None:
        """Saves a CPU block under `key` in the background. ready: an event (e.g. torch.cuda.Event)
        to wait on before reading the block, when it is still being copied in."""
        if not self.enabled:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="edgellm-kv-disk", daemon=True)
            self._writer.start()
        self._pending[key] = (block, ready)
        self._queue.put((key, block, ready))

    def _write_loop(self) -> None:
        while True:
            key, block, ready = self._queue.get()
            try:
                if self.enabled:
                    if ready is not None:
                        ready.synchronize()
                    self._write_now(key, block)
            except OSError as exc:
                self._disable(exc)
            finally:
                self._pending.pop(key, None)
                self._queue.task_done()

    def _write_now(self, key: bytes, block: torch.Tensor) -> None:
        payload = block_bytes(block)
        header = {**self.identity, "format_version": FORMAT_VERSION, "key": key.hex(),
                  "tokens": self.identity["layout"][3], "checksum": zlib.crc32(payload)}
        final = self.path(key)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            head = MAGIC + json.dumps(header, sort_keys=True).encode()
            head += b" " * (-(len(head) + 1) % _ALIGN) + b"\n"
            with open(temporary, "wb") as f:
                f.write(head)
                f.write(payload)
            os.replace(temporary, final)
        except OSError:
            try:
                temporary.unlink()
            except OSError:
                pass
            raise

    def flush(self) -> None:
        """Wait until every queued block is on disk (or the tier has turned itself off)."""
        if self._writer is not None:
            self._queue.join()
