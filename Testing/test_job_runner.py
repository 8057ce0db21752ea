"""The child-process runner: event parsing, callbacks, errors, and cancel ending the whole tree."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from SimpleSliceNetLib import job_runner
from SimpleSliceNetLib.job_runner import JobError, JobRunner, child_environment, cli_command, parse_event


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_parse_event_accepts_only_event_objects():
    assert parse_event('{"event": "progress", "fraction": 0.5}') == {"event": "progress", "fraction": 0.5}
    assert parse_event('  {"event": "done"}  ') == {"event": "done"}
    assert parse_event("plain text") is None
    assert parse_event("{not json") is None
    assert parse_event('{"no_event": 1}') is None
    assert parse_event("[1, 2]") is None


def test_events_are_dispatched_to_callbacks(tmp_path):
    command = _script(
        tmp_path,
        """
        import json, sys
        def emit(**e): print(json.dumps(e), flush=True)
        emit(event="start", task="detect", total=1)
        print("some stray text")
        emit(event="progress", task="detect", fraction=0.25, message="encoding")
        emit(event="message", task="detect", message="using cpu")
        emit(event="metric", task="train", epoch=1, loss=0.5)
        emit(event="output", task="detect", input="a.nii.gz", files={"heatmap": "h.nii.gz"})
        emit(event="done", task="detect", ok=1, failed=0)
        print("warning on stderr", file=sys.stderr)
        """,
    )
    seen: dict[str, list] = {"progress": [], "metric": [], "output": [], "message": [], "all": []}
    runner = JobRunner(
        command,
        on_progress=lambda f, m: seen["progress"].append((f, m)),
        on_metric=seen["metric"].append,
        on_output=seen["output"].append,
        on_message=seen["message"].append,
        on_event=seen["all"].append,
    )
    result = runner.start().wait(timeout=30)
    assert result.ok and result.returncode == 0
    assert seen["progress"] == [(0.25, "encoding")]
    assert seen["metric"][0]["loss"] == 0.5
    assert seen["output"][0]["files"]["heatmap"] == "h.nii.gz"
    assert seen["message"] == ["using cpu"]
    assert [e["event"] for e in seen["all"]] == ["start", "progress", "message", "metric", "output", "done"]
    assert result.outputs == seen["output"] and result.metrics == seen["metric"]
    assert result.stdout_text == "some stray text"
    assert "warning on stderr" in result.stderr_tail
    assert not runner.running and runner.elapsed > 0


def test_poll_delivers_events_while_running(tmp_path):
    command = _script(
        tmp_path,
        """
        import json, time
        print(json.dumps({"event": "progress", "fraction": 0.1, "message": "a"}), flush=True)
        time.sleep(30)
        """,
    )
    fractions: list[float] = []
    runner = JobRunner(command, on_progress=lambda f, m: fractions.append(f)).start()
    deadline = time.monotonic() + 20
    while not fractions and time.monotonic() < deadline:
        assert runner.poll() is False
        time.sleep(0.05)
    assert fractions == [0.1] and runner.running
    runner.cancel()
    result = runner.wait(timeout=10)
    assert result.cancelled and not result.ok
    assert result.error_message() == "Cancelled."


def test_error_events_and_exit_code_propagate(tmp_path):
    command = _script(
        tmp_path,
        """
        import json, sys
        print(json.dumps({"event": "error", "task": "detect", "input": "x", "message": "x: not a volume"}))
        sys.exit(1)
        """,
    )
    errors: list[str] = []
    result = JobRunner(command, on_error=errors.append).wait(timeout=30)
    assert errors == ["x: not a volume"]
    assert result.returncode == 1 and result.errors == ["x: not a volume"]
    with pytest.raises(JobError, match="not a volume"):
        result.raise_for_error()


def test_crash_without_error_event_reports_the_traceback_line(tmp_path):
    command = _script(tmp_path, "raise MemoryError('cannot allocate 12 GiB')\n")
    result = JobRunner(command).wait(timeout=30)
    assert result.returncode == 1
    assert "MemoryError: cannot allocate 12 GiB" in result.error_message()


def test_missing_interpreter_is_a_job_error(tmp_path):
    with pytest.raises(JobError, match="Cannot start"):
        JobRunner([str(tmp_path / "no-such-python")]).start()


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped by init."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_cancel_ends_child_and_grandchild(tmp_path, ignore_sigterm):
    pid_file = tmp_path / "grandchild.pid"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(
        textwrap.dedent(
            f"""
            import os, signal, time
            if {ignore_sigterm}:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(120)
            """
        )
    )
    command = _script(
        tmp_path,
        f"""
        import json, subprocess, sys, time
        subprocess.Popen([sys.executable, {str(grandchild)!r}])
        print(json.dumps({{"event": "start", "task": "detect"}}), flush=True)
        time.sleep(120)
        """,
    )
    runner = JobRunner(command).start()
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.05)
    child_pid, grandchild_pid = runner.process.pid, int(pid_file.read_text())
    assert _alive(child_pid) and _alive(grandchild_pid)
    started = time.monotonic()
    runner.cancel(grace_s=1.0)
    result = runner.wait(timeout=10)
    assert time.monotonic() - started < 8
    assert result.cancelled
    deadline = time.monotonic() + 5
    while _alive(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
    assert not _alive(grandchild_pid)


def test_cli_command_and_environment_find_the_library():
    command = cli_command(["models", "--json"], python="/x/python")
    assert command == ["/x/python", "-m", "SimpleSliceNetLib.cli", "models", "--json"]
    env = child_environment({"SIMPLESLICENET_HOME": "/tmp/h"})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(job_runner.LIB_PARENT)
    assert (job_runner.LIB_PARENT / "SimpleSliceNetLib" / "__init__.py").is_file()
    assert env["PYTHONUNBUFFERED"] == "1" and env["SIMPLESLICENET_HOME"] == "/tmp/h"
    # Outside Slicer the child uses this interpreter, which has the engine's packages.
    assert job_runner.default_python() == sys.executable


def test_child_imports_the_library_from_the_module_folder():
    code = "import json, SimpleSliceNetLib as s; print(json.dumps({'event': 'message', 'message': s.__file__}))"
    result = JobRunner([sys.executable, "-c", code]).wait(timeout=30)
    assert result.ok
    assert result.events[0]["message"].startswith(str(job_runner.LIB_PARENT))
