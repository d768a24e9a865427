"""A run directory's files as a run finds them, and a run's output streams (algorithms/common/runs.py):
a file the run writes that is a symbolic link (refused, the file it names untouched; the directory itself may be
a link), a file of the wrong kind (a directory, a FIFO) or with a tail that is not UTF-8, the mode of rewritten
files, strict JSON in metrics.jsonl, and a stdout or stderr that is closed or whose reader goes away.

Each case goes through the offline script where that is cheap (a finished 60-update run, copied and damaged,
then --resume'd), else against runs.py itself."""
import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV, OFFLINE_SCRIPT, metrics_rows
from conftest import offline_run_args as offline_args

import algorithms.offline.cql as offline_cql
from algorithms.common import runs
from algorithms.common.config import ConfigError
from tools import results

ROOT = Path(__file__).resolve().parents[2]
ODD = "a run writes its files neither through a link nor into another kind of file: move it away"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def finished_run(hopper_hdf5, tmp_path_factory) -> Path:
    """A finished offline run of 60 updates (checkpoints 30 and 60), to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        offline_cql.main(offline_args(hopper_hdf5, root, updates=60))
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = root.iterdir()
    return run_dir


def copy_of(run_dir: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_dir, where / run_dir.name, symlinks=True))


def usual_mode() -> int:
    """What open() gives a new file: 0o666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def resume_error(run_dir: Path, capsys, *more: str) -> list:
    """--resume of run_dir, which must stop with exit code 2; its stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        offline_cql.main([f"--resume={run_dir}", *more])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    return err


# ------------------------------------------------------------------ links
# (the file in the run directory made a link, its target: a copy of it elsewhere, or none: a dangling link)
LINKS = [(".lock", True), (".lock", False), ("metrics.jsonl", True), ("config.yaml", True),
         ("checkpoint_90.pt", True)]


@pytest.mark.parametrize("name, target_exists", LINKS, ids=[f"{n}{'' if t else ' dangling'}" for n, t in LINKS])
def test_resume_refuses_a_run_file_that_is_a_link_and_leaves_its_target_alone(
        name, target_exists, finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere" / name  # e.g. a user's notes, or the file of another run
    elsewhere.parent.mkdir()
    source = run_dir / ("checkpoint_60.pt" if name.startswith("checkpoint") else name)
    if target_exists:
        shutil.copy(source, elsewhere)
    before = elsewhere.read_bytes() if target_exists else None
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(elsewhere)
    err = resume_error(run_dir, capsys, "--max_timesteps=90")
    assert err == [f"error: field 'resume': {run_dir / name} is a symbolic link to {elsewhere}; {ODD}"]
    assert (run_dir / name).is_symlink()
    assert (elsewhere.read_bytes() if target_exists else elsewhere.exists()) == (before if target_exists else False)


def test_a_run_directory_that_is_itself_a_link_resumes(finished_run, tmp_path, capsys):
    """People link runs/ to a scratch disk: the refusal of links is for the files in it."""
    run_dir = copy_of(finished_run, tmp_path / "scratch")
    linked = tmp_path / "runs"
    linked.symlink_to(tmp_path / "scratch")
    offline_cql.main([f"--resume={linked / run_dir.name}", "--max_timesteps=90"])
    assert "resumed at update 60" in capsys.readouterr().out
    assert (run_dir / "checkpoint_90.pt").is_file() and not (run_dir / "checkpoint_90.pt").is_symlink()


def test_write_atomic_refuses_a_link_rather_than_replace_it(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    link = tmp_path / "stack.yaml"
    link.symlink_to(target)
    with pytest.raises(runs.WriteError) as error:
        runs.write_atomic(link, lambda f: f.write("seed: 0\n"), mode="w")
    assert str(error.value) == f"cannot write {link} (it is a symbolic link to {target}; {ODD}); no checkpoint written"
    assert link.is_symlink() and target.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "stack.yaml"]  # no temporary file


def test_keep_lines_and_the_logger_refuse_a_link(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("a\nb\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(target)
    with pytest.raises(runs.WriteError, match="it is a symbolic link to"):
        runs.keep_lines(run_dir / "metrics.jsonl", 1)
    with pytest.raises(ConfigError) as error:
        runs.RunLogger(logger_config(run_dir), run_dir, "run")
    assert str(error.value) == f"field 'resume': {run_dir / 'metrics.jsonl'} is a symbolic link to {target}; {ODD}"
    assert target.read_text() == "a\nb\n" and (run_dir / "metrics.jsonl").is_symlink()


def logger_config(run_dir: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(resume=str(run_dir), checkpoints_path=None, log_dir="runs", wandb_mode="disabled")


# ------------------------------------------------------------------ files of the wrong kind
def test_resume_refuses_a_directory_where_metrics_jsonl_belongs(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()
    err = resume_error(run_dir, capsys)
    assert err == [f"error: field 'resume': {run_dir / 'metrics.jsonl'} is a directory; {ODD}"]


@pytest.mark.parametrize("name", ["metrics.jsonl", ".lock", "config.yaml", "replay_30.pt"])
def test_the_lock_refuses_a_fifo_among_the_run_files(name, tmp_path):
    """A FIFO would block the read that counts metrics rows, or a write, for ever."""
    os.mkfifo(tmp_path / name)
    with pytest.raises(ConfigError) as error:
        runs.lock_run_dir(tmp_path, logger_config(tmp_path))
    runs.releasing_run_dir_locks(lambda: None)()  # a lock taken (by the old code) goes again
    assert str(error.value) == f"field 'resume': {tmp_path / name} is a FIFO; {ODD}"


def test_the_logger_refuses_a_directory_where_metrics_jsonl_belongs(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'metrics.jsonl'} is a directory"):
        runs.RunLogger(logger_config(tmp_path), tmp_path, "run")


def test_resume_drops_a_metrics_tail_that_is_not_utf8(finished_run, tmp_path, capsys):
    """A power cut can leave garbage after the last row; the rows after the checkpoint go anyway."""
    run_dir = copy_of(finished_run, tmp_path)
    rows = metrics_rows(run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 61, "policy_loss": \xff\xfe\x00\n\xc3(\xa0\xa1')
    offline_cql.main([f"--resume={run_dir}", "--max_timesteps=90"])
    assert "resumed at update 60" in capsys.readouterr().out
    assert metrics_rows(run_dir)[:len(rows)] == rows and metrics_rows(run_dir)[-1]["step"] == 90


def test_keep_lines_and_the_logger_count_lines_in_bytes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n\xff\xfe\n\xc3(')
    assert runs.RunLogger(logger_config(tmp_path), tmp_path, "run").rows == 4
    runs.keep_lines(path, 2)
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------ modes
def test_a_new_runs_files_have_the_usual_mode(finished_run):
    """mkstemp's 0600 is not what a user expects of config.yaml or a checkpoint (a group shares runs/)."""
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_30.pt", "checkpoint_60.pt"):
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == usual_mode(), name


def test_resume_keeps_the_mode_of_the_files_it_rewrites(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    for name in ("metrics.jsonl", "config.yaml"):
        (run_dir / name).chmod(0o640)
    offline_cql.main([f"--resume={run_dir}", "--max_timesteps=90"])
    for name in ("metrics.jsonl", "config.yaml"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o640, name


def test_write_atomic_gives_a_new_file_open_s_mode_and_an_old_one_its_own(tmp_path):
    umask = os.umask(0o027)
    try:
        runs.write_atomic(tmp_path / "new.yaml", lambda f: f.write("a: 1\n"), mode="w")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.yaml").stat().st_mode) == 0o640
    (tmp_path / "new.yaml").chmod(0o604)
    runs.write_atomic(tmp_path / "new.yaml", lambda f: f.write("a: 2\n"), mode="w")
    assert stat.S_IMODE((tmp_path / "new.yaml").stat().st_mode) == 0o604


# ------------------------------------------------------------------ strict JSON
def test_metrics_jsonl_is_strict_json_and_results_reads_non_finite_values_back(tmp_path):
    logger = runs.RunLogger(logger_config(tmp_path), tmp_path, "run")
    logger.log({"qf1_loss": float("nan"), "cql_q1_rand": float("inf"), "policy_loss": -float("inf"),
                "d4rl_normalized_score": float("nan"), "alpha": 0.5}, 10)
    logger.close()

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=refuse)
    assert row == {"step": 10, "qf1_loss": "NaN", "cql_q1_rand": "Infinity", "policy_loss": "-Infinity",
                   "d4rl_normalized_score": "NaN", "alpha": 0.5}
    (back,) = results.read_metrics(tmp_path / "metrics.jsonl")
    assert back["cql_q1_rand"] == float("inf") and back["policy_loss"] == -float("inf") and back["alpha"] == 0.5
    assert back["qf1_loss"] != back["qf1_loss"] and back["d4rl_normalized_score"] != back["d4rl_normalized_score"]


# ------------------------------------------------------------------ stdout and stderr
def short_run(hopper_hdf5: Path, root: Path) -> list:
    return offline_args(hopper_hdf5, root, updates=20) + ["--eval_freq=20", "--checkpoint_freq=20"]


def test_a_stdout_whose_reader_went_away_costs_one_warning_and_the_run_goes_on(hopper_hdf5, tmp_path):
    """`cql.py ... | head -1`, or a `tee` that was killed: the results are in files, nothing is lost."""
    process = subprocess.Popen([sys.executable, OFFLINE_SCRIPT, *short_run(hopper_hdf5, tmp_path)], env=CHILD_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the script prints its first line
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0, err[-2000:]
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: stdout")]
    assert warnings == ["warning: stdout is gone (Broken pipe); the run goes on, its results go to its run "
                        "directory"], err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert metrics_rows(run_dir)[-1]["step"] == 20 and (run_dir / "checkpoint_20.pt").is_file()


# A library that prints to file descriptor 1 itself (C code's printf), mid-run; what 0, 1 and 2 are then.
STRAY_WRITE = """
import json, os, runpy, sys
sys.path.insert(0, {root!r})
from algorithms.common import runs
log = runs.RunLogger.log
def printing_log(self, row, step):
    os.write(1, b"printed by a C library\\n")
    fds = [os.readlink(f"/proc/self/fd/{{fd}}") if os.path.exists(f"/proc/self/fd/{{fd}}") else None for fd in range(3)]
    with open({fds!r}, "w") as f:
        json.dump(fds, f)
    log(self, row, step)
runs.RunLogger.log = printing_log
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


CLOSED = {">&-": [1], "2>&-": [2], "<&- >&- 2>&-": [0, 1, 2]}  # the redirection and the descriptors it closes


@pytest.mark.parametrize("closed", list(CLOSED))
def test_a_run_with_closed_output_streams_goes_on(closed, hopper_hdf5, tmp_path):
    """`cql.py ... >&-`: a closed stream is /dev/null, not the number of the next file the run opens (the run's
    .lock took descriptor 1, and what was printed to it went there); a closed stderr stopped the run silently."""
    code = STRAY_WRITE.format(root=str(ROOT), script=OFFLINE_SCRIPT, args=short_run(hopper_hdf5, tmp_path / "runs"),
                              fds=str(tmp_path / "fds.json"))
    done = subprocess.run(["bash", "-c", f'exec "$0" "$@" {closed}', sys.executable, "-c", code], env=CHILD_ENV,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / ".lock").read_text().strip().isdigit()  # its pid only
    fds = json.loads((tmp_path / "fds.json").read_text())
    assert [fds[fd] for fd in CLOSED[closed]] == ["/dev/null"] * len(CLOSED[closed]), fds
    assert metrics_rows(run_dir)[-1]["step"] == 20 and (run_dir / "checkpoint_20.pt").is_file()
