"""Many seeds in one process (--seeds): each run of a stack is the run it would be alone.

* a stacked run starts from the weights of the one-seed run with its seed, and fed the same
  batches and noise it makes the same updates (parameters and Adam state, float tolerance);
* the runs are independent: another run's data or weights change nothing in a run, bit for bit;
* per-run checkpoints are ordinary one-run checkpoints, and a stack killed with SIGKILL resumes
  to the weights and metrics rows of an uninterrupted stack.
"""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CHILD_ENV,
    OFFLINE_SCRIPT,
    kill_when_written,
    metrics_rows,
    offline_run_args,
    stack_runs,
    update_inputs,
)
from test_losses import VARIANTS

import algorithms.offline.cql as cql
from algorithms.common.config import run_seeds
from algorithms.common.runs import load_state_file

S, A, B, N = 5, 3, 16, 4  # state dim, action dim, batch, cql_n_actions
SEEDS = [3, 7, 11]


def config(**overrides) -> cql.TrainConfig:
    return cql.TrainConfig(cql_n_actions=N, q_n_hidden_layers=2, batch_size=B, bc_steps=1, **overrides)


def single(c: cql.TrainConfig, seed: int) -> cql.CQL:
    torch.manual_seed(seed)  # as train() seeds a one-seed run just before building its trainer
    return cql.CQL(c, S, A, 1.0, torch.device("cpu"))


def draw(gen: torch.Generator, c: cql.TrainConfig):
    """One run's batch and noise, from gen."""
    return update_inputs(gen, (S, A, B, N), next_per_cql_action=c.cql_max_target_backup)


def assert_run_equals(stacked: cql.CQL, run: int, alone: cql.CQL, rtol: float, atol: float, exact: bool = False):
    got, want = stacked.run_state_dict(run), alone.state_dict()
    check = (lambda a, b, msg: torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)) if exact else \
        (lambda a, b, msg: torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg))
    for part in ("actor", "critic", "target_critic"):
        assert list(got[part]) == list(want[part])
        for name in want[part]:
            check(got[part][name], want[part][name], f"run {run}: {part}.{name}")
    check(got["log_alpha"], want["log_alpha"], f"run {run}: log_alpha")
    check(got["log_alpha_prime"], want["log_alpha_prime"], f"run {run}: log_alpha_prime")
    assert set(got["optimizer"]["state"]) == set(want["optimizer"]["state"])
    for index, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            check(got["optimizer"]["state"][index][key], value, f"run {run}: adam[{index}].{key}")
    assert got["total_it"] == want["total_it"]


# --------------------------------------------------------------------------- config
def test_seeds_field_forms_and_errors(tmp_path):
    assert run_seeds(cql.parse_config([])) is None
    assert run_seeds(cql.parse_config(["--seeds=0,3, 5"])) == [0, 3, 5]
    assert run_seeds(cql.parse_config(["--seeds", "3", "--seed=10"])) == [10, 11, 12]
    path = tmp_path / "c.yaml"
    for text, want in (("seeds: 4\n", [0, 1, 2, 3]), ("seeds: [2, 9]\n", [2, 9]), ("seeds: [5]\n", [5]),
                       ("seeds: 1,2\n", [1, 2])):
        path.write_text(text)
        assert run_seeds(cql.parse_config(["--config_path", str(path)])) == want, text
    for bad, message in (("0", "expects a count like 4"), ("a,b", "expects a count"), ("-2", "expects a count"),
                         ("1,1", "lists a seed twice")):
        with pytest.raises(cql.ConfigError, match=f"field 'seeds' {message}") as error:
            cql.parse_config([f"--seeds={bad}"])
        assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- math
def test_stack_starts_from_each_seeds_one_run_weights_and_leaves_the_random_stream():
    c = config()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    assert torch.equal(torch.get_rng_state(), before)
    for run, seed in enumerate(SEEDS):
        assert_run_equals(stacked, run, single(c, seed), 0, 0, exact=True)


@pytest.mark.parametrize("variant", ["default", "lagrange", "max_target_backup", "fixed_alpha"])
def test_a_run_in_a_stack_follows_the_same_updates_as_alone(variant):
    """Fed the same batches and noise, each run of a 3-stack equals its one-seed trainer after 4
    updates (one behaviour-cloning update, then CQL), metrics included."""
    c = config(**VARIANTS[variant])
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    alone = [single(c, seed) for seed in SEEDS]
    gens = [torch.Generator().manual_seed(100 + seed) for seed in SEEDS]
    for update in range(1, 5):
        per_run = [draw(gen, c) for gen in gens]
        phase = stacked.phase(update)
        stacked.total_it += 1
        metrics = stacked.apply_update(*stack_runs(per_run), *phase)
        for run, trainer in enumerate(alone):
            trainer.total_it += 1
            want = trainer.apply_update(*per_run[run], *phase)
            for name in cql.METRIC_NAMES:
                torch.testing.assert_close(metrics[name][run], want[name], rtol=1e-5, atol=1e-6,
                                           msg=f"update {update}, run {run}: {name}")
    for run, trainer in enumerate(alone):
        assert_run_equals(stacked, run, trainer, rtol=1e-5, atol=1e-6)  # Adam: ~lr/300


def test_compiled_stack_losses_and_gradients_equal_eager():
    """torch.compile of a stack's losses (the UpdateStep speed layer) is the same math."""
    c = config(cql_max_target_backup=True)
    eager = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    compiled = copy.deepcopy(eager)
    compiled.losses = torch.compile(compiled.losses)
    gen = torch.Generator().manual_seed(4)
    batch, noise = stack_runs([draw(gen, c) for _ in SEEDS])
    for trainer in (eager, compiled):
        total, trainer.metrics = trainer.losses(batch, noise, False)
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
    for name in cql.METRIC_NAMES:
        torch.testing.assert_close(compiled.metrics[name], eager.metrics[name], rtol=1e-5, atol=1e-5, msg=name)
    for want, got in zip(eager.optimizer.param_groups, compiled.optimizer.param_groups):
        for p, q in zip(want["params"], got["params"]):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def test_runs_are_independent_bit_for_bit():
    """Another run's batch, noise and weights change nothing in runs 0 and 2."""
    c = config(cql_lagrange=True)
    a = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    b = copy.deepcopy(a)
    with torch.no_grad():  # run 1's weights differ
        b.actor.weights[0][1].add_(0.5)
        b.critic.weights[1].unflatten(0, (2, 3))[:, 1].mul_(2.0)
        b.log_alpha[1] = 0.3
    gen = torch.Generator().manual_seed(0)
    for update in range(1, 4):
        per_run = [draw(gen, c) for _ in SEEDS]
        other = list(per_run)
        other[1] = draw(gen, c)  # run 1's data differ
        phase = a.phase(update)
        metrics_a = a.apply_update(*stack_runs(per_run), *phase)
        metrics_b = b.apply_update(*stack_runs(other), *phase)
        for name in cql.METRIC_NAMES:
            assert torch.equal(metrics_a[name][[0, 2]], metrics_b[name][[0, 2]]), name
    a.total_it = b.total_it = 3
    for run in (0, 2):
        assert_run_equals(a, run, _as_single(b, run, c), 0, 0, exact=True)
    assert not torch.equal(a.run_state_dict(1)["actor"]["net.2.weight"], b.run_state_dict(1)["actor"]["net.2.weight"])


def _as_single(stacked: cql.CQL, run: int, c: cql.TrainConfig) -> cql.CQL:
    one = single(c, 0)
    one.load_state_dict(stacked.run_state_dict(run))
    return one


def test_run_states_are_one_run_states_and_load_back_exactly():
    c = config(cql_lagrange=True)
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    step = stacked.update_step(_buffer(), B)
    torch.manual_seed(5)
    for _ in range(3):
        step()
    # A run's state loads into a one-run trainer, which then makes that run's next update.
    states = [stacked.run_state_dict(run) for run in range(len(SEEDS))]
    alone = _as_single(stacked, 1, c)
    assert_run_equals(stacked, 1, alone, 0, 0, exact=True)
    # The states load back into a fresh stack, bit for bit, and both go on the same way.
    again = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=[0, 1, 2])
    again.load_run_state_dicts(states)
    gen = torch.Generator().manual_seed(9)
    per_run = [draw(gen, c) for _ in SEEDS]
    for trainer in (stacked, again):
        trainer.total_it += 1
        trainer.apply_update(*stack_runs(per_run), False, True)
    alone.total_it += 1
    alone.apply_update(*per_run[1], False, True)
    for run in range(len(SEEDS)):
        assert_run_equals(again, run, _as_single(stacked, run, c), 0, 0, exact=True)
    assert_run_equals(stacked, 1, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 run states for a stack of 3"):
        again.load_run_state_dicts(states[:2])


def _buffer(n: int = 500, seed: int = 0) -> cql.ReplayBuffer:
    """A replay buffer of n random transitions (state S, action A)."""
    rng = np.random.default_rng(seed)
    data = cql.OfflineData(
        observations=rng.standard_normal((n, S), dtype=np.float32),
        actions=rng.uniform(-0.99, 0.99, (n, A)).astype(np.float32),
        rewards=rng.standard_normal(n, dtype=np.float32),
        next_observations=rng.standard_normal((n, S), dtype=np.float32),
        terminals=(rng.random(n) < 0.1).astype(np.float32),
        make_env=None, ref_min_score=None, ref_max_score=None, is_locomotion=False, source="test")
    return cql.ReplayBuffer(data, torch.device("cpu"))


def test_update_step_samples_a_batch_per_run_and_sums_metrics_per_run():
    c = config()
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    step = stacked.update_step(_buffer(), B)
    torch.manual_seed(1)
    for _ in range(3):
        step()
    assert step.metric_sum.shape == (len(cql.METRIC_NAMES), len(SEEDS))
    means = step.take_run_means(3)
    assert len(means) == 3 and all(set(m) == set(cql.METRIC_NAMES) for m in means)
    assert len({m["qf1_loss"] for m in means}) == 3  # own batches and noise: different losses
    batch = _buffer().sample(B, (len(SEEDS),))
    assert batch[0].shape == (len(SEEDS), B, S) and batch[2].shape == (len(SEEDS), B)


def test_a_run_of_a_stack_draws_and_trains_as_it_does_alone():
    """Each run draws its batches and noise from its own stream (RunStreams): run k of a stack draws exactly
    what the one-seed run with seed k draws, and its update_step follows that run's updates."""
    c = config()
    torch.manual_seed(5)
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    alone = [single(c, seed) for seed in SEEDS]
    buffer = _buffer()
    noise = stacked.draw_noise(B)
    for run, trainer in enumerate(alone):
        for name, value in trainer.draw_noise(B).items():
            assert torch.equal(noise[name][run], value), (run, name)
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    alone = [single(c, seed) for seed in SEEDS]
    rows = buffer.sample(B, (len(SEEDS),), stacked.streams)[0]
    for run, trainer in enumerate(alone):
        assert torch.equal(rows[run], buffer.sample(B, (), trainer.streams)[0]), run
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    alone = [single(c, seed) for seed in SEEDS]
    steps = [trainer.update_step(buffer, B) for trainer in [stacked, *alone]]
    for _ in range(5):
        for step in steps:
            step()
    for run, trainer in enumerate(alone):
        assert_run_equals(stacked, run, trainer, rtol=1e-5, atol=1e-6)


def test_a_run_of_a_stack_ends_as_the_run_alone(hopper_hdf5, tmp_path):
    """Through train(): seed 9 of a stack (0, 9) ends with the weights of the run with seed 9 alone, up to the
    float rounding of stacked matmuls, and its metrics rows agree to that rounding."""
    cql.main(offline_run_args(hopper_hdf5, tmp_path / "stack", 60) + ["--seeds=0,9", "--n_episodes=1"])
    cql.main(offline_run_args(hopper_hdf5, tmp_path / "alone", 60) + ["--seed=9", "--n_episodes=1"])
    stacked, (alone,) = by_seed(tmp_path / "stack")[9], (tmp_path / "alone").iterdir()
    want, got = load_state_file(alone / "checkpoint_60.pt"), load_state_file(stacked / "checkpoint_60.pt")
    other = load_state_file(by_seed(tmp_path / "stack")[0] / "checkpoint_60.pt")
    for part in ("actor", "critic"):  # Adam turns rounding into steps of up to lr where a gradient is ~0: 3e-3
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=1e-3, atol=3e-3, msg=f"{part}.{name}")
    # the tolerance tells runs apart: seed 0's weights are far from seed 9's
    assert max((other["critic"][k] - v).abs().max() for k, v in want["critic"].items()) > 0.1
    for want_row, got_row in zip(metrics_rows(alone), metrics_rows(stacked), strict=True):
        assert want_row.keys() == got_row.keys()
        for key, value in want_row.items():
            assert got_row[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


# --------------------------------------------------------------------------- runs
def run_args(hopper_hdf5: Path, checkpoints: Path, updates: int = 120) -> list:
    return offline_run_args(hopper_hdf5, checkpoints, updates) + ["--seeds=4,9", "--q_n_hidden_layers=2"]


def by_seed(folder: Path) -> dict:
    return {int(d.name.split("-")[-2]): d for d in folder.iterdir()}


def test_sigkilled_stack_resumes_to_the_same_weights_and_metrics_per_seed(hopper_hdf5, tmp_path):
    # The reference: one uninterrupted stack of seeds 4 and 9, a run directory per seed.
    done = subprocess.run([sys.executable, OFFLINE_SCRIPT, *run_args(hopper_hdf5, tmp_path / "a")], env=CHILD_ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over 2 seeds" in done.stdout
    reference = by_seed(tmp_path / "a")
    assert sorted(reference) == [4, 9]
    for seed, run_dir in reference.items():
        assert run_dir.name.startswith(f"CQL-hopper-random-tiny-{seed}-")
        assert [p.name for p in cql.checkpoint_files(run_dir)] == [f"checkpoint_{s}.pt" for s in (30, 60, 90, 120)]
        got = metrics_rows(run_dir)
        assert [r["step"] for r in got if "qf1_loss" in r] == [20, 40, 60, 80, 100, 120]
        assert [r["step"] for r in got if "d4rl_normalized_score" in r] == [60, 120]
        # Each checkpoint is an ordinary one-run checkpoint.
        one = cql.CQL(cql.TrainConfig(q_n_hidden_layers=2), 11, 3, 1.0, torch.device("cpu"))
        cql.load_checkpoints([str(run_dir / "checkpoint_120.pt")], one, "load_model")
        assert one.total_it == 120
    assert metrics_rows(reference[4]) != metrics_rows(reference[9])

    # The same stack, killed (SIGKILL) once its second checkpoint exists.
    process = subprocess.Popen([sys.executable, OFFLINE_SCRIPT, *run_args(hopper_hdf5, tmp_path / "b")],
                               env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(process, tmp_path / "b", "checkpoint_60.pt", runs=2, settle=0.3)
    killed = by_seed(tmp_path / "b")
    assert not (killed[9] / "checkpoint_120.pt").exists(), "killed too late to test anything"
    # As if the kill came between the two runs' checkpoint writes: seed 9 lacks its newest one.
    cql.checkpoint_files(killed[9])[-1].unlink()

    result = subprocess.run([sys.executable, OFFLINE_SCRIPT, f"--resume={killed[4]}"], env=CHILD_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed at update" in result.stdout
    for seed in (4, 9):
        want = load_state_file(reference[seed] / "checkpoint_120.pt")
        got = load_state_file(killed[seed] / "checkpoint_120.pt")
        for part in ("actor", "critic", "target_critic"):
            for name in want[part]:
                assert torch.equal(want[part][name], got[part][name]), (seed, part, name)
        assert torch.equal(want["log_alpha"], got["log_alpha"])
        for index, state in want["optimizer"]["state"].items():
            for key in state:
                assert torch.equal(state[key], got["optimizer"]["state"][index][key]), (seed, index, key)
        assert metrics_rows(killed[seed]) == metrics_rows(reference[seed]), seed  # every row once, same values, order


def test_foreground_evaluator_of_a_stack_run_draws_no_random_numbers():
    import gymnasium as gym

    stacked = cql.CQL(config(), 11, 3, 1.0, torch.device("cpu"), seeds=SEEDS)
    before = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):  # as train() builds a stack's one-run actor for its evaluators
        template = cql.TanhGaussianActor(11, 3, 1.0)
    evaluator = cql.Evaluator(gym.make("Hopper-v4"), lambda: gym.make("Hopper-v4", max_episode_steps=5), 2,
                              cql.evaluate, (SEEDS[1], np.zeros(11), np.ones(11)), template, background=False)
    assert torch.equal(torch.get_rng_state(), before)
    evaluator.submit(1, cql.actor_weights(stacked.actor, 1))
    torch.manual_seed(SEEDS[1])  # run 1's actor is the one-seed actor: the same returns
    alone = cql.CQL(config(), 11, 3, 1.0, torch.device("cpu")).actor
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("Hopper-v4", max_episode_steps=5)] * 2)
    np.testing.assert_array_equal(evaluator.collect()[0][1], cql.evaluate(envs, alone, SEEDS[1], np.zeros(11),
                                                                          np.ones(11)))
    evaluator.close()
