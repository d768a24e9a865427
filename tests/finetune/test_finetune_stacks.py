"""Finetune stacks of (config, seed) members: --stack_configs=a.yaml,b.yaml --seeds=... trains every config x seed in
one process, each member on its own dataset in its own replay ring, with its own training and eval envs, run
directory and checkpoints, through the offline and the online phase, computing what it computes alone."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    CHILD_ENV,
    FINETUNE_SCRIPT,
    HOPPER_ATTRS,
    assert_each_member_records_itself,
    assert_other_shapes_are_one_line,
    assert_same_finetune_run,
    by_member,
    config_file_of,
    finetune_run_args,
    metrics_rows,
)

import algorithms.finetune.cql as cql
from algorithms.common.config import ConfigError
from algorithms.common.state_files import load_state_file
from tools.rollouts import random_transitions, write_d4rl_hdf5

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def config_file(folder: Path, name: str, offline: int = 20, online: int = 30, **fields) -> str:
    """A config file of the short finetune run (finetune_run_args' fields) with `fields` on top."""
    return config_file_of(finetune_run_args(Path("unset"), folder / "unset", offline, online), folder, name, **fields)


def stack_args(files, checkpoints: Path, *more) -> list:
    return [f"--stack_configs={','.join(files)}", f"--checkpoints_path={checkpoints}", *more]


def ring(n_data: int, seed: int, runs=(), capacity: int = 8) -> tuple:
    """A replay buffer with a dataset of n_data rows whose rewards are seed * 100 + row."""
    rows = {"observations": np.full((n_data, 2), float(seed)), "actions": np.zeros((n_data, 1)),
            "rewards": seed * 100.0 + np.arange(n_data), "next_observations": np.zeros((n_data, 2)),
            "terminals": np.zeros(n_data)}
    return cql.ReplayBuffer(capacity, 2, 1, torch.device("cpu"), runs), rows


def test_each_ring_of_a_stack_has_its_own_dataset_size_pointer_and_capacity():
    """Members' datasets of 3 and 5 rows in rings of capacity 6 and 10: each ring fills, wraps and is sampled by
    its own size (a device tensor, one per run), and each run's online state is that of a one-run ring."""
    (_, small), (_, large) = ring(3, 1), ring(5, 2)
    buffer = cql.ReplayBuffer([6, 10], 2, 1, torch.device("cpu"), runs=(2,))  # as train(): each member's capacity
    buffer.load_dataset(small, 0)
    buffer.load_dataset(large, 1)
    assert (buffer.n_datas, buffer.sizes, buffer.pointers) == ([3, 5], [3, 5], [3, 5])
    assert buffer.size_tensor.tolist() == [3, 5]
    with pytest.raises(ValueError, match="differ in size"):
        assert buffer.size
    alone = []
    for rows, capacity in ((small, 6), (large, 10)):
        one, _ = ring(0, 0, capacity=capacity)
        one.load_dataset(rows)
        alone.append(one)
    for t in range(4):  # ring 0 wraps over its first dataset row, ring 1 does not
        rewards = np.array([10.0 + t, 20.0 + t])
        buffer.add(np.zeros((2, 2)), np.zeros((2, 1)), rewards, np.zeros((2, 2)), np.zeros(2))
        for one, reward in zip(alone, rewards):
            one.add(np.zeros(2), np.zeros(1), reward, np.zeros(2), 0.0)
    assert (buffer.sizes, buffer.pointers, buffer.size_tensor.tolist()) == ([6, 9], [1, 9], [6, 9])
    rewards = buffer.sample(512, (2,))[2]
    assert set(rewards[0].tolist()) == {101.0, 102.0, 10.0, 11.0, 12.0, 13.0}  # row 0 (100.0) was overwritten
    assert set(rewards[1].tolist()) == {200.0, 201.0, 202.0, 203.0, 204.0, 20.0, 21.0, 22.0, 23.0}
    for run, one in enumerate(alone):
        got, want = buffer.online_state(run), one.online_state()
        assert {k: got[k] for k in ("capacity", "n_data", "n_added", "pointer", "size")} == {
            k: want[k] for k in ("capacity", "n_data", "n_added", "pointer", "size")}
        assert np.array_equal(got["rows"], want["rows"]) and torch.equal(got["rewards"], want["rewards"])
        assert [float(v) for v in buffer.newest(run)[2:3]] == [float(one.storage["rewards"][one.pointer - 1])]
    again = cql.ReplayBuffer([6, 10], 2, 1, torch.device("cpu"), runs=(2,))
    again.load_dataset(small, 0)
    again.load_dataset(large, 1)
    for run, one in enumerate(alone):  # a one-run checkpoint's rows into a member's ring
        again.load_online_state(one.online_state(), "test", run=run)
    assert (again.sizes, again.pointers, again.size_tensor.tolist()) == ([6, 9], [1, 9], [6, 9])
    for key in cql.BUFFER_FIELDS:
        assert torch.equal(again.storage[key], buffer.storage[key]), key


def test_a_two_config_two_seed_stack_is_one_process_with_four_run_dirs(hopper_hdf5, second_hopper, tmp_path):
    files = [config_file(tmp_path, "a", env=str(hopper_hdf5)),
             config_file(tmp_path, "b", env=str(second_hopper), normalize_reward=True)]
    done = subprocess.run([sys.executable, FINETUNE_SCRIPT, *stack_args(files, tmp_path / "runs"), "--seeds=0,1"],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sizes = {label: len(cql.load_dataset(cql.TrainConfig(env=str(path))).rewards)
             for label, path in (("hopper-random-tiny", hopper_hdf5), ("hopper-second", second_hopper))}
    assert "4 runs (2 datasets)" in done.stdout
    assert f"{sizes['hopper-random-tiny']}/{sizes['hopper-random-tiny']}/{sizes['hopper-second']}/" in done.stdout
    assert "hopper-random-tiny" in done.stdout.splitlines()[-1] and "hopper-second" in done.stdout.splitlines()[-1]
    runs = assert_each_member_records_itself(tmp_path / "runs", hopper_hdf5, second_hopper)
    for (label, _), run_dir in runs.items():
        own = yaml.safe_load((run_dir / "config.yaml").read_text())
        rows = metrics_rows(run_dir)
        assert [r["step"] for r in rows if "eval_return_mean" in r] == [50]
        assert any("train/episode_return" in r for r in rows)  # its own training env's episodes
        state = load_state_file(run_dir / "checkpoint_50.pt")
        assert state["config"] == own  # a checkpoint of the run alone, with its own dataset's rows
        replay = load_state_file(run_dir / "replay_50.pt")
        assert (replay["n_data"], replay["capacity"], replay["n_added"]) == (sizes[label], sizes[label] + 30, 30)


def test_a_member_ends_as_its_config_alone_and_is_deaf_to_the_others_data(hopper_hdf5, second_hopper, tmp_path):
    """Member (b, seed 9) of the stack [a, b] x [0, 9] crosses the switch and collects its online rows as b's run
    with seed 9 alone does (up to stacked-matmul rounding), and member (a, seed 0) ends bitwise the same when b's
    data is another dataset (of another size, rewards as they are, other episode length)."""
    a = config_file(tmp_path, "a", env=str(hopper_hdf5))
    b = config_file(tmp_path, "b", env=str(second_hopper), normalize_reward=True)  # its online rewards too
    third = write_d4rl_hdf5(tmp_path / "hopper-third.hdf5", random_transitions("Hopper-v4", 1500, seed=7), HOPPER_ATTRS)
    b_other = config_file(tmp_path, "b_other", env=str(third), max_episode_steps=20)
    cql.main(stack_args([a, b], tmp_path / "stack", "--seeds=0,9"))
    cql.main(["--config_path", b, "--seed=9", f"--checkpoints_path={tmp_path / 'alone'}"])
    cql.main(stack_args([a, b_other], tmp_path / "other", "--seeds=0,9"))
    stack, (alone,) = by_member(tmp_path / "stack"), (tmp_path / "alone").iterdir()
    want, got = (load_state_file(d / "checkpoint_50.pt") for d in (alone, stack["hopper-second", 9]))
    for part in ("actor", "critic"):  # Adam turns rounding into steps of up to lr where a gradient is ~0: 3e-3
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=1e-3, atol=3e-3, msg=f"{part}.{name}")
    want_rows, got_rows = (load_state_file(d / "replay_50.pt") for d in (alone, stack["hopper-second", 9]))
    for key in ("observations", "actions", "rewards"):
        torch.testing.assert_close(got_rows[key], want_rows[key], rtol=1e-2, atol=1e-2, msg=key)
    assert (want_rows["n_data"], want_rows["capacity"]) == (got_rows["n_data"], got_rows["capacity"])
    assert want["progress"]["train_episodes"] == got["progress"]["train_episodes"]
    assert want["config"] == {**got["config"], "checkpoints_path": want["config"]["checkpoints_path"]}
    seed_9_of_a = load_state_file(stack["hopper-random-tiny", 9] / "checkpoint_50.pt")  # same seed, other data:
    assert max((seed_9_of_a["critic"][k] - v).abs().max() for k, v in want["critic"].items()) > 5 * 3e-3  # apart
    other = by_member(tmp_path / "other")
    assert_same_finetune_run(stack["hopper-random-tiny", 0], other["hopper-random-tiny", 0], 50)


def test_any_members_dir_resumes_the_whole_stack_exactly(hopper_hdf5, second_hopper, tmp_path):
    """A stack stopped after 50 iterations (20 offline, 30 online), resumed from one member's run dir for 50 more
    online ones, ends with every member's weights, Adam state, replay rows and metrics rows of the stack that ran
    the 100 iterations in one go."""
    files = [config_file(tmp_path, "a", env=str(hopper_hdf5)), config_file(tmp_path, "b", env=str(second_hopper))]
    cql.main(stack_args(files, tmp_path / "whole", "--seeds=3,4", "--online_iterations=80"))
    cql.main(stack_args(files, tmp_path / "cut", "--seeds=3,4"))
    cut = by_member(tmp_path / "cut")
    summary = cql.train(cql.parse_config([f"--resume={cut['hopper-second', 4]}", "--online_iterations=80"]))
    assert summary["iterations"] == 100 and len(summary["runs"]) == 4
    for key, run_dir in by_member(tmp_path / "whole").items():
        assert_same_finetune_run(run_dir, cut[key], 100)
        want, got = (load_state_file(d / "checkpoint_100.pt")["config"] for d in (run_dir, cut[key]))
        assert {**want, "checkpoints_path": None} == {**got, "checkpoints_path": None}


@pytest.mark.parametrize("field, value", [("cql_alpha", 5.0), ("batch_size", 16), ("online_iterations", 40)])
def test_members_that_cannot_share_a_stack_are_one_line_naming_the_field_and_both_configs(
        hopper_hdf5, tmp_path, field, value):
    a, b = config_file(tmp_path, "a", env=str(hopper_hdf5)), config_file(tmp_path, "b", env=str(hopper_hdf5), **{
        field: value})
    with pytest.raises(ConfigError, match=rf"field '{field}': {a} sets .*, {b} sets {value}"):
        cql.train(cql.parse_config(stack_args([a, b], tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()  # nothing was made


def test_members_of_other_shapes_or_without_data_are_one_line(hopper_hdf5, tmp_path):
    assert_other_shapes_are_one_line(FINETUNE_SCRIPT, lambda name, env: config_file(tmp_path, name, env=str(env)),
                                     hopper_hdf5, tmp_path)
    online = [config_file(tmp_path, "c", offline=0, env=str(hopper_hdf5)),
              config_file(tmp_path, "d", offline=0, env="Hopper-v4")]  # a Gymnasium id, no dataset: pure online
    with pytest.raises(ConfigError, match="field 'stack_configs': Hopper-v4 is pure online .* is not"):
        cql.train(cql.parse_config(stack_args(online, tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
