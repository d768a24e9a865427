"""Files the project reads run no code, prove they are whole, and a resume keeps the experiment it resumes.

* checkpoints, replay files and training-env states are stored as what torch.load(weights_only=True) reads
  (runs.write_state_file), with a digest of their contents checked on load;
* every entry point that loads such a file refuses one whose unpickling would run code: one line, exit 2, no
  side effect; tools/convert_checkpoint.py converts a trusted older file;
* --resume passes over a damaged newest checkpoint (named in a warning) and a stray file among them;
* --resume refuses a change of a field that changes what the run computes, and records the others.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CHILD_ENV,
    FINETUNE_SCRIPT,
    assert_same_finetune_run,
    finetune_run_args,
    metrics_rows,
    offline_final_weights,
    offline_run_args,
)

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as offline
from algorithms.common import runs
from algorithms.common.runs import write_state_file
from algorithms.common.state_files import content_digest, from_plain, load_state_file, to_plain

ROOT = Path(__file__).resolve().parents[2]


class CodeOnLoad:
    """Unpickling this writes a marker file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def crafted(path: Path, marker: Path, like: dict) -> Path:
    """A file shaped like `like` (a checkpoint's or replay file's keys) whose loading by unpickling runs code."""
    torch.save({**{k: 0 for k in like}, "actor": CodeOnLoad(marker)}, path)
    return path


def one_error_line(capsys, call, code: int = 2) -> str:
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ the format
def test_plain_values_round_trip_and_load_without_unpickling(tmp_path):
    generator = np.random.default_rng(7)
    generator.random(3)
    state = {"mean": np.arange(5, dtype=np.float64), "key": np.arange(4, dtype=np.uint32), "flag": np.bool_(True),
             "legacy": np.random.RandomState(3).get_state(), "gen": generator, "nested": [(1, 2.5, None), {"a": "b"}],
             "weights": torch.randn(3, 2), "big": 2 ** 100}
    write_state_file(tmp_path / "s.pt", state)
    torch.load(tmp_path / "s.pt", weights_only=True)  # what PyTorch itself deems safe reads it
    back = load_state_file(tmp_path / "s.pt")
    assert back["mean"].dtype == np.float64 and np.array_equal(back["mean"], state["mean"])
    assert back["key"].dtype == np.uint32 and back["flag"] is True and back["big"] == 2 ** 100
    assert back["nested"] == [(1, 2.5, None), {"a": "b"}] and torch.equal(back["weights"], state["weights"])
    legacy = np.random.RandomState()
    legacy.set_state(back["legacy"])
    assert legacy.random() == np.random.RandomState(3).random()
    assert back["gen"].random() == generator.random()  # the generator goes on where it was
    with pytest.raises(TypeError, match="cannot be stored"):
        to_plain({"x": object()})


def test_the_digest_sees_every_kind_of_change():
    base = to_plain({"w": torch.arange(6.0), "lr": 3e-4, "step": 10, "name": "a", "t": (1, None)})
    digest = content_digest(base)
    assert content_digest(from_plain(to_plain(from_plain(base)))) == digest  # deterministic
    changes = [{**base, "w": torch.arange(6.0).index_put_((torch.tensor(3),), torch.tensor(3.0000002))},
               {**base, "lr": 3.0000000000000003e-4}, {**base, "step": 11}, {**base, "name": "b"},
               {**base, "t": [1, None]}, {**base, "w": torch.arange(6.0).double()},
               {**base, "w": torch.arange(6.0).reshape(2, 3)}, dict(reversed(list(base.items())))]
    assert len({content_digest(c) for c in changes} | {digest}) == len(changes) + 1


def test_a_file_overwritten_in_the_middle_is_damaged(tmp_path):
    path = tmp_path / "c.pt"
    write_state_file(path, {"w": torch.randn(20000), "run": {"rng": 1}})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # same size, bytes of one tensor overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_state_file(path)


# ------------------------------------------------------------------ every entry point refuses code
@pytest.fixture(scope="module")
def offline_run(hopper_hdf5, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offline")
    offline.main(offline_run_args(hopper_hdf5, root, updates=60))
    (run_dir,) = root.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def finetune_run(hopper_hdf5, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    finetune.main(finetune_run_args(hopper_hdf5, root, offline=20, online=40))
    (run_dir,) = root.iterdir()
    return run_dir


@pytest.mark.parametrize("entry", ["offline load_model", "offline resume", "finetune load_model", "finetune resume",
                                   "finetune replay file"])
def test_no_entry_point_runs_code_from_a_file(entry, hopper_hdf5, offline_run, finetune_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    script, finished = (offline, offline_run) if entry.startswith("offline") else (finetune, finetune_run)
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    newest = runs.checkpoint_files(run_dir)[-1]
    if entry.endswith("load_model"):
        bad = crafted(tmp_path / "shared.pt", marker, load_state_file(newest))
        args = (offline_run_args(hopper_hdf5, tmp_path / "new") if script is offline
                else finetune_run_args(hopper_hdf5, tmp_path / "new")) + [f"--load_model={bad}"]
    else:
        for older in runs.checkpoint_files(run_dir)[:-1]:
            older.unlink()  # the crafted file is the only checkpoint: nothing to fall back on
        if entry == "finetune replay file":
            replay = run_dir / load_state_file(newest)["replay_file"]
            crafted(replay, marker, load_state_file(replay))
        else:
            crafted(newest, marker, load_state_file(newest))
        args = [f"--resume={run_dir}"]
    line = one_error_line(capsys, lambda: script.main(args))
    assert not marker.exists()
    assert "resume" in line or "load_model" in line
    if entry != "finetune replay file":
        assert "convert_checkpoint.py --trust" in line  # how to load a file one trusts


# ------------------------------------------------------------------ damaged and stray checkpoints
def test_resume_passes_over_a_damaged_newest_checkpoint_and_a_stray_file(hopper_hdf5, offline_run, tmp_path,
                                                                          capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(offline_run, run_dir)
    newest = run_dir / "checkpoint_60.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = bytes(256)
    newest.write_bytes(bytes(data))
    torch.save({"note": "best so far"}, run_dir / "checkpoint_best.pt")  # not one of the run's checkpoints
    offline.main([f"--resume={run_dir}"])
    out, err = capsys.readouterr()
    assert "checkpoint_60.pt is passed over (damaged" in err and "checkpoint_30.pt" in err
    assert "resumed at update 30" in out
    assert (run_dir / "checkpoint_60.pt.skipped").exists() and (run_dir / "checkpoint_best.pt").exists()
    for name, value in offline_final_weights(offline_run, 60).items():  # trained again from update 30: the same
        torch.testing.assert_close(offline_final_weights(run_dir, 60)[name], value, rtol=0, atol=0)
    assert metrics_rows(run_dir) == metrics_rows(offline_run)


def test_a_checkpoint_that_is_a_fifo_is_one_line_and_never_opened(offline_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(offline_run, run_dir)
    os.mkfifo(run_dir / "checkpoint_90.pt")  # opening it would block for ever
    line = one_error_line(capsys, lambda: offline.main([f"--resume={run_dir}"]))
    assert "checkpoint_90.pt" in line


def test_resume_with_no_good_checkpoint_is_one_line(offline_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(offline_run, run_dir)
    for path in runs.checkpoint_files(run_dir):
        path.write_bytes(path.read_bytes()[:2000])
    line = one_error_line(capsys, lambda: offline.main([f"--resume={run_dir}"]))
    assert "no good checkpoint" in line and "checkpoint_60.pt" in line


# ------------------------------------------------------------------ a resume keeps the experiment
@pytest.mark.parametrize("how", ["edited config.yaml", "override"])
def test_resume_refuses_a_change_of_the_math(how, offline_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(offline_run, run_dir)
    for path in runs.checkpoint_files(run_dir)[1:]:
        path.unlink()
    args = [f"--resume={run_dir}"]
    if how == "override":
        args += ["--cql_alpha=5.0", "--seed=3"]
    else:
        config = run_dir / "config.yaml"
        config.write_text(config.read_text().replace("discount: 0.99", "discount: 0.9"))
    before = (run_dir / "config.yaml").read_text()
    line = one_error_line(capsys, lambda: offline.main(args))
    if how == "override":
        assert "'cql_alpha' (10.0 -> 5.0)" in line and "'seed' (0 -> 3)" in line
    else:
        assert "'discount' (0.99 -> 0.9)" in line
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / runs.RESUMES).exists()


def test_resume_may_lengthen_a_run_and_records_it(hopper_hdf5, offline_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(offline_run, run_dir)
    offline.main([f"--resume={run_dir}", "--max_timesteps=90", "--eval_freq=30"])
    (row,) = [json.loads(line) for line in (run_dir / runs.RESUMES).read_text().splitlines()]
    assert row["step"] == 60 and row["changed"] == {"max_timesteps": {"from": 60, "to": 90},
                                                    "eval_freq": {"from": 60, "to": 30}}
    assert "max_timesteps: 90" in (run_dir / "config.yaml").read_text()
    assert load_state_file(run_dir / "checkpoint_90.pt")["total_it"] == 90


# ------------------------------------------------------------------ older files, converted when trusted
def as_format_1(path: Path) -> None:
    """Rewrites a checkpoint or replay file as format 1 was written: torch.save of the objects themselves, the
    training env's attributes pickled."""
    state = load_state_file(path)
    env = (state.get("run") or {}).get("env")
    if env is not None:
        env["attributes"] = pickle.dumps(env["attributes"])
    torch.save(state, path)


def test_an_older_checkpoint_is_refused_until_converted_with_trust(finetune_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finetune_run, run_dir)
    files = sorted(run_dir.glob("*.pt"))
    for path in files:
        as_format_1(path)
    line = one_error_line(capsys, lambda: finetune.main([f"--resume={run_dir}"]))
    assert "format 1" in line and "tools/convert_checkpoint.py --trust" in line
    tool = [sys.executable, str(ROOT / "tools/convert_checkpoint.py")]
    refused = subprocess.run(tool + [str(f) for f in files], env=CHILD_ENV, capture_output=True, text=True)
    assert refused.returncode == 2 and "--trust" in refused.stderr
    done = subprocess.run(tool + ["--trust"] + [str(f) for f in files], env=CHILD_ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert all((run_dir / f"{f.name}.format1").exists() for f in files)
    for path in files:
        torch.load(path, weights_only=True)
    assert_same_finetune_run(finetune_run, run_dir, 60)  # nothing lost in the conversion
    want, got = (load_state_file(d / "checkpoint_60.pt")["run"] for d in (finetune_run, run_dir))
    assert got["env"] is not None and content_digest(to_plain(got)) == content_digest(to_plain(want))
    longer = subprocess.run([sys.executable, FINETUNE_SCRIPT, f"--resume={run_dir}", "--online_iterations=50"],
                            env=CHILD_ENV, capture_output=True, text=True)
    assert longer.returncode == 0 and "resumed at iteration 60" in longer.stdout, longer.stderr
