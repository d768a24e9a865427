"""wandb's output, and the network, in offline mode (no API key, the default): a run prints one line naming its
offline run and the `wandb sync` command, a stack one line for all its runs, a resumed run one line naming each
process's part; no colour codes in redirected output, and nothing sent anywhere (wandb 0.31 would send its
usage metrics to the server even offline). Online, wandb keeps only its run links (quiet, not silent).

The machinery is algorithms/common/runs.py's (RunLogger, WandbGuard), the same for both scripts: checked end to
end through the offline script with real wandb, and the settings each mode gets with a stand-in wandb.
"""
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from conftest import CHILD_ENV, OFFLINE_SCRIPT, offline_run_args

from algorithms.common.runs import RunLogger

PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def trap_server():
    """A local port that takes connections and never answers: wandb's server and every proxy in the child's
    environment, so any request the run makes lands here (and is counted) instead of leaving the machine."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield server
    server.close()


def connections(server: socket.socket) -> int:
    """How many connections the trap server received (queued by the kernel, answered or not)."""
    server.setblocking(False)
    count = 0
    while True:
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


def run_offline(args: list, tmp_path: Path, server: socket.socket) -> str:
    """The offline script's run with no API key and WANDB_MODE unset, stdout and stderr to one file: its output."""
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {k: v for k, v in CHILD_ENV.items() if not k.startswith("WANDB_") and k.lower() not in PROXIES}
    env.update({"WANDB_BASE_URL": url, "HTTP_PROXY": url, "HTTPS_PROXY": url, "ALL_PROXY": url,
                "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")})  # no settings file of the user's
    output = tmp_path / "output.txt"
    with open(output, "w") as f:
        result = subprocess.run([sys.executable, OFFLINE_SCRIPT, *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=300)
    text = output.read_text()
    assert result.returncode == 0, text[-3000:]
    return text


def the_wandb_line(text: str) -> list:
    """The one line of the output that mentions wandb (no colour codes anywhere): the directories it names."""
    assert "\x1b[" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "wandb" in line.lower()]
    assert len(lines) == 1, text[-3000:]
    head, command = lines[0].split("; upload ")
    assert head.startswith("wandb: ") and " with: wandb sync " in command, lines[0]
    return [Path(d) for d in shlex.split(command.split(" with: wandb sync ", 1)[1])]


def assert_offline_run(directory: Path, run_dir: Path) -> None:
    """directory is one of run_dir's offline wandb runs, with its data."""
    run_id = run_dir.name.rsplit("-", 1)[-1]
    assert directory.parent == run_dir / "wandb" and directory.name.startswith("offline-run-"), directory
    assert directory.name.endswith(f"-{run_id}") and (directory / f"run-{run_id}.wandb").stat().st_size > 0


def test_an_offline_run_is_one_line_and_its_resume_names_both_parts(hopper_hdf5, tmp_path, trap_server):
    args = [a for a in offline_run_args(hopper_hdf5, tmp_path / "runs", updates=20) if a != "--wandb_mode=disabled"]
    text = run_offline(args, tmp_path, trap_server)  # the mode left open, no API key: offline
    (run_dir,) = (tmp_path / "runs").iterdir()
    (first,) = the_wandb_line(text)
    assert f"wandb: offline run in {first}; upload it with: wandb sync {first}" in text.splitlines()
    assert_offline_run(first, run_dir)
    # Resumed: the second process made a directory of its own; both are named, in the order they ran.
    text = run_offline([f"--resume={run_dir}", "--max_timesteps=40", "--wandb_mode=offline"], tmp_path, trap_server)
    parts = the_wandb_line(text)
    assert len(parts) == 2 and parts[0] == first and parts[1] != first, parts
    assert_offline_run(parts[1], run_dir)
    assert connections(trap_server) == 0  # nothing went to wandb's server, or through any proxy


def test_an_offline_stack_is_one_line_for_all_its_runs(hopper_hdf5, tmp_path, trap_server):
    args = [a for a in offline_run_args(hopper_hdf5, tmp_path / "runs", updates=20) if a != "--wandb_mode=disabled"]
    text = run_offline([*args, "--wandb_mode=offline", "--seeds=0,1"], tmp_path, trap_server)
    run_dirs = sorted((tmp_path / "runs").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    directories = the_wandb_line(text)
    assert len(directories) == 2 and f"wandb: 2 offline runs under {tmp_path / 'runs'}; upload them" in text
    for directory, run_dir in zip(sorted(directories, key=lambda d: int(d.parts[-3].split("-")[-2])), run_dirs):
        assert_offline_run(directory, run_dir)
    assert connections(trap_server) == 0


# ------------------------------------------------------------------ the settings each mode gives wandb
@dataclass
class LoggerConfig:
    project: str = "tests"
    group: str = "wandb"
    wandb_mode: Optional[str] = None


class StandInWandb:
    """A wandb module that keeps what init was given; its run's files directory is under the run dir."""

    def __init__(self, run_dir: Path):
        self.init_args, self.dir = None, str(run_dir / "wandb" / "offline-run-20260101_000000-abcd1234" / "files")
        self.finish_fails = False

    def init(self, **kwargs):
        self.init_args = kwargs
        return self

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        pass

    def finish(self):
        if self.finish_fails:
            raise RuntimeError("wandb finish broke")


@pytest.mark.parametrize("mode, silent", [("offline", True), ("online", False)])
def test_offline_wandb_is_silent_and_online_keeps_its_run_links(mode, silent, tmp_path, monkeypatch, capsys):
    wandb = StandInWandb(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "unset")  # so that monkeypatch restores what was there
    monkeypatch.delenv("WANDB_ERROR_REPORTING")
    logger = RunLogger(LoggerConfig(wandb_mode=mode), tmp_path, "CQL-hopper-0-abcd1234")
    assert wandb.init_args["settings"] == {"silent": silent, "quiet": True}
    assert os.environ.get("WANDB_ERROR_REPORTING") == ("false" if mode == "offline" else None)
    logger.close()
    printed = capsys.readouterr().out.splitlines()
    files = Path(wandb.dir).parent
    assert printed == ([f"wandb: offline run in {files}; upload it with: wandb sync {files}"] if silent else [])


def test_no_offline_line_once_wandb_failed(tmp_path, monkeypatch, capsys):
    """wandb that broke at finish: its one warning line, and no line pointing at an offline run cut short."""
    wandb = StandInWandb(tmp_path)
    wandb.finish_fails = True
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    RunLogger(LoggerConfig(wandb_mode="offline"), tmp_path, "CQL-hopper-0-abcd1234").close()
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning: wandb finish failed (RuntimeError: wandb finish broke)"), (out, err)
