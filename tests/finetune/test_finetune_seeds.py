"""algorithms/finetune/cql.py with --seeds: each run of a stack is the run it would be alone.

* fed the same batches and noise, a stacked run makes the updates of its one-seed trainer
  (offline penalty, the switch to cql_alpha_online, the penalty-free SAC phase), rtol 1e-5;
* the runs are independent: another run's data or weights change nothing in a run, bit for bit;
* each run has its own replay ring (its own online rows), training env, run dir and metrics;
* a short 2-seed run across the switch writes both phases' metrics per run, and each run's
  checkpoint is an ordinary one-run checkpoint;
* a stack killed with SIGKILL (offline, then online) resumes to an uninterrupted stack's runs.
"""
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
    kill_when_written,
    metrics_rows,
    stack_runs,
    update_inputs,
)

import algorithms.finetune.cql as cql
from algorithms.common.runs import checkpoint_files, load_state_file

S, A, B, N = 5, 3, 16, 4  # state dim, action dim, batch, cql_n_actions
SEEDS = [3, 7, 11]
SMALL = ["--batch_size=32", "--cql_n_actions=2", "--n_episodes=2", "--wandb_mode=disabled"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def config(**overrides) -> cql.TrainConfig:
    return cql.TrainConfig(cql_n_actions=N, q_n_hidden_layers=2, batch_size=B, bc_steps=1, **overrides)


def single(c: cql.TrainConfig, seed: int) -> cql.CQL:
    torch.manual_seed(seed)  # as train() seeds a one-seed run just before building its trainer
    return cql.CQL(c, S, A, 1.0, torch.device("cpu"))


def draw(gen: torch.Generator):
    """One run's batch and noise, from gen."""
    return update_inputs(gen, (S, A, B, N))


def assert_run_equals(stacked, run, alone, rtol, atol):
    got, want = stacked.run_state_dict(run), alone.state_dict()
    for part in ("actor", "critic", "target_critic"):
        for name in want[part]:
            torch.testing.assert_close(got[part][name], want[part][name], rtol=rtol, atol=atol,
                                       msg=f"run {run}: {part}.{name}")
    for part in ("log_alpha", "log_alpha_prime"):
        torch.testing.assert_close(got[part], want[part], rtol=rtol, atol=atol)
    for index, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"]["state"][index][key], value, rtol=rtol, atol=atol)


def run_updates(c, stacked, alone, gens, updates, switch_at=None):
    """updates updates of the stack and of each one-run trainer on the same data; cql_alpha switches
    to cql_alpha_online before update switch_at. Returns the stack's metrics of each update."""
    history = []
    for update in range(1, updates + 1):
        if update == switch_at:
            for trainer in [stacked, *alone]:
                trainer.cql_alpha = c.cql_alpha_online
        per_run = [draw(gen) for gen in gens]
        phase = stacked.phase(update)
        stacked.total_it += 1
        metrics = stacked.apply_update(*stack_runs(per_run), *phase)
        history.append(metrics)
        for run, trainer in enumerate(alone):
            trainer.total_it += 1
            want = trainer.apply_update(*per_run[run], *trainer.phase(update))
            for name in cql.METRIC_NAMES:
                torch.testing.assert_close(metrics[name][run], want[name], rtol=1e-5, atol=1e-6,
                                           msg=f"update {update}, run {run}: {name}")
    return history


@pytest.mark.parametrize("overrides", [
    {"cql_alpha": 10.0, "cql_alpha_online": 2.0},  # penalty offline and online, switch in between
    {"cql_alpha": 5.0, "cql_alpha_online": 0.0},  # online: plain SAC, the penalty is not computed
    {"cql_alpha": 5.0, "cql_alpha_online": 1.0, "cql_lagrange": True},
])
def test_a_run_in_a_stack_follows_the_same_updates_as_alone_across_the_switch(overrides):
    c = config(**overrides)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
    assert torch.equal(torch.get_rng_state(), before)  # building the stack draws nothing
    alone = [single(c, seed) for seed in SEEDS]
    for run in range(len(SEEDS)):
        assert_run_equals(stacked, run, alone[run], 0, 0)  # run i starts as the one-seed run of seeds[i]
    gens = [torch.Generator().manual_seed(100 + seed) for seed in SEEDS]
    run_updates(c, stacked, alone, gens, updates=5, switch_at=3)
    for run, trainer in enumerate(alone):
        # fp32, sums in another order: Adam's first steps (each moves a critic weight by up to
        # qf_lr = 3e-4) turn rounding in near-zero gradients into differences of up to ~2.4e-6
        # in a handful of the 10^5 weights under CORL finetune's sqrt(2)-gain initialisation.
        assert_run_equals(stacked, run, trainer, rtol=1e-5, atol=1e-5)


def test_runs_are_independent_bit_for_bit():
    """Changing run 1's batches (and, before, its weights) leaves runs 0 and 2 exactly as they were."""
    c = config(cql_alpha=10.0, cql_alpha_online=2.0)

    def train(perturb: bool):
        stacked = cql.CQL(c, S, A, 1.0, torch.device("cpu"), seeds=SEEDS)
        if perturb:
            with torch.no_grad():
                stacked.actor.weights[0][1].mul_(3.0)
                stacked.critic.weights[0].unflatten(0, (2, len(SEEDS)))[:, 1].add_(0.5)
        gens = [torch.Generator().manual_seed(100 + seed) for seed in SEEDS]
        for update in range(1, 5):
            if update == 3:
                stacked.cql_alpha = c.cql_alpha_online
            per_run = [draw(gen) for gen in gens]
            if perturb:
                batch, noise = per_run[1]
                per_run[1] = ((batch[0] * 5, batch[1], batch[2] + 3, *batch[3:]), noise)
            stacked.total_it += 1
            stacked.apply_update(*stack_runs(per_run), *stacked.phase(update))
        return stacked

    base, changed = train(False), train(True)
    for run in (0, 2):
        got, want = changed.run_state_dict(run), base.run_state_dict(run)
        for part in ("actor", "critic", "target_critic"):
            for name in want[part]:
                assert torch.equal(got[part][name], want[part][name]), f"run {run}: {part}.{name}"
        for index, state in want["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(got["optimizer"]["state"][index][key], value)
    assert not torch.equal(changed.run_state_dict(1)["actor"]["net.0.weight"],
                           base.run_state_dict(1)["actor"]["net.0.weight"])


def test_each_run_has_its_own_replay_ring():
    """The dataset in every ring, then run i's online rows only in ring i; batches of run i come from
    ring i; a run's online state is a one-run buffer's."""
    n = 3
    buffer = cql.ReplayBuffer(6, 2, 1, torch.device("cpu"), runs=(n,))
    data = {"observations": np.zeros((2, 2), np.float32), "actions": np.zeros((2, 1), np.float32),
            "rewards": np.full(2, -1.0, np.float32), "next_observations": np.zeros((2, 2), np.float32),
            "terminals": np.zeros(2, np.float32)}
    buffer.load_dataset(data)
    for t in range(6):  # wraps: the dataset rows are overwritten first
        runs = np.arange(n, dtype=np.float32)
        buffer.add(np.stack([[r, t] for r in runs]), runs[:, None], 100 * runs + t, np.zeros((n, 2)),
                   np.zeros(n))
    assert buffer.size == 6 and buffer.n_added == 6 and buffer.pointer == 2
    obs, actions, rewards, _, _ = buffer.sample(64, (n,))
    assert obs.shape == (n, 64, 2) and rewards.shape == (n, 64)
    for run in range(n):
        assert torch.all(actions[run] == run) and torch.all(obs[run, :, 0] == run)
        assert set(rewards[run].tolist()) == {100 * run + t for t in range(6)}
        one = cql.ReplayBuffer(6, 2, 1, torch.device("cpu"))
        one.load_dataset(data)
        one.load_online_state(buffer.online_state(run), "test")
        assert torch.equal(one.storage["rewards"], buffer.storage["rewards"][run])


def test_two_seed_run_crosses_the_switch_with_its_own_dirs_metrics_and_episodes(hopper_hdf5, tmp_path, capsys):
    argv = ["--env", str(hopper_hdf5), "--seeds=4,9", "--offline_iterations=20", "--online_iterations=40",
            "--eval_freq=30", "--log_freq=10", "--max_episode_steps=10", "--cql_alpha=10", "--cql_alpha_online=2",
            f"--checkpoints_path={tmp_path}", *SMALL]
    summary = cql.train(cql.parse_config(argv))
    assert summary["updates"] == 60 and summary["online_transitions"] == 40 and summary["cql_alpha"] == 2.0
    dirs = [Path(d) for d in summary["run_dirs"]]
    assert len(set(dirs)) == 2 and [d.name.split("-")[-2] for d in dirs] == ["4", "9"]
    episode_returns, online_obs = [], []
    for run_dir in dirs:
        rows = metrics_rows(run_dir)
        train_rows = [r for r in rows if "qf1_loss" in r]
        assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
        for r in train_rows:
            offline = r["step"] <= 20
            assert ("offline_iter" in r) == offline and r["cql_alpha"] == (10.0 if offline else 2.0)
            assert r["cql_min_qf1_loss"] / r["cql_qf1_diff"] == pytest.approx(10.0 if offline else 2.0, rel=1e-4)
        episodes = [r for r in rows if "train/episode_return" in r]
        assert episodes and all(r["step"] > 20 and 0 < r["train/episode_length"] <= 10 for r in episodes)
        episode_returns.append([r["train/episode_return"] for r in episodes])
        assert [r["step"] for r in rows if "eval_return_mean" in r] == [30, 60]
        own = cql.parse_config(["--config_path", str(run_dir / "config.yaml")])  # the run's; stack.yaml: the stack's
        assert (own.seed, own.seeds) == (int(run_dir.name.split("-")[-2]), None)
        # each run's checkpoint is a one-run checkpoint: a one-seed trainer and ring load it
        assert sorted(p.name for p in run_dir.glob("*.pt")) == ["checkpoint_30.pt", "checkpoint_60.pt",
                                                                 "replay_60.pt"]
        one_run = cql.parse_config(argv[:2] + SMALL)
        data = cql.load_dataset(one_run)
        trainer = cql.CQL(one_run, 11, 3, 1.0, torch.device("cpu"))
        buffer = cql.ReplayBuffer(len(data.rewards) + 40, 11, 3, torch.device("cpu"))
        buffer.load_dataset({key: getattr(data, key) for key in cql.BUFFER_FIELDS})
        (state,) = cql.load_checkpoints([str(run_dir / "checkpoint_60.pt")], trainer, buffer)
        assert state["total_it"] == 60 and state["progress"]["online_transitions"] == 40 and buffer.n_added == 40
        online_obs.append(buffer.online_state()["observations"])
    assert not torch.equal(online_obs[0], online_obs[1])  # each ring holds its own run's transitions
    assert episode_returns[0] != episode_returns[1]  # own env seeds, own actors
    assert summary["runs"][0]["eval_returns"] != summary["runs"][1]["eval_returns"]
    scores = [run["last_score"] for run in summary["runs"]]  # the summary line names every run's score
    assert None not in scores and summary["runs"][0]["best_score"] is not None
    assert (f"normalized score last {np.mean(scores):.1f} +- {np.std(scores):.1f} over 2 seeds "
            f"({scores[0]:.1f}, {scores[1]:.1f})") in capsys.readouterr().out


def test_load_model_starts_every_run_of_a_stack_from_the_one_checkpoint(hopper_hdf5, tmp_path):
    """A one-run checkpoint taken online, loaded with --seeds=2,5: each run starts with its weights, Adam
    state, alphas, iteration and online replay rows, then goes its own way (own env seed, own batches)."""
    first = ["--env", str(hopper_hdf5), "--offline_iterations=20", "--online_iterations=20", "--eval_freq=40",
             "--log_freq=10", "--max_episode_steps=10", "--cql_alpha_online=2", *SMALL]
    done = cql.train(cql.parse_config([*first, f"--checkpoints_path={tmp_path / 'one'}"]))
    checkpoint = Path(done["run_dir"]) / "checkpoint_40.pt"
    saved = load_state_file(checkpoint)
    one_buffer_rows = load_state_file(Path(done["run_dir"]) / saved["replay_file"])

    c = cql.parse_config([*first, "--seeds=2,5", f"--load_model={checkpoint}"])
    data = cql.load_dataset(c)
    trainer = cql.CQL(c, 11, 3, 1.0, torch.device("cpu"), seeds=[2, 5])
    buffer = cql.ReplayBuffer(len(data.rewards) + 20, 11, 3, torch.device("cpu"), runs=(2,))
    buffer.load_dataset({key: getattr(data, key) for key in cql.BUFFER_FIELDS})
    cql.load_checkpoints([str(checkpoint)], trainer, buffer)
    assert trainer.total_it == 40 and buffer.n_added == 20
    for run in range(2):
        state = trainer.run_state_dict(run)
        for part in ("actor", "critic", "target_critic"):
            for name, value in saved[part].items():
                assert torch.equal(state[part][name], value), (run, part, name)
        for part in ("log_alpha", "log_alpha_prime"):
            assert torch.equal(state[part], torch.as_tensor(saved[part]))
        for j, moments in saved["optimizer"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state["optimizer"]["state"][j][key], moments[key]), (run, j, key)
        assert torch.equal(buffer.online_state(run)["observations"], one_buffer_rows["observations"])

    more = cql.parse_config([*first, "--seeds=2,5", f"--load_model={checkpoint}", "--online_iterations=40",
                             f"--checkpoints_path={tmp_path / 'stack'}"])
    summary = cql.train(more)
    assert summary["updates"] == 60 and summary["online_transitions"] == 40
    dirs = [Path(d) for d in summary["run_dirs"]]
    assert [d.name.split("-")[-2] for d in dirs] == ["2", "5"]
    for run_dir in dirs:
        assert [r["step"] for r in metrics_rows(run_dir) if "qf1_loss" in r] == [50, 60]  # on from iteration 40
        assert sorted(p.name for p in run_dir.glob("*.pt")) == ["checkpoint_60.pt", "replay_60.pt"]
    ends = [load_state_file(d / "checkpoint_60.pt")["actor"] for d in dirs]
    assert any(not torch.equal(ends[0][k], ends[1][k]) for k in ends[0])  # the runs went their own ways


def test_sigkilled_stack_resumes_twice_across_the_switch_to_the_same_runs(hopper_hdf5, tmp_path):
    """A 2-seed stack killed offline and again online, resumed from one of its run dirs each time,
    ends with each run's weights, Adam state, replay rows and metrics rows equal to an uninterrupted stack's."""
    args = [*finetune_run_args(hopper_hdf5, tmp_path / "a", offline=60, online=80), "--seeds=5,8"]
    subprocess.run([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, check=True, capture_output=True,
                   timeout=600)
    args_b = [*finetune_run_args(hopper_hdf5, tmp_path / "b", offline=60, online=80), "--seeds=5,8"]
    first = subprocess.Popen([sys.executable, FINETUNE_SCRIPT, *args_b], env=CHILD_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(first, tmp_path / "b", "checkpoint_20.pt", runs=2)
    killed = sorted((tmp_path / "b").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    assert not any((d / "checkpoint_60.pt").exists() for d in killed), "killed too late to cross the switch"
    second = subprocess.Popen([sys.executable, FINETUNE_SCRIPT, f"--resume={killed[1]}"], env=CHILD_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(second, tmp_path / "b", "checkpoint_100.pt", runs=2)
    assert not all((d / "checkpoint_140.pt").exists() for d in killed), "killed too late to test anything"
    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, f"--resume={killed[0]}"], env=CHILD_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = sorted((tmp_path / "a").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    for want, got in zip(reference, killed):
        assert_same_finetune_run(want, got, 140)
        assert not list(got.glob(".*.tmp")) and [p.name for p in got.glob("replay_*.pt")] == ["replay_140.pt"]
    assert metrics_rows(killed[0]) != metrics_rows(killed[1])


# Runs the finetune script, but the process dies (os._exit: no clean-up, as SIGKILL) when the stack is
# about to write run 1's files of iteration 100, after run 0's are written.
_DIE_BETWEEN_RUNS = """
import os, sys
import algorithms.finetune.cql as cql
write = cql.save_checkpoint
def save_checkpoint(run_dir, step, *args, run=None, **kwargs):
    if run == 1 and step == 100:
        os._exit(9)
    return write(run_dir, step, *args, run=run, **kwargs)
cql.save_checkpoint = save_checkpoint
cql.main(sys.argv[1:])
"""


def test_stack_killed_between_two_runs_checkpoint_writes_resumes_to_the_same_runs(hopper_hdf5, tmp_path):
    """Run 0 has its files of iteration 100, run 1 not yet: the stack resumes both from iteration 80, which
    still has both runs' replay files (old files go only once every run has the new ones)."""
    root = Path(__file__).resolve().parents[2]
    args = [*finetune_run_args(hopper_hdf5, tmp_path / "a", offline=60, online=80), "--seeds=5,8"]
    subprocess.run([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, check=True, capture_output=True,
                   timeout=600)
    args_b = [*finetune_run_args(hopper_hdf5, tmp_path / "b", offline=60, online=80), "--seeds=5,8"]
    died = subprocess.run([sys.executable, "-c", _DIE_BETWEEN_RUNS, *args_b], env=CHILD_ENV, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == 9, died.stderr[-2000:]
    killed = sorted((tmp_path / "b").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    assert [p.name for p in checkpoint_files(killed[0])][-2:] == ["checkpoint_80.pt", "checkpoint_100.pt"]
    assert {p.name for p in killed[0].glob("replay_*.pt")} == {"replay_80.pt", "replay_100.pt"}
    assert checkpoint_files(killed[1])[-1].name == "checkpoint_80.pt"
    assert [p.name for p in killed[1].glob("replay_*.pt")] == ["replay_80.pt"]

    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, f"--resume={killed[0]}"], env=CHILD_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed at iteration 80" in result.stdout
    reference = sorted((tmp_path / "a").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    for want, got in zip(reference, killed):
        assert_same_finetune_run(want, got, 140)
        assert [p.name for p in got.glob("replay_*.pt")] == ["replay_140.pt"]


def test_a_run_of_a_stack_ends_as_the_run_alone(hopper_hdf5, tmp_path):
    """Each run draws its batches, noise and online actions from its own stream: seed 9 of a stack (0, 9)
    crosses the switch and collects online rows as the run with seed 9 alone does, up to the float rounding
    of stacked matmuls."""
    cql.main(finetune_run_args(hopper_hdf5, tmp_path / "stack", offline=20, online=30) + ["--seeds=0,9"])
    cql.main(finetune_run_args(hopper_hdf5, tmp_path / "alone", offline=20, online=30) + ["--seed=9"])
    (stacked,) = [d for d in (tmp_path / "stack").iterdir() if d.name.split("-")[-2] == "9"]
    (alone,) = (tmp_path / "alone").iterdir()
    want, got = load_state_file(alone / "checkpoint_50.pt"), load_state_file(stacked / "checkpoint_50.pt")
    for part in ("actor", "critic"):  # Adam turns rounding into steps of up to lr where a gradient is ~0: 3e-3
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=1e-3, atol=3e-3, msg=f"{part}.{name}")
    want_rows, got_rows = (load_state_file(d / "replay_50.pt") for d in (alone, stacked))
    for key in ("observations", "actions", "rewards"):
        torch.testing.assert_close(got_rows[key], want_rows[key], rtol=1e-2, atol=1e-2, msg=key)
    assert want["progress"]["train_episodes"] == got["progress"]["train_episodes"]
