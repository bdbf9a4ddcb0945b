"""One owner per output folder / cache: a second live run is refused, a dead owner's lock is taken over."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crepa.lock import LOCK_NAME, FolderLocked, hold

HOLDER = """
import sys, time
from pathlib import Path
from crepa.lock import hold
with hold(Path(sys.argv[1]), "output.dir", "test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_process_is_refused_and_stale_lock_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    try:
        expected = rf"output.dir: .* in use by another crepa run \(pid {holder.pid} on host"
        with pytest.raises(FolderLocked, match=expected), hold(folder, "output.dir", "second"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the kill
    with hold(folder, "output.dir", "after the kill"):  # stale: its pid is gone
        assert json.loads((folder / LOCK_NAME).read_text())["command"] == "after the kill"
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_cli_refuses_a_folder_another_run_holds(tmp_path, command, run_cli):
    run = tmp_path / "run.toml"
    run.write_text(
        '[model]\npretrained = "pipe"\n[data]\nsource = "clips"\n[cache]\ndir = "cache"\n[output]\ndir = "out"\n'
    )
    holder = _start_holder(tmp_path / ("out" if command == "train" else "cache"))
    try:
        started = time.monotonic()
        result = run_cli(command, str(run), cwd=tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    key = "output.dir" if command == "train" else "cache.dir"
    output = " ".join(result.stderr.split())
    assert result.returncode == 2, output
    assert f"{key}: " in output and f"in use by another crepa run (pid {holder.pid}" in output
    assert "Traceback" not in output and time.monotonic() - started < 120
