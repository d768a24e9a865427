"""Stacks of (config, seed) members: --stack_configs=a.yaml,b.yaml --seeds=... trains every config x seed in one
process, each member on its own data, in its own run directory, computing what it computes alone."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CHILD_ENV,
    HOPPER_ATTRS,
    OFFLINE_SCRIPT,
    assert_each_member_records_itself,
    assert_other_shapes_are_one_line,
    by_member,
    config_file_of,
    metrics_rows,
    offline_run_args,
)

import algorithms.offline.cql as cql
from algorithms.common.config import ConfigError
from algorithms.common.state_files import load_state_file
from tools.rollouts import random_transitions, write_d4rl_hdf5


def config_file(folder: Path, name: str, **fields) -> str:
    """A config file of the short test run (offline_run_args' fields) with `fields` on top."""
    return config_file_of(offline_run_args(Path("unset"), folder / "unset"), folder, name, **fields)


def stack_args(files, checkpoints: Path, updates: int = 60, *more) -> list:
    return [f"--stack_configs={','.join(files)}", f"--checkpoints_path={checkpoints}", f"--max_timesteps={updates}",
            *more]


def test_a_two_config_two_seed_stack_is_one_process_with_four_run_dirs(hopper_hdf5, second_hopper, tmp_path):
    files = [config_file(tmp_path, "a", env=str(hopper_hdf5)),
             config_file(tmp_path, "b", env=str(second_hopper), normalize_reward=True)]
    done = subprocess.run([sys.executable, OFFLINE_SCRIPT, *stack_args(files, tmp_path / "runs"), "--seeds=0,1"],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 runs (2 datasets)" in done.stdout
    assert "hopper-random-tiny" in done.stdout.splitlines()[-1] and "hopper-second" in done.stdout.splitlines()[-1]
    runs = assert_each_member_records_itself(tmp_path / "runs", hopper_hdf5, second_hopper)
    for run_dir in runs.values():
        own = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert [r["step"] for r in metrics_rows(run_dir) if "d4rl_normalized_score" in r] == [60]
        assert load_state_file(run_dir / "checkpoint_60.pt")["config"] == own  # a checkpoint of the run alone


def test_a_member_ends_as_its_config_alone_and_is_deaf_to_the_others_data(hopper_hdf5, second_hopper, tmp_path):
    """Member (b, seed 1) of the stack [a, b] x [0, 1] ends with the weights of b's run with seed 1 alone (up to
    stacked-matmul rounding), and member (a, seed 0) ends bitwise the same when b's data is another dataset (of
    another size, rewards transformed)."""
    a, b = config_file(tmp_path, "a", env=str(hopper_hdf5)), config_file(tmp_path, "b", env=str(second_hopper))
    third = write_d4rl_hdf5(tmp_path / "hopper-third.hdf5", random_transitions("Hopper-v4", 1500, seed=7), HOPPER_ATTRS)
    b_other = config_file(tmp_path, "b_other", env=str(third), normalize_reward=True)
    cql.main(stack_args([a, b], tmp_path / "stack") + ["--seeds=0,1"])
    cql.main(["--config_path", b, "--seed=1", f"--checkpoints_path={tmp_path / 'alone'}", "--max_timesteps=60"])
    cql.main(stack_args([a, b_other], tmp_path / "other") + ["--seeds=0,1"])
    stack, (alone,) = by_member(tmp_path / "stack"), (tmp_path / "alone").iterdir()
    want = load_state_file(alone / "checkpoint_60.pt")
    got = load_state_file(stack["hopper-second", 1] / "checkpoint_60.pt")
    for part in ("actor", "critic"):  # Adam turns rounding into steps of up to lr where a gradient is ~0: 3e-3
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=1e-3, atol=3e-3, msg=f"{part}.{name}")
    seed_1_of_a = load_state_file(stack["hopper-random-tiny", 1] / "checkpoint_60.pt")  # same seed, other data:
    assert max((seed_1_of_a["critic"][k] - v).abs().max() for k, v in want["critic"].items()) > 5 * 3e-3  # apart
    mine = load_state_file(stack["hopper-random-tiny", 0] / "checkpoint_60.pt")
    theirs = load_state_file(by_member(tmp_path / "other")["hopper-random-tiny", 0] / "checkpoint_60.pt")
    for part in ("actor", "critic", "target_critic"):
        for name, value in mine[part].items():
            assert torch.equal(theirs[part][name], value), (part, name)
    assert metrics_rows(stack["hopper-random-tiny", 0]) == metrics_rows(by_member(tmp_path / "other")[
        "hopper-random-tiny", 0])


def test_any_members_dir_resumes_the_whole_stack_exactly(hopper_hdf5, second_hopper, tmp_path):
    files = [config_file(tmp_path, "a", env=str(hopper_hdf5)), config_file(tmp_path, "b", env=str(second_hopper))]
    cql.main(stack_args(files, tmp_path / "whole", 120) + ["--seeds=3,4"])
    cql.main(stack_args(files, tmp_path / "cut", 60) + ["--seeds=3,4"])
    cut = by_member(tmp_path / "cut")
    summary = cql.train(cql.parse_config([f"--resume={cut['hopper-second', 4]}", "--max_timesteps=120"]))
    assert summary["updates"] == 120 and len(summary["runs"]) == 4
    for key, run_dir in by_member(tmp_path / "whole").items():
        want, got = load_state_file(run_dir / "checkpoint_120.pt"), load_state_file(cut[key] / "checkpoint_120.pt")
        for part in ("actor", "critic", "target_critic"):
            for name, value in want[part].items():
                assert torch.equal(got[part][name], value), (key, part, name)
        assert {**want["config"], "checkpoints_path": None} == {**got["config"], "checkpoints_path": None}
        assert metrics_rows(run_dir) == metrics_rows(cut[key])


@pytest.mark.parametrize("field, value", [("cql_alpha", 5.0), ("batch_size", 16), ("eval_freq", 30)])
def test_members_that_cannot_share_a_stack_are_one_line_naming_the_field_and_both_configs(
        hopper_hdf5, tmp_path, field, value):
    a, b = config_file(tmp_path, "a", env=str(hopper_hdf5)), config_file(tmp_path, "b", env=str(hopper_hdf5), **{
        field: value})
    with pytest.raises(ConfigError, match=rf"field '{field}': {a} sets .*, {b} sets {value}"):
        cql.train(cql.parse_config(stack_args([a, b], tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # nothing was made
    # an override on the command line is every member's: then they agree
    summary = cql.train(cql.parse_config(stack_args([a, b], tmp_path / "runs", 30, f"--{field}={value}")))
    assert len(summary["runs"]) == 2


def test_members_of_other_shapes_are_one_line(hopper_hdf5, tmp_path):
    assert_other_shapes_are_one_line(OFFLINE_SCRIPT, lambda name, env: config_file(tmp_path, name, env=str(env)),
                                     hopper_hdf5, tmp_path)


@pytest.mark.parametrize("value, expected", [
    ("{a},missing.yaml", "field 'stack_configs': missing.yaml is not a file"),
    ("{a},{a}", "field 'stack_configs' lists a file twice"),
    (",", "field 'stack_configs' expects config files like a.yaml,b.yaml, got ','"),
    ("missing.yaml", "config file missing.yaml: cannot read"),
])
def test_bad_stack_configs_are_one_line(hopper_hdf5, tmp_path, value, expected):
    a = config_file(tmp_path, "a", env=str(hopper_hdf5))
    with pytest.raises(ConfigError, match=expected):
        cql.train(cql.parse_config([f"--stack_configs={value.format(a=a)}", f"--log_dir={tmp_path}"]))


def test_stack_configs_and_config_path_together_are_refused(hopper_hdf5, tmp_path):
    a = config_file(tmp_path, "a", env=str(hopper_hdf5))
    with pytest.raises(ConfigError, match="--stack_configs alone"):
        cql.parse_config(["--config_path", a, f"--stack_configs={a}"])
