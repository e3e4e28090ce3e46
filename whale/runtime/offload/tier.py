"""The slower tier of ``Config(offload=...)``: one block per layer, holding that layer's tensors.

On a CPU device the block is a memory-mapped file (``MAP_SHARED``, made in ``offload_dir`` and
unlinked at once, so nothing is left on disk whatever happens to the process): its tensors are
views of the mapping and are updated in place. *Fetching* maps the block's pages in (a read of
one byte per page, in a background thread, ahead of use); *writing back* is
``madvise(MADV_DONTNEED)``: the kernel keeps the data in the file (the page cache writes it out)
and the pages leave the process's resident set, which is what the offload saves.

On a CUDA device the block is pinned CPU memory; fetching copies it to the device on a copy
stream and writing back copies it home, after which the device copy is freed.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Sequence

import torch

__all__ = ["TierBlock", "check_offload_dir", "resident_bytes", "resident_of"]

_ALIGN = 64  # every view starts at a multiple of this (any dtype's size divides it)
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11 lacks the name
_POPULATE = True  # cleared where the kernel refuses it


def check_offload_dir(path: str | os.PathLike | None) -> str:
    """The directory offload files go to (None: the system's temporary directory), checked by
    making and removing a file in it; a clear ValueError naming the path and the fix otherwise."""
    directory = tempfile.gettempdir() if path is None else os.fspath(path)
    fix = "pass Config(offload_dir=...) a directory this process can write (on a local disk), or offload='none'"
    if not os.path.isdir(directory):
        raise ValueError(f"Config(offload_dir={directory!r}) is not a directory; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix="whale-offload-probe-", dir=directory)
    except OSError as err:
        raise ValueError(f"Config(offload_dir={directory!r}) cannot be written ({err.strerror}); {fix}") from None
    os.close(fd)
    os.unlink(probe)
    return directory


class TierBlock:
    """One layer's tensors in the tier: ``views[i]`` holds a copy of ``tensors[i]``.

    CPU: the views are the tensors' home (a file-backed mapping); CUDA: pinned host copies.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], directory: str, pinned: bool) -> None:
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = total
        self._map: mmap.mmap | None = None
        if pinned:
            buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
        else:
            size = max(-(-total // _PAGE) * _PAGE, _PAGE)
            fd, path = tempfile.mkstemp(prefix="whale-offload-", dir=directory)
            try:
                os.unlink(path)  # the mapping keeps the data; no name is left behind
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self._buffer = buffer
        self.views = []
        for t, at in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            view = buffer[at : at + n].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
            self.views.append(view)

    def prefetch(self) -> None:
        """Map the block's pages in, writable (CPU): ``MADV_POPULATE_WRITE`` (Linux 5.14+), else
        one byte read per page (the update then takes a second, lighter fault per page)."""
        global _POPULATE
        if self._map is None or not self.nbytes:
            return
        if _POPULATE:
            try:
                self._map.madvise(_MADV_POPULATE_WRITE)
                return
            except (OSError, ValueError):
                _POPULATE = False
        self._buffer[: self.nbytes : _PAGE].sum()

    def release(self) -> None:
        """Drop the block's pages from this process's resident memory (CPU; data stays in the file)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def resident(self) -> int:
        """Bytes of the block resident in this process (CPU: the mapping's ``Rss`` in
        ``/proc/self/smaps``; a pinned block is always resident)."""
        return resident_of([self])[0]

    def close(self) -> None:
        """Unmap (once no tensor views it: a view still held keeps the mapping alive)."""
        self.views = []
        self._buffer = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still referenced somewhere; the mapping goes with it
            self._map = None


def resident_of(blocks: Sequence[TierBlock]) -> list[int]:
    """Each block's resident bytes: the pages of its mapping present in this process's page
    table (``/proc/self/pagemap``, 8 bytes per page read for the block's pages only; the
    mapping's ``Rss`` in ``/proc/self/smaps`` where pagemap cannot be read, a walk of every
    mapping of the process, hundreds of them under torch). A pinned block is always resident."""
    out = [0 if b._map is not None else b.nbytes for b in blocks]
    mapped = [(i, b._buffer.data_ptr(), len(b._map)) for i, b in enumerate(blocks) if b._map is not None]
    if not mapped:
        return out
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            for i, start, length in mapped:
                f.seek(start // _PAGE * 8)
                entries = memoryview(f.read(length // _PAGE * 8)).cast("Q")
                out[i] = sum(e >> 63 for e in entries) * _PAGE  # bit 63: the page is present
        return out
    except OSError:
        pass
    starts = {f"{start:x}-": i for i, start, _ in mapped}
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if found is None:
                found = starts.get(line[: line.find("-") + 1]) if "-" in line[:20] else None
            elif line.startswith("Rss:"):
                out[found] = int(line.split()[1]) * 1024
                found = None
    return out


def resident_bytes() -> dict[str, int]:
    """This process's resident memory from ``/proc/self/status`` (Linux): ``rss``, ``anon``,
    ``file`` bytes (empty where there is no such file)."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[keys[name]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
