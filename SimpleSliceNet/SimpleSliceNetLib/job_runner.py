"""Runs the SimpleSliceNet CLI in a child process and follows its JSON progress lines.

The Slicer module never runs torch in Slicer's own process: a crash or an out-of-memory kill
in the child cannot take Slicer down, and the GUI stays responsive. Reader threads only queue
lines; callbacks run in the thread that calls :meth:`JobRunner.poll` or :meth:`JobRunner.wait`
(Slicer's main thread, driven by a ``qt.QTimer``), so they may touch widgets and MRML nodes.
This module imports neither ``qt`` nor ``slicer``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The folder that holds SimpleSliceNetLib (and, in an installed extension, SimpleSliceNetTraining).
LIB_PARENT = Path(__file__).resolve().parent.parent
STDERR_TAIL_LINES = 40


class JobError(RuntimeError):
    """A child job that failed or was cancelled; the message is meant for the user."""


@dataclass
class JobResult:
    """What a finished child process reported."""

    returncode: int | None
    cancelled: bool
    elapsed_s: float
    events: list[dict[str, Any]] = field(default_factory=list)
    stdout_text: str = ""
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "output"]

    @property
    def errors(self) -> list[str]:
        return [str(e.get("message", "")) for e in self.events if e.get("event") == "error"]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "metric"]

    def error_message(self) -> str:
        """One readable explanation of why the job did not succeed."""
        if self.cancelled:
            return "Cancelled."
        if self.errors:
            return "; ".join(self.errors)
        lines = [line for line in self.stderr_tail.splitlines() if line.strip()]
        if lines:
            # A Python traceback ends with the exception line, the most useful one.
            return lines[-1]
        if self.returncode is not None and self.returncode < 0:
            return f"The engine process was killed by signal {-self.returncode} (out of memory?)."
        return f"The engine process exited with code {self.returncode}."

    def raise_for_error(self) -> None:
        if not self.ok:
            raise JobError(self.error_message())


def running_inside_slicer() -> bool:
    slicer = sys.modules.get("slicer")
    return slicer is not None and getattr(slicer, "app", None) is not None


def default_python() -> str:
    """The interpreter for child jobs: PythonSlicer inside Slicer (same packages), else this one."""
    if running_inside_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def cli_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """The full command line that runs ``simpleslicenet <args>`` with ``python``."""
    return [python or default_python(), "-m", "SimpleSliceNetLib.cli", *[str(a) for a in args]]


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Unbuffered so progress lines arrive as they are printed, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    parts = [str(LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    if extra:
        env.update(extra)
    return env


class JobRunner:
    """One child process: start it, poll or wait for its events, cancel its whole process tree.

    ``command`` is the complete argument list (see :func:`cli_command`). Callbacks:
    ``on_progress(fraction, message)``, ``on_metric(event)``, ``on_output(event)``,
    ``on_error(message)``, ``on_message(message)`` and ``on_event(event)`` for every event.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        on_metric: Callable[[dict[str, Any]], None] | None = None,
        on_output: Callable[[dict[str, Any]], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = env if env is not None else child_environment()
        self.cwd = str(cwd) if cwd is not None else str(LIB_PARENT)
        self.on_progress = on_progress
        self.on_metric = on_metric
        self.on_output = on_output
        self.on_error = on_error
        self.on_message = on_message
        self.on_event = on_event
        self.process: subprocess.Popen | None = None
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._open_streams = 0
        self._events: list[dict[str, Any]] = []
        self._stdout_text: list[str] = []
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._cancelled = False
        self._started = 0.0
        self._finished_at: float | None = None
        self._result: JobResult | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> JobRunner:
        if self.process is not None:
            raise RuntimeError("job already started")
        popen_kwargs: dict[str, Any] = {}
        if os.name == "nt":
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            # Own session and process group: cancel can signal every descendant at once.
            popen_kwargs["start_new_session"] = True
        self._started = time.monotonic()
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **popen_kwargs,
            )
        except OSError as exc:
            raise JobError(f"Cannot start the engine ({self.command[0]}): {exc}") from exc
        self._open_streams = 2
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()
        return self

    def _read(self, name: str, stream: Any) -> None:
        try:
            for line in stream:
                self._queue.put((name, line.rstrip("\r\n")))
        finally:
            stream.close()
            self._queue.put((name, None))

    @property
    def running(self) -> bool:
        return self.process is not None and self._result is None

    @property
    def elapsed(self) -> float:
        if not self._started:
            return 0.0
        end = self._finished_at if self._finished_at is not None else time.monotonic()
        return end - self._started

    @property
    def result(self) -> JobResult | None:
        return self._result

    def poll(self) -> bool:
        """Dispatch the lines received so far; True once the process and its pipes have ended."""
        self._drain(block_s=0.0)
        return self._check_finished()

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends (dispatching callbacks meanwhile) and return its result."""
        if self.process is None:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._check_finished():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job still running after {timeout} s")
            self._drain(block_s=0.1)
        assert self._result is not None
        return self._result

    def cancel(self, grace_s: float = 3.0) -> None:
        """End the child and all its descendants: politely first, forcibly after ``grace_s``."""
        if self.process is None or self._result is not None:
            return
        self._cancelled = True
        kill_process_tree(self.process, grace_s)

    # -- internals --------------------------------------------------------------------------

    def _drain(self, block_s: float) -> None:
        try:
            item = self._queue.get(timeout=block_s) if block_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, stream: str, line: str | None) -> None:
        if line is None:
            self._open_streams -= 1
            return
        if stream == "stderr":
            self._stderr_tail.append(line)
            return
        event = parse_event(line)
        if event is None:
            self._stdout_text.append(line)
            return
        self._events.append(event)
        self._dispatch(event)

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if self.on_event:
            self.on_event(event)
        if kind == "progress" and self.on_progress:
            self.on_progress(float(event.get("fraction", 0.0)), str(event.get("message", "")))
        elif kind == "metric" and self.on_metric:
            self.on_metric(event)
        elif kind == "output" and self.on_output:
            self.on_output(event)
        elif kind == "error" and self.on_error:
            self.on_error(str(event.get("message", "")))
        elif kind == "message" and self.on_message:
            self.on_message(str(event.get("message", "")))

    def _check_finished(self) -> bool:
        if self._result is not None:
            return True
        if self.process is None or self._open_streams > 0 or self.process.poll() is None:
            return False
        self._finished_at = time.monotonic()
        self._result = JobResult(
            returncode=self.process.returncode,
            cancelled=self._cancelled,
            elapsed_s=self.elapsed,
            events=list(self._events),
            stdout_text="\n".join(self._stdout_text),
            stderr_tail="\n".join(self._stderr_tail),
        )
        return True


def parse_event(line: str) -> dict[str, Any] | None:
    """A progress event from one stdout line, or None for any other text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("event"), str):
        return value
    return None


def kill_process_tree(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate ``process`` and every process it started (it must lead its own group/session)."""
    if os.name == "nt":
        # taskkill /T walks the parent-child tree; /F because console children ignore WM_CLOSE.
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait()
        return
    group = process.pid
    if not _signal_group(group, signal.SIGTERM):
        process.wait()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reap the leader so a zombie does not keep the group alive
        if not _signal_group(group, 0):
            break
        time.sleep(0.05)
    else:
        _signal_group(group, signal.SIGKILL)
    process.wait()


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when no process of the group is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # On macOS a group of zombies answers EPERM: nothing is left to stop.
        return False
    return True
