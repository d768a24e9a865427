"""benchmarks/table_speed.py without a GPU: its synthetic data and configs, the done-line parser, the projection
arithmetic and the commands it would run (the stacks themselves are never run here)."""
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import yaml

import algorithms.offline.cql as cql
from benchmarks import table_speed

DIMS = {"halfcheetah": (17, 6), "walker2d": (17, 6), "hopper": (11, 3)}  # CORL's shapes, by hand
SAMPLE = ("done: 10000 updates in 250 s (evaluation held training up 30.5 s, 11.2% of the run; set-up 41 s), "
          "normalized score last 1.0 +- 0.5 over 48 seeds (1.0, ...); metrics in metrics.jsonl of each run dir")


def stack_files(command_line: str) -> list:
    """The config files of a printed command's --stack_configs."""
    flag = next(a for a in shlex.split(command_line.split(": ", 1)[1]) if a.startswith("--stack_configs="))
    return flag.split("=", 1)[1].split(",")


def test_synthetic_datasets_have_the_tasks_shapes_and_configs_corls_fields(tmp_path):
    for group, tasks in table_speed.GROUPS.items():
        configs = table_speed.prepare_group(group, tmp_path, transitions=5)
        assert len(configs) == 6 * len(tasks)
        for config_path, (task, kind) in zip(configs, [(t, k) for t in tasks for k in table_speed.KINDS]):
            fields = yaml.safe_load(config_path.read_text())
            corl = yaml.safe_load((Path(cql.__file__).parents[2] / f"configs/offline/cql/{task}/"
                                   f"{kind.replace('-', '_')}_v2.yaml").read_text())
            assert fields == {**corl, "dataset_path": str(tmp_path / "data" / f"{task}-{kind}-v2.hdf5")}
            assert fields["env"] == f"{task}-{kind}-v2"  # the D4RL name: its eval env and reference scores
            assert cql.parse_config([f"--config_path={config_path}"]).dataset_path == fields["dataset_path"]
            state_dim, action_dim = DIMS[task]
            with h5py.File(fields["dataset_path"]) as f:
                assert set(f) == {"observations", "actions", "rewards", "next_observations", "terminals",
                                  "timeouts"}
                assert f["observations"].shape == f["next_observations"].shape == (5, state_dim)
                assert f["actions"].shape == (5, action_dim)
                assert f["rewards"].shape == f["terminals"].shape == f["timeouts"].shape == (5,)


def test_done_line_parser_reads_the_line_summarize_prints(capsys):
    assert table_speed.parse_done_line(f"CQL: ...\n{SAMPLE}\n") == {
        "updates": 10000, "seconds": 250.0, "eval_seconds": 30.5, "eval_share": 11.2, "load_seconds": 41.0}
    runs = [SimpleNamespace(dir=Path(f"r{i}"), config=SimpleNamespace(seed=i, env=f"e{i}"), last_return=None,
                            scores={5000: 1.0}, logger=None) for i in range(2)]
    cql.summarize(runs, 7000, 123.4, 9.6, 2.25, stacked=True, first=5000)
    assert table_speed.parse_done_line(capsys.readouterr().out) == {
        "updates": 7000, "seconds": 123.0, "eval_seconds": 2.2, "eval_share": 1.7, "load_seconds": 10.0}
    assert table_speed.parse_done_line("no such line\n") is None


def test_projection_against_a_hand_computation(monkeypatch, tmp_path, capsys):
    # cheetah-walker: 48 members, 10000 updates in 250 s = 40 updates/s -> its 1M updates take 25000 s;
    # hopper: 24 members, 10000 updates in 100 s = 100 updates/s -> 10000 s; the table 35000 s = 9.7 h.
    assert table_speed.seed_updates_per_second({"updates": 10000, "seconds": 250.0}, 48) == 1920
    assert table_speed.table_seconds(12, 1920) == 25000
    assert table_speed.table_seconds(6, table_speed.seed_updates_per_second({"updates": 10000, "seconds": 100}, 24)) \
        == 10000
    hopper_line = SAMPLE.replace("in 250 s", "in 100 s")
    monkeypatch.setattr(table_speed, "run_stack", lambda command: hopper_line if "hopper-random" in command[2]
                        else SAMPLE)
    table_speed.main(["--transitions=2", f"--work_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "cheetah-walker: 48 members, 10000 updates in 250 s: 1920 seed-updates/s sustained (40.0 updates/s" in out
    assert "hopper: 24 members, 10000 updates in 100 s: 2400 seed-updates/s" in out
    assert "the whole table (72 runs" in out
    assert "cheetah-walker 6.9 h + hopper 2.8 h = 9.7 h on this GPU; 4 GPUs 2.4 h, 8 GPUs 1.2 h" in out
    table_speed.main(["--transitions=2", f"--work_dir={tmp_path}", "--groups=hopper"])
    assert "6 of the table's 18 datasets only (24 runs" in capsys.readouterr().out


def test_dry_run_lists_two_commands_and_writes_and_runs_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(table_speed.subprocess, "Popen", None)  # any run would fail
    table_speed.main(["--dry_run", f"--work_dir={tmp_path}", "--updates=300", "--", "--tf32=true"])
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "cql.py" in line]
    assert [len(stack_files(c)) for c in commands] == [12, 6]
    assert all("--seeds=0,1,2,3 --max_timesteps=300 --eval_freq=5000 --n_episodes=10" in c for c in commands)
    assert all(c.endswith("--tf32=true") for c in commands)
    assert "Hopper-v4 each (state 11, action 3)" in out and "Walker2d-v4 each (state 17, action 6)" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--seeds=a"], ["--updates=0"], ["--transitions=1"], ["--groups=ant"]])
def test_bad_options_stop_before_anything_is_written(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        table_speed.main([*args, f"--work_dir={tmp_path}"])
    assert stopped.value.code == 2 and "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failed_stack_stops_with_its_exit_code(capsys):
    with pytest.raises(SystemExit) as stopped:
        table_speed.run_stack([sys.executable, "-c", "print('error line'); raise SystemExit(3)"])
    assert stopped.value.code == 3
    out = capsys.readouterr()
    assert "error line" in out.out and "exited with 3" in out.err
