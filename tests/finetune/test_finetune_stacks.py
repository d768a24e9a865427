"""Finetune stacks of members: each member's own replay ring (dataset, size, pointer, capacity)."""
import numpy as np
import pytest
import torch

import algorithms.finetune.cql as cql


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
