"""Faults outside the training math: two processes on one run directory (the second is refused, a dead one's
lock is not), a disk that fills (or fails) during a checkpoint, metrics or replay write (exit 3 naming the last
good checkpoint, which a later --resume continues from exactly), and wandb without a server or raising mid-run
(one warning line, training and metrics.jsonl go on).

The machinery is algorithms/common/runs.py's (locks, atomic writes, the metrics logger, the wandb guard): each
fault is checked once, against the common module or through one script; each script keeps an end-to-end case
of what it wires itself (its checkpoint files, finetune's replay file, a stack's run directories, wandb)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_finetune_run, metrics_rows
from conftest import finetune_run_args as finetune_args
from conftest import offline_final_weights as final_weights
from conftest import offline_run_args as offline_args

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common import runs

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODULES = {"offline": offline_cql, "finetune": finetune_cql}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def args_of(script: str, hopper_hdf5: Path, root: Path) -> list:
    """A short run with checkpoints: offline 120 updates (checkpoints every 30), finetune 20 offline and
    60 online iterations (checkpoints every 20)."""
    if script == "offline":
        return offline_args(hopper_hdf5, root)
    return finetune_args(hopper_hdf5, root, offline=20, online=60)


def final_step(script: str) -> int:
    return 120 if script == "offline" else 80


def assert_same_as(script: str, reference: Path, run_dir: Path) -> None:
    """The same final weights, Adam state (finetune: replay rows and counters) and every metrics row."""
    if script == "finetune":
        assert_same_finetune_run(reference, run_dir, final_step(script))
        return
    want, got = final_weights(reference, 120), final_weights(run_dir, 120)
    for part in ("actor", "critic", "target"):
        for name in want[part]:
            assert torch.equal(want[part][name], got[part][name]), (part, name)
    for index, state in want["optimizer"].items():
        for key in state:
            assert torch.equal(state[key], got["optimizer"][index][key]), (index, key)
    assert metrics_rows(run_dir) == metrics_rows(reference)


@pytest.fixture(scope="module")
def references(hopper_hdf5, tmp_path_factory) -> dict:
    """An uninterrupted run of args_of per script (wandb disabled), to compare stopped and resumed runs with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for script, module in MODULES.items():
        root = tmp_path_factory.mktemp(f"reference-{script}")
        out[script] = Path(module.train(module.parse_config(args_of(script, hopper_hdf5, root)))["run_dir"])
    torch.set_num_threads(threads)
    return out


def error_lines(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's


# ------------------------------------------------------------------ two processes on one run directory
def wait_for(process: subprocess.Popen, run_root: Path, pattern: str, runs: int = 1) -> None:
    deadline = time.time() + 300
    while len(list(run_root.glob(pattern))) < runs:
        assert process.poll() is None, "the run ended before its checkpoint"
        assert time.time() < deadline, "no checkpoint in 300 s"
        time.sleep(0.05)


def test_a_second_process_on_a_run_directory_is_refused_and_a_dead_ones_lock_does_not_block(hopper_hdf5, tmp_path):
    """runs.lock_run_dir between two processes: once, the offline script run as a file (each script's stack
    below takes its run directories' locks through main)."""
    script = "offline"
    path = str(ROOT / f"algorithms/{script}/cql.py")
    long_run = [a for a in args_of(script, hopper_hdf5, tmp_path)
                if not a.startswith(("--max_timesteps", "--offline_iterations", "--online_iterations"))]
    long_run += ["--max_timesteps=1000000"] if script == "offline" else ["--offline_iterations=1000000",
                                                                         "--online_iterations=0"]
    first = subprocess.Popen([sys.executable, path, *long_run], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(first, tmp_path, "*/checkpoint_*.pt")
        (run_dir,) = tmp_path.iterdir()
        second = subprocess.run([sys.executable, path, f"--resume={run_dir}"], env=ENV, capture_output=True,
                                text=True, timeout=120)  # refused within seconds
        assert first.poll() is None, "the first run should still hold its directory"
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert err[0] == (f"error: field 'resume': run directory {run_dir} is in use by another process (pid "
                          f"{first.pid}), which holds {run_dir}/.lock; two processes must not train in one run "
                          f"directory"), err[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's .lock is still there, but its lock died with it: --resume goes on.
    assert (run_dir / ".lock").read_text().strip() == str(first.pid)
    newest = int(runs.checkpoint_files(run_dir)[-1].stem.split("_")[1])
    more = f"--max_timesteps={newest + 10}" if script == "offline" else f"--offline_iterations={newest + 10}"
    resumed = subprocess.run([sys.executable, path, f"--resume={run_dir}", more], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(rf"resumed at (update|iteration) {newest}\b", resumed.stdout), resumed.stdout
    assert (run_dir / f"checkpoint_{newest + 10}.pt").exists()


HOLDER = """
import sys, time, types
from pathlib import Path
sys.path.insert(0, {root!r})
from algorithms.common.runs import load_state_file, lock_run_dir
lock_run_dir(Path({run_dir!r}), types.SimpleNamespace(resume={run_dir!r}, checkpoints_path=None))
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_a_stack_is_refused_while_another_process_holds_one_of_its_run_directories(script, hopper_hdf5, tmp_path,
                                                                                    capsys):
    module = MODULES[script]
    short = ["--max_timesteps=30"] if script == "offline" else ["--offline_iterations=10", "--online_iterations=10"]
    args = args_of(script, hopper_hdf5, tmp_path) + short + ["--seeds=3,4"]
    module.train(module.parse_config(args))
    assert not runs._RUN_DIR_LOCKS  # released when train() returned
    first, second = sorted(tmp_path.iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), run_dir=str(second))],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in first.iterdir() if p.name != ".lock"}
        with pytest.raises(SystemExit) as exit_info:
            module.main([f"--resume={first}"])
        err = error_lines(capsys)
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert f"run directory {second} is in use by another process (pid {holder.pid})" in err[0], err
        assert {p.name: p.read_bytes() for p in first.iterdir() if p.name != ".lock"} == before  # nothing changed
        assert not runs._RUN_DIR_LOCKS  # the first run's lock, taken before the refusal, is given back
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    more = ["--max_timesteps=40"] if script == "offline" else ["--online_iterations=20"]
    module.main([f"--resume={first}", *more])
    assert "resumed at" in capsys.readouterr().out
    for run_dir in (first, second):
        assert runs.checkpoint_files(run_dir)[-1].name == f"checkpoint_{30 if script == 'finetune' else 40}.pt"


# ------------------------------------------------------------------ a full or failing disk
def full_disk_for(monkeypatch, name: str) -> None:
    """Atomic writes of files whose names begin with `name` go to /dev/full: the kernel answers ENOSPC, as a full
    disk does. The temporary file is made as usual, so that the test sees whether it is removed."""
    mkstemp = tempfile.mkstemp

    def full_mkstemp(*args, **kwargs):
        fd, tmp = mkstemp(*args, **kwargs)
        if not Path(tmp).name.startswith(f".{name}"):
            return fd, tmp
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)


class TornAppends:
    """metrics.jsonl opened for appending, whose `fail_at`-th write puts half its line on disk and then
    fails with ENOSPC, as a disk that fills mid-write does."""

    def __init__(self, path: Path, fail_at: int):
        self.file, self.writes, self.fail_at = open(path, "a"), 0, fail_at

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            self.file.write(text[:len(text) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def torn_metrics_at(monkeypatch, fail_at: int) -> None:
    def opener(path, mode="r", *args, **kwargs):
        if Path(path).name == "metrics.jsonl" and mode == "a":
            return TornAppends(Path(path), fail_at)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runs, "open", opener, raising=False)  # RunLogger's open (algorithms/common/runs.py)


# (script, what fails, where: the file, or for metrics the first row after this update, the file named, the last
# good checkpoint): offline checkpoints every 30 updates (its row of update 60 comes before its checkpoint 60),
# finetune every 20. Each script's own checkpoint files (finetune: and its replay file); a torn metrics row
# (runs.RunLogger, one for both scripts) once.
DISK_FULL = [
    ("offline", "checkpoint", "checkpoint_60.pt", "checkpoint_60.pt", "checkpoint_30.pt"),
    ("offline", "metrics", 40, "metrics.jsonl", "checkpoint_30.pt"),
    ("finetune", "checkpoint", "checkpoint_40.pt", "checkpoint_40.pt", "checkpoint_20.pt"),
    ("finetune", "replay", "replay_40.pt", "replay_40.pt", "checkpoint_20.pt"),
]


@pytest.mark.parametrize("script, what, where, named, last_good", DISK_FULL, ids=[f"{d[0]} {d[1]}" for d in DISK_FULL])
def test_a_full_disk_stops_with_exit_3_keeps_the_last_checkpoint_and_resume_continues_exactly(
        script, what, where, named, last_good, hopper_hdf5, references, tmp_path, monkeypatch, capsys):
    module = MODULES[script]
    with monkeypatch.context() as patch:
        if what == "metrics":  # the n-th write is the first row after update `where`
            steps = [row["step"] for row in metrics_rows(references[script])]
            torn_metrics_at(patch, next(i for i, s in enumerate(steps) if s > where) + 1)
        else:
            full_disk_for(patch, where)
        with pytest.raises(SystemExit) as exit_info:
            module.main(args_of(script, hopper_hdf5, tmp_path))
    err = error_lines(capsys)
    (run_dir,) = tmp_path.iterdir()
    assert exit_info.value.code == 3 and len(err) == 1, err
    assert err[0] == (f"error: disk full writing {run_dir / named} (No space left on device); last good "
                      f"checkpoint: {run_dir / last_good}"), err[0]
    assert runs.checkpoint_files(run_dir)[-1].name == last_good
    assert not list(run_dir.glob(".*.tmp"))  # the failed write's temporary file is gone
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no torn row
    assert "run" in runs.load_state_file(run_dir / last_good)  # loadable
    module.main([f"--resume={run_dir}"])  # the disk has room again
    assert f"at {'update' if script == 'offline' else 'iteration'} {last_good[11:-3]}" in capsys.readouterr().out
    assert_same_as(script, references[script], run_dir)


@pytest.mark.parametrize("code, fails", [(errno.ENOSPC, "write"), (errno.ENOSPC, "torch.save"), (errno.EIO, "fsync"),
                                         (errno.EROFS, "mkstemp"), (errno.EDQUOT, "replace")],
                         ids=["ENOSPC", "ENOSPC inside torch.save", "EIO", "EROFS", "EDQUOT"])
def test_a_failed_atomic_write_is_a_write_error_and_leaves_the_old_files(code, fails, tmp_path, monkeypatch):
    runs.write_atomic(tmp_path / "checkpoint_10.pt", lambda f: torch.save({"old": 1}, f))
    runs.write_atomic(tmp_path / "checkpoint_20.pt", lambda f: torch.save({"old": 2}, f))

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def save(f):
        if fails != "torch.save":
            return torch.save({"new": torch.zeros(10_000)}, f)
        try:  # what torch.save does when its file's write fails with nothing left to flush
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    if fails == "write":
        full_disk_for(monkeypatch, "checkpoint_")
    elif fails != "torch.save":
        monkeypatch.setattr({"fsync": os, "replace": os, "mkstemp": tempfile}[fails], fails, fail)
    for name in ("checkpoint_20.pt", "checkpoint_30.pt"):  # over an old file, and a new one
        with pytest.raises(runs.WriteError) as error:
            runs.write_atomic(tmp_path / name, save)
        what = "disk full writing" if code in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
        assert str(error.value) == (f"{what} {tmp_path / name} ({os.strerror(code)}); last good checkpoint: "
                                    f"{tmp_path / 'checkpoint_20.pt'}")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10.pt", "checkpoint_20.pt"]
    assert torch.load(tmp_path / "checkpoint_20.pt") == {"old": 2}


# ------------------------------------------------------------------ wandb failing
class FakeWandb:
    """A wandb module whose `fails` call ("init", "log" at its 3rd call, "finish") raises, as wandb does
    without a server or with its service gone; it keeps what it was given."""

    def __init__(self, fails: str):
        self.fails, self.calls, self.rows = fails, {"init": 0, "log": 0, "finish": 0}, []

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if name == self.fails and (name != "log" or self.calls[name] == 3):
            raise RuntimeError(f"wandb {name} broke\nsecond line of the error")

    def init(self, **kwargs):
        self._call("init")
        return self

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        self._call("log")
        self.rows.append(row)

    def finish(self):
        self._call("finish")


# runs.WandbGuard and RunLogger, one for both scripts: each failing call once (offline), a stack's one guard once,
# and the finetune script's run with wandb failing mid-run, end to end.
WANDB_CASES = [("offline", "init", None), ("offline", "log", None), ("offline", "finish", None),
               ("offline", "init", "3,4"), ("finetune", "log", None)]


@pytest.mark.parametrize("script, fails, seeds", WANDB_CASES,
                         ids=[f"{s} {f}{' stack' if n else ''}" for s, f, n in WANDB_CASES])
def test_a_failing_wandb_is_one_warning_and_training_and_metrics_go_on(script, fails, seeds, hopper_hdf5,
                                                                       references, tmp_path, monkeypatch, capsys):
    module = MODULES[script]
    wandb = FakeWandb(fails)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    args = [a for a in args_of(script, hopper_hdf5, tmp_path) if a != "--wandb_mode=disabled"] + ["--wandb_mode=online"]
    module.main(args + ([f"--seeds={seeds}"] if seeds else []))  # returns: exit code 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: wandb {fails} failed (RuntimeError: wandb {fails} broke); training goes on "
                        f"without wandb, every row still goes to metrics.jsonl"], warnings
    run_dirs = sorted(tmp_path.iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    assert len(run_dirs) == (2 if seeds else 1)
    if not seeds:
        assert_same_as(script, references[script], run_dirs[0])  # every row, and the run itself, as without wandb
    training_steps = [row["step"] for row in metrics_rows(references[script]) if "policy_loss" in row]
    for run_dir in run_dirs:  # a stack's runs: a training row at every log_freq, as the reference
        assert [row["step"] for row in metrics_rows(run_dir) if "policy_loss" in row] == training_steps
    # No wandb call after the failure, for any run of the process.
    assert wandb.calls == {"init": {"init": 1, "log": 0, "finish": 0},
                           "log": {"init": len(run_dirs), "log": 3, "finish": 0},
                           "finish": {"init": 1, "log": len(metrics_rows(run_dirs[0])), "finish": 1}}[fails]
    sent = [{k: v for k, v in row.items() if k != "update"} for row in wandb.rows]
    if not seeds:  # what wandb got before it failed is what metrics.jsonl has
        assert sent == [{k: v for k, v in row.items() if k != "step"} for row in metrics_rows(run_dirs[0])][:len(sent)]


def test_wandb_online_without_a_reachable_server_is_one_warning(hopper_hdf5, tmp_path):
    """Real wandb, online, pointed at a closed port: init gives up after WANDB_INIT_TIMEOUT (wandb's own
    setting; its default is 90 s) and the run trains without it."""
    pytest.importorskip("wandb")
    env = {**{k: v for k, v in ENV.items() if not k.startswith("WANDB_")}, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_API_KEY": "0" * 40, "WANDB_INIT_TIMEOUT": "2", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    args = [a for a in offline_args(hopper_hdf5, tmp_path / "runs", updates=40) if a != "--wandb_mode=disabled"]
    result = subprocess.run([sys.executable, str(ROOT / "algorithms/offline/cql.py"), *args, "--wandb_mode=online"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert len(ours) == 1 and ours[0].startswith("warning: wandb init failed (CommError: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [row["step"] for row in metrics_rows(run_dir)] == [20, 40, 40]  # training rows at 20, 40; evaluation at 40
