"""Logging for the node: one format, to stderr and to a file in the data dir.

py-libp2p logs a WARNING on ordinary stream closes and whole tracebacks for failed dials, and its
'libp2p' logger may print bare lines; we route it through our handlers and raise its level so that
the node's own lines stay readable. `--log-level debug` lets libp2p's warnings through again.
"""

from __future__ import annotations

import logging
import logging.handlers
import threading
from collections import deque
from pathlib import Path

LOG_FILE = "node.log"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Rotate at 8 MiB, keep 3: a week of a busy node's info lines without filling a small disk.
LOG_FILE_BYTES = 8 * 1024 * 1024
LOG_FILE_BACKUPS = 3

_NOISY = ("libp2p", "multiaddr", "async_service", "anyio")
# The control API's log tail and `logs` stream read the last lines from memory: 2000 lines is a few
# minutes of a busy node's info lines, a few hundred KiB.
RING_LINES = 2000


class RingBuffer(logging.Handler):
    """The last `capacity` records as plain dicts, numbered, for the control API (`logs`, `log_tail`).

    Thread-safe (records arrive from worker threads too); readers poll `since(seq)`, never block.
    """

    def __init__(self, capacity: int = RING_LINES) -> None:
        super().__init__()
        self._lines: deque[dict] = deque(maxlen=capacity)
        self._seq = 0
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        with self._mutex:
            self._seq += 1
            self._lines.append({"seq": self._seq, "time": record.created, "level": record.levelname,
                                "logger": record.name, "message": message})

    @property
    def last_seq(self) -> int:
        return self._seq

    def since(self, seq: int, limit: int = RING_LINES) -> list[dict]:
        """Lines numbered above `seq`, oldest first, at most the last `limit` of them."""
        with self._mutex:
            out = [x for x in self._lines if x["seq"] > seq]
        return out[-limit:] if limit else []


_ring: RingBuffer | None = None


def ring_buffer() -> RingBuffer:
    """The process's in-memory log ring, attached to the root logger on first use."""
    global _ring
    if _ring is None:
        _ring = RingBuffer()
        _ring.addFilter(_QuietLibraries(logging.CRITICAL))
    root = logging.getLogger()
    if _ring not in root.handlers:
        root.addHandler(_ring)
    return _ring


class _QuietLibraries(logging.Filter):
    """Drops library records below `level`. A filter on our handlers, not logger levels: some libp2p
    modules set their own logger's level at import time (auto_connector forces INFO)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in _NOISY)


def setup_logging(level: str = "info", data_dir: Path | None = None, *, stderr: bool = True) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    formatter = logging.Formatter(FORMAT, "%H:%M:%S")
    if stderr:
        h = logging.StreamHandler()
        h.setFormatter(formatter)
        root.addHandler(h)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(data_dir / LOG_FILE, maxBytes=LOG_FILE_BYTES,
                                                  backupCount=LOG_FILE_BACKUPS)
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
    root.addHandler(ring_buffer())  # the control API's log tail
    root.setLevel(getattr(logging, level.upper()))
    quiet = _QuietLibraries(logging.WARNING if level == "debug" else logging.CRITICAL)
    for h in root.handlers:
        h.addFilter(quiet)
    for name in _NOISY:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):  # libp2p may attach its own handlers; ours are enough
            lg.removeHandler(h)
        lg.propagate = True
