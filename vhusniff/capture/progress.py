"""A progress bar on stderr while a capture is read: bytes of the file read so far, out of its size.

The bar is drawn (by tqdm) only when stderr is a terminal and the command was not asked to be quiet: piped,
redirected or in CI nothing at all is written, and the capture is opened and read exactly as without it. It counts
the bytes the file is read in (one update per buffer of 64 KiB, or per chunk of the fast reader), never per record,
and tqdm redraws at most ten times a second. A pipe or a device has no size: the bar is then a counter. The bar is
wiped from the line when reading ends, by its end, an error, a reader that left (broken pipe) or Ctrl-C.

    with capture_progress(path, enabled=not args.quiet) as progress:
        for record in read_capture(progress.source()): ...
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO

from tqdm import tqdm

_BUFFER = 1 << 16


class _Bar(tqdm):
    monitor_interval = 0        # no monitor thread: the bar is updated often enough by the reads themselves


class _CountingFile(io.FileIO):
    """A file that tells the bar how many bytes each read brought."""

    bar: tqdm

    def readinto(self, buffer) -> int | None:
        count = super().readinto(buffer)
        if count:
            self.bar.update(count)
        return count


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):      # replaced by an object without isatty, or closed
        return False


class CaptureProgress:
    """Where a capture is read from: its path when no bar is drawn, else a stream that moves the bar."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.bar: tqdm | None = None
        self._streams: list[BinaryIO] = []

    def source(self) -> str | BinaryIO:
        """What read_capture (or the fast scanner) reads; each call starts the file (and the bar) over."""
        if not self.enabled:
            return self.path
        raw = _CountingFile(self.path, "rb")        # a file that cannot be opened raises before any bar is drawn
        stream = io.BufferedReader(raw, _BUFFER)
        self._streams.append(stream)
        if self.bar is None:
            self.bar = _Bar(total=_size(raw), unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                            file=sys.stderr, desc=os.path.basename(self.path) or self.path, dynamic_ncols=True)
        else:
            self.bar.reset(total=_size(raw))
        raw.bar = self.bar
        return stream

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        if self.bar is not None:
            try:
                self.bar.close()      # leave=False: the line is wiped
            except (OSError, ValueError):
                pass                  # stderr itself went away: nothing left to wipe
            self.bar = None


def _size(raw: io.FileIO) -> int | None:
    status = os.fstat(raw.fileno())
    return status.st_size if stat.S_ISREG(status.st_mode) else None


@contextlib.contextmanager
def capture_progress(path: str | os.PathLike, enabled: bool = True) -> Iterator[CaptureProgress]:
    """A bar for reading `path`, drawn only if `enabled` and stderr is a terminal; closed (wiped) on leaving."""
    progress = CaptureProgress(os.fspath(path), enabled and stderr_is_terminal())
    try:
        yield progress
    finally:
        progress.close()
