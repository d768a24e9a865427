"""algorithms/finetune/cql.py: the offline-to-online switch, the replay ring, online rewards and
terminals, success and regret on a scripted goal task, pure online SAC learning, bad input."""
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import FINETUNE_SCRIPT, metrics_rows

import algorithms.finetune.cql as cql
import algorithms.offline.cql as offline_cql
from algorithms.common import envs
from algorithms.common.runs import load_state_file

SMALL = ["--batch_size=32", "--cql_n_actions=2", "--n_episodes=2", "--wandb_mode=disabled"]



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


# ------------------------------------------------------------------ a scripted goal task
class ScriptedGoalEnv(gym.Env):
    """Observation [step, episode]; episode k of this instance ends by a known pattern:
    k % 3 == 0: terminates at step 5 with info['success'] True (at that step only);
    k % 3 == 1: never terminates (the registered time limit of 8 truncates it), success False;
    k % 3 == 2: terminates at step 3, success False.  Raw reward: 0.1 * step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode, self.t = -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return np.array([0.0, self.episode]), {}

    def step(self, action):
        self.t += 1
        kind = self.episode % 3
        terminated = (kind == 0 and self.t == 5) or (kind == 2 and self.t == 3)
        info = {"success": kind == 0 and self.t == 5}
        return np.array([float(self.t), self.episode]), 0.1 * self.t, terminated, False, info


GOAL_ENV = "ScriptedGoalFinetuneTest-v0"
if GOAL_ENV not in gym.registry:
    gym.register(GOAL_ENV, entry_point=ScriptedGoalEnv, max_episode_steps=8)


# ------------------------------------------------------------------ the offline -> online switch
def test_switch_changes_cql_alpha_and_logs_both_phases_then_resumes(hopper_hdf5, tmp_path):
    config = cql.parse_config(["--env", str(hopper_hdf5), "--offline_iterations=40", "--online_iterations=60",
                               "--eval_freq=50", "--log_freq=10", "--max_episode_steps=30", "--cql_alpha=10",
                               "--cql_alpha_online=2", f"--checkpoints_path={tmp_path}", *SMALL])
    summary = cql.train(config)
    rows = metrics_rows(summary["run_dir"])
    train_rows = [r for r in rows if "qf1_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(10, 101, 10))
    for r in train_rows:  # not Lagrange: penalty = cql_alpha * (logsumexp Q - data Q), per logged window
        offline = r["step"] <= 40
        assert ("offline_iter" in r) == offline and ("online_iter" in r) == (not offline)
        # 0-based within the phase, as CORL's loop index: t = step - 1, online t - offline_iterations
        assert r["offline_iter" if offline else "online_iter"] == (r["step"] - 1 if offline else r["step"] - 41)
        assert r["cql_alpha"] == (10.0 if offline else 2.0)
        assert r["cql_min_qf1_loss"] / r["cql_qf1_diff"] == pytest.approx(10.0 if offline else 2.0, rel=1e-4)
    episodes = [r for r in rows if "train/episode_return" in r]
    assert episodes and all(r["step"] > 40 and "online_iter" in r for r in episodes)
    for r in episodes:
        assert 0 < r["train/episode_length"] <= 30
        assert r["train/d4rl_normalized_episode_return"] == pytest.approx(
            100 * (r["train/episode_return"] + 20.272305) / (3234.3 + 20.272305))
        assert "train/is_success" not in r  # hopper is not a goal task
    evals = [r for r in rows if "eval_return_mean" in r]
    assert [r["step"] for r in evals] == [50, 100]
    assert all(r["eval/d4rl_normalized_score"] == r["d4rl_normalized_score"] for r in evals)
    assert summary["cql_alpha"] == 2.0 and summary["online_transitions"] == 60 and summary["updates"] == 100

    # Resume from the newest checkpoint: networks, counters and the 60 online rows come back.
    run_dir = Path(summary["run_dir"])
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["checkpoint_100.pt", "checkpoint_50.pt", "replay_100.pt"]
    more = cql.parse_config(["--env", str(hopper_hdf5), "--offline_iterations=40", "--online_iterations=80",
                             "--eval_freq=50", "--log_freq=10", "--max_episode_steps=30", "--cql_alpha_online=2",
                             f"--load_model={run_dir / 'checkpoint_100.pt'}", f"--log_dir={tmp_path / 'more'}",
                             *SMALL])
    resumed = cql.train(more)
    assert resumed["updates"] == 120 and resumed["online_transitions"] == 80 and resumed["cql_alpha"] == 2.0
    training = [(r["step"], r["online_iter"]) for r in metrics_rows(resumed["run_dir"]) if "qf1_loss" in r]
    assert training == [(110, 69), (120, 79)]
    # An older checkpoint's replay file is gone (only the newest is kept): refused, not silently emptied.
    older = cql.TrainConfig(**{**vars(more), "load_model": str(run_dir / "checkpoint_50.pt")})
    with pytest.raises(cql.ConfigError, match="needs its replay file .*replay_50.pt"):
        cql.train(older)


def test_switch_at_the_trainer_and_skipped_penalty_is_the_same_update():
    """train() sets trainer.cql_alpha; with cql_alpha 0 (not Lagrange) the skipped penalty computation
    gives the same update as computing a zero-weighted penalty."""

    class ZeroNotSkipped(float):  # == 0 is False, so losses() takes the full path with weight 0
        def __eq__(self, other):
            return False

        __hash__ = float.__hash__

    config = cql.TrainConfig(cql_alpha=0.0, cql_n_actions=3, q_n_hidden_layers=2)
    trainers = []
    for alpha in (0.0, ZeroNotSkipped(0.0)):
        torch.manual_seed(0)
        trainer = cql.CQL(config, 5, 2, 1.0, torch.device("cpu"))
        trainer.cql_alpha = alpha
        trainers.append(trainer)
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 5, generator=generator), torch.rand(16, 2, generator=generator) * 2 - 1,
             torch.randn(16, generator=generator), torch.randn(16, 5, generator=generator),
             (torch.rand(16, generator=generator) < 0.2).float())
    metrics = []
    for trainer in trainers:
        torch.manual_seed(2)
        metrics.append(trainer.train(batch))
    skipped, full = metrics
    for name in ["policy_loss", "qf1_loss", "qf2_loss", "alpha_loss", "average_qf1", "average_target_q"]:
        torch.testing.assert_close(skipped[name], full[name])
    assert skipped["cql_qf1_diff"] == 0 and skipped["cql_q1_rand"] == 0 and full["cql_qf1_diff"] != 0
    for a, b in zip(trainers[0].critic.parameters(), trainers[1].critic.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(trainers[0].actor.parameters(), trainers[1].actor.parameters()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ replay ring
def _row(value: float):
    return np.full(3, value), np.full(2, value), value, np.full(3, value + 0.5), float(value % 2)


def test_ring_buffer_keeps_the_dataset_first_and_overwrites_the_oldest_rows():
    buffer = cql.ReplayBuffer(5, 3, 2, torch.device("cpu"))
    data = {"observations": np.arange(3)[:, None] * np.ones((3, 3)), "actions": np.zeros((3, 2)),
            "rewards": np.arange(3.0), "next_observations": np.zeros((3, 3)), "terminals": np.zeros(3)}
    buffer.load_dataset(data)
    assert (buffer.size, buffer.pointer, buffer.n_data) == (3, 3, 3)
    for value in [10.0, 11.0, 12.0, 13.0]:  # rows 3, 4, then over dataset rows 0 and 1
        buffer.add(*_row(value))
    assert (buffer.size, buffer.pointer, buffer.n_added) == (5, 2, 4)
    assert buffer.storage["rewards"].tolist() == [12.0, 13.0, 2.0, 10.0, 11.0]
    assert buffer.online_rows().tolist() == [3, 4, 0, 1]  # oldest first
    assert buffer.storage["terminals"].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    batch = buffer.sample(64)
    assert set(batch[2].tolist()) <= {12.0, 13.0, 2.0, 10.0, 11.0} and batch[0].shape == (64, 3)

    # A checkpoint's online part restores the same ring over the re-read dataset.
    restored = cql.ReplayBuffer(5, 3, 2, torch.device("cpu"))
    restored.load_dataset(data)
    restored.load_online_state(buffer.online_state(), "test")
    for key in cql.BUFFER_FIELDS:
        assert torch.equal(restored.storage[key], buffer.storage[key]), key
    assert (restored.pointer, restored.size, restored.n_added) == (2, 5, 4)
    bigger = cql.ReplayBuffer(9, 3, 2, torch.device("cpu"))
    bigger.load_dataset(data)
    with pytest.raises(cql.ConfigError, match="full replay ring of 5 rows, this run's has 9"):
        bigger.load_online_state(buffer.online_state(), "test")

    # A ring that never wrapped may come back into a larger one (a run continued for longer).
    small = cql.ReplayBuffer(6, 3, 2, torch.device("cpu"))
    small.load_dataset(data)
    small.add(*_row(20.0))
    bigger.load_online_state(small.online_state(), "test")
    assert (bigger.pointer, bigger.size) == (4, 4) and bigger.storage["rewards"][:4].tolist() == [0, 1, 2, 20]


def test_online_rewards_get_the_offline_normalization(hopper_hdf5):
    config = cql.TrainConfig(env=str(hopper_hdf5), normalize_reward=True, reward_scale=5.0, reward_bias=-1.0)
    data = cql.load_dataset(config)
    raw = data.rewards.copy()
    transform = cql.make_reward_transform(config, data)
    # The offline script's normalization of the same dataset...
    offline_data = offline_cql.load_dataset(offline_cql.TrainConfig(env=str(hopper_hdf5), normalize_reward=True,
                                                                    reward_scale=5.0, reward_bias=-1.0))
    offline_cql.normalize_rewards(offline_data, offline_cql.TrainConfig(reward_scale=5.0, reward_bias=-1.0))
    np.testing.assert_allclose(transform(raw), offline_data.rewards, rtol=1e-5, atol=1e-5)
    # ...and one raw reward as the env returns it (a Python float) maps to the same stored value.
    for i in [0, 17, len(raw) - 1]:
        assert transform(float(raw[i])) == transform(raw)[i]
    low, high = cql.return_range(raw, data.terminals, 1000)
    assert float(transform(1.0)) == pytest.approx(1000 / (high - low) * 5.0 - 1.0, rel=1e-6)
    # Without a dataset only scale and bias apply; without normalize_reward nothing does.
    assert float(cql.make_reward_transform(config, None)(2.0)) == 9.0
    assert float(cql.make_reward_transform(cql.TrainConfig(reward_scale=5.0), data)(2.0)) == 2.0


# ------------------------------------------------------------------ goal task: terminals, success, regret
def test_goal_task_success_regret_and_stored_terminals(tmp_path):
    config = cql.parse_config([f"--env={GOAL_ENV}", "--offline_iterations=0", "--online_iterations=48",
                               "--warmup_steps=40", "--eval_freq=16", "--log_freq=8", "--cql_alpha_online=0",
                               "--normalize_reward=true", "--reward_scale=2", "--reward_bias=-1", "--seed=3",
                               f"--checkpoints_path={tmp_path}", *SMALL])
    summary = cql.train(config)
    rows = metrics_rows(summary["run_dir"])
    episodes = [r for r in rows if "train/episode_return" in r]
    # Episodes of 5 (success), 8 (truncated) and 3 (terminated) steps: 9 episodes in 48 steps.
    assert [r["train/episode_length"] for r in episodes] == [5, 8, 3] * 3
    assert [r["train/is_success"] for r in episodes] == [1.0, 0.0, 0.0] * 3
    expected_regret = [1 - sum(([1, 0, 0] * 3)[: i + 1]) / (i + 1) for i in range(9)]
    np.testing.assert_allclose([r["train/regret"] for r in episodes], expected_regret)
    assert episodes[0]["train/episode_return"] == pytest.approx(0.1 * (1 + 2 + 3 + 4 + 5))
    # Each eval env instance plays its k-th episode at the k-th evaluation: success, fail, fail.
    evals = [r for r in rows if "eval/success_rate" in r]
    assert [r["eval/success_rate"] for r in evals] == [1.0, 0.0, 0.0]
    np.testing.assert_allclose([r["eval/regret"] for r in evals], [0.0, 0.5, 2 / 3])
    assert summary["updates"] == 8  # warmup iterations act at random and do not update

    # The stored rows: a truncation (step 8) is not a terminal; terminations are; rewards transformed.
    replay = load_state_file(Path(summary["run_dir"]) / "replay_48.pt")
    assert replay["rows"].tolist() == list(range(48)) and replay["n_added"] == 48
    step, episode = replay["next_observations"][:, 0].numpy(), replay["next_observations"][:, 1].numpy()
    terminal = replay["terminals"].numpy()
    ends = {5: 1.0, 8: 0.0, 3: 1.0}
    for i in range(48):
        kind = int(episode[i]) % 3
        last = step[i] == [5, 8, 3][kind]
        assert terminal[i] == (ends[int(step[i])] if last else 0.0), (i, step[i], episode[i])
    np.testing.assert_allclose(replay["rewards"].numpy(), 2 * 0.1 * step - 1, rtol=1e-6)
    assert replay["actions"].abs().max() <= 1.0


def test_step_success_reads_info_or_sparse_reward():
    """algorithms/common/envs.py's step_success and is_goal_task, which the finetune script logs success by."""
    assert envs.step_success(0.0, {"success": True}, False) is True
    assert envs.step_success(1.0, {"is_success": 0.0}, True) is False
    assert envs.step_success(0.0, {"goal_achieved": np.array(True)}, False) is True
    assert envs.step_success(1.0, {}, True) is True and envs.step_success(0.0, {}, True) is False
    assert envs.step_success(1.0, {}, False) is None
    assert envs.is_goal_task("antmaze-umaze-v2") and envs.is_goal_task("D4RL/pen/cloned-v2")
    assert envs.is_goal_task(None, "AdroitHandDoor-v1") and envs.is_goal_task("PointMaze_UMaze-v3")
    assert not envs.is_goal_task("hopper-medium-v2", "Hopper-v4", "/data/halfcheetah.hdf5")


# ------------------------------------------------------------------ pure online: SAC learns Pendulum
def test_pure_online_sac_improves_pendulum(tmp_path):
    config = cql.parse_config(["--env=Pendulum-v1", "--offline_iterations=0", "--online_iterations=4000",
                               "--warmup_steps=1000", "--eval_freq=1000", "--log_freq=500", "--batch_size=128",
                               "--policy_lr=1e-3", "--qf_lr=1e-3", "--cql_alpha_online=0", "--n_episodes=5",
                               "--seed=0", "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
    summary = cql.train(config)
    first, *_, last = summary["eval_returns"]  # the first evaluation is after warmup, before any update
    assert len(summary["eval_returns"]) == 4 and summary["updates"] == 3000
    assert first < -900  # an untrained policy swings nowhere
    assert last > -450 and last > first + 600, summary["eval_returns"]
    rows = [r for r in metrics_rows(summary["run_dir"]) if "qf1_loss" in r]
    assert all(r["cql_min_qf1_loss"] == 0 and r["cql_q1_rand"] == 0 for r in rows)  # penalty skipped
    assert all("online_iter" in r and "offline_iter" not in r for r in rows)


# ------------------------------------------------------------------ config and bad input
def test_defaults_are_corl_finetune_defaults():
    c = cql.TrainConfig()
    # eval_seed None: evaluation seeded from `seed`, as CORL's eval_actor(..., seed=config.seed) (CORL's own
    # eval_seed field only seeds an env that every evaluation reseeds)
    assert (c.eval_seed, c.offline_iterations, c.online_iterations, c.cql_alpha, c.cql_alpha_online) == \
        (None, 1_000_000, 1_000_000, 10.0, 10.0)
    assert c.orthogonal_init is True
    assert (c.q_n_hidden_layers, c.reward_scale, c.reward_bias, c.policy_lr, c.qf_lr) == (2, 1.0, 0.0, 3e-5, 3e-4)
    assert (c.buffer_size, c.batch_size, c.normalize, c.normalize_reward) == (2_000_000, 256, True, False)
    assert cql.is_pure_online(cql.TrainConfig(env="Pendulum-v1", offline_iterations=0))
    assert not cql.is_pure_online(cql.TrainConfig(env="Pendulum-v1"))
    assert not cql.is_pure_online(cql.TrainConfig(env="hopper-medium-v2", offline_iterations=0))


@pytest.mark.parametrize("argv, message", [
    (["--no_such_key=1"], "unknown option '--no_such_key'"),
    (["--cql_alpha_online=ten"], "field 'cql_alpha_online' expects a number, got 'ten'"),
    (["--online_iterations=1.5"], "field 'online_iterations' expects an integer"),
    (["--warmup_steps=-1"], "field 'warmup_steps' must be >= 0"),
    (["--env=Pendulum-v1", "--offline_iterations=0", "--online_iterations=0"], "pure online mode .* needs"),
])
def test_bad_command_line_gives_one_line_error(argv, message):
    with pytest.raises(cql.ConfigError, match=message) as error:
        cql.parse_config(argv)
    assert "\n" not in str(error.value)


def test_gym_env_with_offline_iterations_explains_itself():
    with pytest.raises(cql.DatasetError, match="set offline_iterations=0 to train online from scratch"):
        cql.load_dataset(cql.TrainConfig(env="Pendulum-v1"))


def test_script_exits_2_with_one_line_and_help_shows_new_fields():
    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, "--eval_seed=x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: command line: field 'eval_seed' expects an integer, got 'x'"
    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps the help lines
    assert "--warmup_steps int pure online mode only: first iterations act uniformly at random" in text
    assert "--cql_alpha_online float weight of the CQL penalty during the online iterations" in text
