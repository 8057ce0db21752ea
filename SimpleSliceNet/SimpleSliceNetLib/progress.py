"""Progress reporting for long work: tqdm bars in a terminal, JSON lines for the Slicer module.

With ``--progress json`` every line the CLI prints on stdout is one JSON object:

- ``{"event": "start", "task": "detect", "total": 3}``
- ``{"event": "progress", "task": "detect", "fraction": 0.42, "message": "case1: encoding"}``
- ``{"event": "metric", "task": "train", "epoch": 3, "loss": 0.12, "val_auroc": 0.93, "elapsed_s": 51.0}``
- ``{"event": "output", "task": "detect", "input": "...", "files": {"heatmap": "...", ...}}``
- ``{"event": "error", "task": "detect", "input": "...", "message": "one line"}``
- ``{"event": "done", "task": "detect", "ok": 2, "failed": 1, "elapsed_s": 4.2}``

``fraction`` covers the whole command (0..1). Other text goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """Reports the progress of one command. ``mode`` is ``"bar"``, ``"json"`` or ``"none"``."""

    def __init__(self, task: str, mode: str = "bar", stream: TextIO | None = None) -> None:
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.task = task
        self.mode = mode
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def emit(self, event: str, **fields: Any) -> None:
        """Send one structured event (JSON mode only; bars show their own state)."""
        if self.mode == "json":
            self.stream.write(json.dumps({"event": event, "task": self.task, **fields}) + "\n")
            self.stream.flush()

    def info(self, message: str) -> None:
        """A human-readable line: stderr in bar mode, a progress event in JSON mode."""
        if self.mode == "json":
            self.emit("message", message=message)
        elif self.mode == "bar":
            self.line(message)

    def line(self, message: str) -> None:
        """``message`` on its own line of stderr, whatever the mode; above the bar while one is drawn."""
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)  # a plain print would land on the bar's line
        else:
            print(message, file=sys.stderr, flush=True)

    def iterate(self, items: Iterable[T], total: int, desc: str, start: float = 0.0, span: float = 1.0) -> Iterator[T]:
        """Iterate ``items``, reporting fractions ``start .. start+span`` of the whole command."""
        if self.mode == "bar":
            from tqdm.auto import tqdm

            yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
            return
        for index, item in enumerate(items):
            self.emit("progress", fraction=round(start + span * index / max(total, 1), 4), message=desc)
            yield item
        self.emit("progress", fraction=round(start + span, 4), message=desc)
