"""scripts/run_grid.py: configs grouped into stacks by shared fields and dataset dims, stacks spread over GPUs,
one output folder per grid (locked while it runs), finished groups skipped and stopped ones resumed. The
training program is a fake here (it records its argv and environment), so these tests need no training."""
import contextlib
import fcntl
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts import run_grid

REPO = Path(__file__).resolve().parents[2]
LOCOMOTION = sorted(str(p.relative_to(REPO)) for task in ("halfcheetah", "hopper", "walker2d")
                    for p in (REPO / "configs/offline/cql" / task).glob("*_v2.yaml"))
FAKE_PROGRAM = """import json, os, sys, time
with open(os.environ["GRID_RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
print("stdout line"); print("stderr line", file=sys.stderr)
barrier, deadline = os.environ.get("GRID_BARRIER"), time.time() + 30  # until that many processes have started
while barrier and len(open(os.environ["GRID_RECORD"]).readlines()) < int(barrier):
    if time.time() > deadline:
        sys.exit("the other processes did not start alongside this one")
    time.sleep(0.05)
sys.exit(1 if sys.argv[4:5] == [os.environ.get("GRID_FAIL_SEED")] else 0)
"""


def dry_run(tmp_path: Path, configs: list, *options: str, seeds=("0", "1", "2", "3")) -> list:
    """The commands a stacked grid would run (and its skip lines), from main --dry_run in this process."""
    command = ["--configs", *configs, "--seeds", *seeds, "--stack", "yes", "--out", str(tmp_path / "out"),
               "--dry_run", *options]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run_grid.main(command) == 0
    return buffer.getvalue().splitlines()


def option(line: str, name: str) -> str:
    return next(word.split("=", 1)[1] for word in line.split() if word.startswith(f"--{name}="))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository


# ------------------------------------------------------------------ grouping
def test_corl_locomotion_configs_make_two_stacks_by_shape(tmp_path):
    assert len(LOCOMOTION) == 18
    lines = dry_run(tmp_path, LOCOMOTION, "--gpus", "0", "--", "--tf32=false")
    assert len(lines) == 2
    cheetah_walker = [c for c in LOCOMOTION if "/hopper/" not in c]
    assert option(lines[0], "stack_configs").split(",") == cheetah_walker  # in the given order
    assert option(lines[1], "stack_configs").split(",") == [c for c in LOCOMOTION if "/hopper/" in c]
    assert all(option(line, "seeds") == "0,1,2,3" and line.endswith(" --tf32=false") for line in lines)
    assert option(lines[0], "checkpoints_path") == str(
        tmp_path / "out/offline-cql-17x6-halfcheetah-expert_v2-and-11-more")
    assert option(lines[1], "checkpoints_path") == str(tmp_path / "out/offline-cql-11x3-hopper-expert_v2-and-5-more")
    assert dry_run(tmp_path, LOCOMOTION, "--gpus", "0") == [line[:-len(" --tf32=false")] for line in lines]  # stable


def test_a_shared_field_apart_splits_a_group_and_a_default_written_out_does_not(tmp_path):
    source = yaml.safe_load((REPO / "configs/offline/cql/hopper/medium_v2.yaml").read_text())
    files = {}
    for name, change in {"a": {}, "b": {"env": "hopper-expert-v2", "normalize_reward": True},  # member fields
                         "c": {"batch_size": 512}, "d": {"policy_log_std_multiplier": 1.0},  # the default
                         "e": {"env": str(tmp_path / "missing.hdf5")}}.items():  # unknown dims
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump({**source, **change}))
    assert "policy_log_std_multiplier" not in source and source["policy_lr"] == 3e-5
    files["f"] = tmp_path / "f.yaml"  # YAML reads 3e-5 (no dot) as a string; the program as the float
    files["f"].write_text(files["a"].read_text().replace("policy_lr: 3.0e-05", "policy_lr: 3e-5"))
    assert yaml.safe_load(files["f"].read_text())["policy_lr"] == "3e-5"
    lines = dry_run(tmp_path, [str(files[n]) for n in "abcdef"], "--gpus", "0")
    assert [option(line, "stack_configs") for line in lines] == [
        f"{files['a']},{files['b']},{files['d']},{files['f']}", str(files["c"]), str(files["e"])]


def test_dims_of_an_hdf5_file_and_of_eval_env(hopper_hdf5):
    assert run_grid.config_dims({"env": str(hopper_hdf5)}) == (11, 3)
    assert run_grid.config_dims({"env": "mujoco/hopper/medium-v0", "eval_env": "HalfCheetah-v4"}) == (17, 6)
    assert run_grid.config_dims({"env": "ant-medium-v2"}) == (111, 8)  # D4RL's ant observations hold contacts
    assert run_grid.config_dims({"env": "mujoco/hopper/medium-v0"}) is None


# ------------------------------------------------------------------ over GPUs
def test_length_overrides_read_both_argument_forms():
    assert run_grid.length_overrides(["--max_timesteps=70", "--online_iterations", "5", "--tf32=true"]) == {
        "max_timesteps": 70, "online_iterations": 5}
    assert run_grid.length_overrides(["--max_timesteps", "--x"]) == {}


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8])
def test_spread_balances_members_over_gpus(gpus):
    seeds = 4
    groups = [[f"big{i}" for i in range(12)], [f"small{i}" for i in range(6)]]  # 48 and 24 members
    parts = run_grid.spread(groups, gpus)
    loads = [sum(len(configs) * seeds for gpu, configs in parts if gpu == g) for g in range(gpus)]
    assert sum(loads) == 72 and max(loads) <= 72 / gpus + seeds  # within one config's seeds of the ideal
    assert [c for _, configs in parts for c in configs] == groups[0] + groups[1]  # each config once, in order
    assert all(set(configs) <= set(groups[0]) or set(configs) <= set(groups[1]) for _, configs in parts)
    if gpus == 1:
        assert parts == [(0, groups[0]), (0, groups[1])]
    assert run_grid.spread(groups, 0) == [(None, groups[0]), (None, groups[1])]


# ------------------------------------------------------------------ one grid per folder
def test_a_second_grid_on_the_same_out_is_refused(tmp_path, capsys):
    out, program = tmp_path / "out", tmp_path / "nothing.py"
    out.mkdir()
    program.write_text("")
    with open(out / ".grid.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running grid holds it
        code = run_grid.main(["--configs", LOCOMOTION[0], "--stack", "yes", "--gpus", "0", "--out", str(out),
                              "--program", str(program)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: another grid is running in") and ".grid.lock" in err
    assert not (out / "logs").exists()


# ------------------------------------------------------------------ re-running a stopped grid
def write_stack(folder: Path, members: list, max_timesteps: int, checkpoints: list, tag: str = "a") -> list:
    """Run directories of one stack: (env, seed) members, each with the checkpoint steps in checkpoints[i]."""
    names = [f"CQL-{env}-{seed}-{tag}{i:07d}" for i, (env, seed) in enumerate(members)]
    for (env, seed), name, steps in zip(members, names, checkpoints):
        run_dir = folder / name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"env": env, "seed": seed,
                                                             "max_timesteps": max_timesteps}))
        (run_dir / "stack.yaml").write_text(yaml.safe_dump({"seeds": "0,3", "seed": 0, "runs": names}))
        for step in steps:
            (run_dir / f"checkpoint_{step}.pt").write_bytes(b"")
    return [folder / name for name in names]


HOPPER = "configs/offline/cql/hopper/medium_v2.yaml"
HOPPER_GROUP = "offline-cql-11x3-hopper-medium_v2"
HOPPER_MEMBERS = [("hopper-medium-v2", 0), ("hopper-medium-v2", 3)]


@pytest.mark.parametrize("case", ["finished", "stopped", "no_checkpoint", "other_seeds", "none"])
def test_rerun_skips_finished_resumes_stopped_and_starts_the_rest_afresh(tmp_path, case):
    folder = tmp_path / "out" / HOPPER_GROUP
    folder.mkdir(parents=True)
    if case == "finished":
        write_stack(folder, HOPPER_MEMBERS, 100, [[50, 100], [50, 100]])
    elif case == "stopped":  # an older stack without checkpoints beside it; the newest checkpoint wins
        write_stack(folder, HOPPER_MEMBERS, 100, [[], []], tag="b")
        dirs = write_stack(folder, HOPPER_MEMBERS, 100, [[50], [50, 70]])
    elif case == "no_checkpoint":
        write_stack(folder, HOPPER_MEMBERS, 100, [[], []])
    elif case == "other_seeds":  # finished, but of seeds 0 and 1: not this grid's runs
        write_stack(folder, [("hopper-medium-v2", 0), ("hopper-medium-v2", 1)], 100, [[100], [100]])
    lines = dry_run(tmp_path, [HOPPER], "--gpus", "0", "--", "--device=cpu", seeds=("0", "3"))
    if case == "finished":
        assert lines == [f"grid: {HOPPER_GROUP} finished (every run has its last checkpoint), skipped"]
    elif case == "stopped":
        assert lines == [f"{sys.executable} algorithms/offline/cql.py --resume={dirs[1]} --device=cpu"]
    else:
        assert len(lines) == 1 and option(lines[0], "stack_configs") == HOPPER and "--resume" not in lines[0]
        assert option(lines[0], "checkpoints_path") == str(folder)


# ------------------------------------------------------------------ end to end, with a fake program
def run_fake_grid(tmp_path: Path, options: list, configs: list, env: dict = None) -> tuple:
    program, record = tmp_path / "fake" / "train.py", tmp_path / "record.jsonl"  # its groups: fake-train-...
    program.parent.mkdir(exist_ok=True)
    program.write_text(FAKE_PROGRAM)
    record.unlink(missing_ok=True)
    command = [sys.executable, "scripts/run_grid.py", "--program", str(program), "--configs", *configs,
               "--out", str(tmp_path / "out"), *options]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "GRID_RECORD": str(record), **(env or {})})
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    return done, calls


def test_stacks_run_pinned_side_by_side_on_their_gpus(tmp_path):
    configs = [HOPPER, "configs/offline/cql/walker2d/expert_v2.yaml", "configs/offline/cql/walker2d/medium_v2.yaml"]
    done, calls = run_fake_grid(tmp_path, ["--seeds", "0", "3", "--stack", "yes", "--gpus", "2", "--",
                                           "--max_timesteps=10"], configs,
                                {"CUDA_VISIBLE_DEVICES": "5,7", "GRID_BARRIER": "2"})  # both at once, or a hang
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    hopper, walker = "fake-train-11x3-hopper-medium_v2", "fake-train-17x6-walker2d-expert_v2-and-1-more"
    assert sorted((call["gpu"], call["argv"]) for call in calls) == [
        ("5", [f"--stack_configs={HOPPER}", "--seeds=0,3", f"--checkpoints_path={out / hopper}",
               "--max_timesteps=10"]),
        ("7", [f"--stack_configs={configs[1]},{configs[2]}", "--seeds=0,3", f"--checkpoints_path={out / walker}",
               "--max_timesteps=10"])]
    assert "grid: 2 stacks, 2 ok, 0 failed" in done.stdout
    log = (out / "logs" / f"{walker}.log").read_text()
    assert log.startswith("$ CUDA_VISIBLE_DEVICES=7 ") and "stdout line" in log and "stderr line" in log


def test_without_stacks_each_config_and_seed_runs_alone(tmp_path):
    configs = [HOPPER, "configs/offline/cql/walker2d/expert_v2.yaml"]
    done, calls = run_fake_grid(tmp_path, ["--seeds", "0", "3", "--jobs", "2", "--stack", "no", "--",
                                           "--max_timesteps=10", "--device=cpu"], configs, {"GRID_FAIL_SEED": "3"})
    assert done.returncode == 1
    assert sorted(call["argv"] for call in calls) == sorted(
        ["--config_path", c, "--seed", s, "--max_timesteps=10", "--device=cpu"] for c in configs for s in "03")
    assert all(call["gpu"] == os.environ.get("CUDA_VISIBLE_DEVICES") for call in calls)  # nothing pinned
    assert "grid: 4 runs, 2 ok, 2 failed" in done.stdout and "walker2d-expert_v2-seed3.log" in done.stdout
    log = (tmp_path / "out" / "logs" / "offline-cql-hopper-medium_v2-seed0.log").read_text()
    assert "stdout line" in log and "stderr line" in log


@pytest.mark.skipif(not shutil.which("make"), reason="no make")
def test_make_table_runs_the_locomotion_grid_in_stacks_then_the_results():
    done = subprocess.run(["make", "-n", "table", "ARGS=--max_timesteps=10"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    grid, results = [shlex.split(line) for line in done.stdout.replace("\\\n", " ").splitlines()]
    assert grid[1:3] == ["scripts/run_grid.py", "--program"] and grid[grid.index("--configs") + 1:][:18] == LOCOMOTION
    assert " ".join(grid[grid.index("--seeds"):]).endswith(
        "--seeds 0 1 2 3 --stack yes --out runs/table -- --tf32=true --max_timesteps=10")  # the table's precision
    assert results[1:] == ["tools/results.py", "runs/table", "--csv", "runs/table/results.csv", "--plots",
                           "runs/table/plots"]


def test_a_two_config_two_seed_grid_is_one_process_with_four_run_dirs_and_a_row_per_dataset(
        hopper_hdf5, second_hopper, tmp_path):
    """The real offline script: one stack process; a re-run finds it finished; a killed stack resumes."""
    from test_results import rows_by_dataset

    configs = []
    for name, env in (("a", hopper_hdf5), ("b", second_hopper)):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump({"env": str(env), "batch_size": 32, "cql_n_actions": 4,
                                               "n_episodes": 2, "max_episode_steps": 30}))
    options = ["--configs", *map(str, configs), "--seeds", "0", "1", "--stack", "yes", "--gpus", "0",
               "--out", str(tmp_path / "out"), "--", "--max_timesteps=40", "--eval_freq=20", "--log_freq=20",
               "--wandb_mode=disabled", "--device=cpu"]
    assert run_grid.main(options) == 0
    (group,) = [d for d in (tmp_path / "out").iterdir() if d.name != "logs" and d.is_dir()]
    run_dirs = sorted(d for d in group.iterdir() if d.is_dir())
    assert len(run_dirs) == 4 and len(list((tmp_path / "out" / "logs").iterdir())) == 1  # one process
    rows = rows_by_dataset(group)
    datasets = {dataset: row for (_, dataset), row in rows.items() if not dataset.endswith("average")}
    assert sorted(datasets) == ["hopper-random-tiny", "hopper-second"]
    assert all(row["seeds"] == 2 for row in datasets.values())
    # re-run: finished, nothing runs again
    before = {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in run_dirs}
    assert run_grid.main(options) == 0
    assert before == {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in run_dirs}
    # a stack stopped at 20 (its checkpoints of 40 gone) is resumed by the re-run, to its last update
    for run_dir in run_dirs:
        (run_dir / "checkpoint_40.pt").unlink()
    assert run_grid.main(options) == 0
    assert all((d / "checkpoint_40.pt").is_file() for d in run_dirs)
    assert all("resumes.jsonl" in {p.name for p in d.iterdir()} for d in run_dirs)
    # a longer run asked for after `--` resumes the finished stack to it
    assert run_grid.main([o if o != "--max_timesteps=40" else "--max_timesteps=60" for o in options]) == 0
    assert all((d / "checkpoint_60.pt").is_file() for d in run_dirs)
