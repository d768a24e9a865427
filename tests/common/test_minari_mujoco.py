"""Minari's MuJoCo locomotion datasets (mujoco/<task>/<level>-v0 on Gymnasium's v5 envs), made here from
random episodes under the real ids: D4RL's reference returns, CORL's reward normalisation, every episode's
last transition kept, the configs train, a dataset without references logs raw returns. The loading is
algorithms/common/data.py's, checked once; each script's reward normalisation and runs are its own."""
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import metrics_rows

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common import data as common_data
from algorithms.common.config import ConfigError

minari = pytest.importorskip("minari")
from tools.rollouts import random_episodes, write_minari_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULES = {"offline": offline_cql, "finetune": finetune_cql}
# D4RL's random and expert returns (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE), written out here.
D4RL_REFERENCES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}
V5_ENVS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def make_dataset(dataset_id: str, env_id: str, n_episodes: int, max_episode_steps: int = 1000, seed: int = 0,
                 **metadata) -> list:
    """A local Minari dataset of uniformly random actions (episode e reset with seed + e); its episodes."""
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    write_minari_dataset(dataset_id, random_episodes(env, n_episodes, seed), env, **metadata)
    return list(minari.load_dataset(dataset_id).iterate_episodes())


def eval_rows(run_dir: Path, key: str) -> list:
    rows = metrics_rows(run_dir)
    return [r for r in rows if key in r]


# ----------------------------------------------------------------------- references, layout, locomotion
@pytest.mark.parametrize("task", ["halfcheetah", "hopper", "walker2d", "ant"])
def test_mujoco_dataset_gets_d4rl_references_and_its_env_sees_what_it_stored(task):
    dataset_id = f"mujoco/{task}/medium-v0"
    episodes = make_dataset(dataset_id, V5_ENVS[task], n_episodes=2, max_episode_steps=20)
    with pytest.raises(ValueError, match="Reference score not provided"):  # Minari has none for these
        minari.get_normalized_score(minari.load_dataset(dataset_id), np.zeros(1))
    data = common_data.load_dataset(offline_cql.TrainConfig(env=dataset_id))
    assert (data.ref_min_score, data.ref_max_score) == D4RL_REFERENCES[task]
    assert data.ref_origin == f"D4RL's {task} random and expert returns; the Minari dataset stores none"
    assert data.is_locomotion == (task != "ant")  # CORL's modify_reward rescales these three only
    # The eval env is the dataset's own v5 env, and it produces what the dataset stored: same layout
    # (Ant-v5's 105 dims: 27 of position and velocity, then the contact forces of 13 bodies), same values.
    env = data.make_env()
    assert env.spec.id == V5_ENVS[task]
    common_data.check_dataset_matches_env(data, env)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(data.observations[0], obs, rtol=1e-6, atol=1e-6)
    next_obs = env.step(episodes[0].actions[0])[0]
    np.testing.assert_allclose(data.next_observations[0], next_obs, rtol=1e-5, atol=1e-5)
    if task == "ant":
        assert data.observations.shape[1] == 105 and np.abs(data.observations[:, 27:]).sum() > 0


def test_dataset_references_come_first_and_the_config_overrides_both():
    make_dataset("mujoco/hopper/expert-v0", "Hopper-v5", n_episodes=1, max_episode_steps=10,
                 ref_min_score=1.0, ref_max_score=2.0)
    data = common_data.load_dataset(offline_cql.TrainConfig(env="mujoco/hopper/expert-v0"))
    assert (data.ref_min_score, data.ref_max_score, data.ref_origin) == (1.0, 2.0, "")
    config = offline_cql.TrainConfig(env="mujoco/hopper/expert-v0", ref_max_score=50.0)
    data = common_data.load_dataset(config)
    assert (data.ref_min_score, data.ref_max_score) == (1.0, 50.0)
    line = common_data.reference_scores_line(config, data.source, data.ref_min_score, data.ref_max_score,
                                             data.ref_origin)
    assert line == "normalized score: 0 at return 1, 100 at return 50 (ref_max_score from the config)"


def test_inverted_references_stop_when_the_config_set_one_and_warn_when_both_are_the_datasets():
    make_dataset("mujoco/hopper/expert-v0", "Hopper-v5", n_episodes=1, max_episode_steps=10,
                 ref_min_score=5.0, ref_max_score=1.0)  # as a dataset tool's learner that got worse writes them
    config = offline_cql.TrainConfig(env="mujoco/hopper/expert-v0")
    data = common_data.load_dataset(config)
    line = common_data.reference_scores_line(config, data.source, data.ref_min_score, data.ref_max_score,
                                             data.ref_origin)
    assert line == ("Minari dataset mujoco/hopper/expert-v0: warning: its reference returns are not increasing "
                    "(ref_min_score 5 >= ref_max_score 1), so the normalized score means little; set both to override")
    config = offline_cql.TrainConfig(env="mujoco/hopper/expert-v0", ref_max_score=5.0)
    with pytest.raises(ConfigError, match="^Minari dataset mujoco/hopper/expert-v0: fields 'ref_min_score' "
                       "\\(5.0\\) >= 'ref_max_score' \\(5.0\\) \\(ref_max_score from the config\\): the return"):
        data = common_data.load_dataset(config)
        common_data.reference_scores_line(config, data.source, data.ref_min_score, data.ref_max_score,
                                          data.ref_origin)


# ----------------------------------------------------------------------- transitions and rewards
def test_truncated_episode_keeps_its_last_transition_with_its_real_next_state():
    episodes = make_dataset("mujoco/hopper/simple-v0", "Hopper-v5", n_episodes=8, max_episode_steps=12)
    truncated = [e for e in episodes if e.truncations[-1] and not e.terminations[-1]]
    assert truncated, "random Hopper-v5 should outlast 12 steps in some episode"
    data = common_data.load_dataset(offline_cql.TrainConfig(env="mujoco/hopper/simple-v0"))
    assert len(data.rewards) == sum(len(e.rewards) for e in episodes)  # no row dropped
    end = 0
    for e in episodes:
        end += len(e.rewards)
        last = end - 1
        np.testing.assert_allclose(data.observations[last], e.observations[-2], rtol=1e-6)
        np.testing.assert_allclose(data.next_observations[last], e.observations[-1], rtol=1e-6)  # the real s'
        assert data.terminals[last] == float(e.terminations[-1])  # a time limit is no terminal
        assert data.episode_ends[last] and data.episode_ends[last - len(e.rewards) + 1: last].sum() == 0
    assert sum(data.terminals) == sum(e.terminations[-1] for e in episodes) < len(episodes)
    # D4RL's qlearning_dataset, given the same rows with timeouts, has no s' for a cut episode: it drops the row.
    d4rl = {"observations": np.concatenate([e.observations[:-1] for e in episodes]), "actions": data.actions,
            "rewards": data.rewards, "terminals": data.terminals,
            "timeouts": np.concatenate([e.truncations & ~e.terminations for e in episodes])}
    assert len(common_data.qlearning_transitions(d4rl)["rewards"]) == len(data.rewards) - len(truncated) - (
        0 if d4rl["timeouts"][-1] else 1)


@pytest.mark.parametrize("task, scaled", [("hopper", True), ("ant", False)])
def test_reward_normalisation_scales_returns_to_a_1000_range_in_both_scripts(task, scaled):
    # Episodes cut at 12 steps: CORL's split (terminal or 1000 steps) would merge them into one; the
    # episodes' own ends give the range of their returns.
    episodes = make_dataset(f"mujoco/{task}/medium-v0", V5_ENVS[task], n_episodes=6, max_episode_steps=12)
    returns = [float(np.sum(e.rewards, dtype=np.float32)) for e in episodes]
    factor = 1000.0 / (max(returns) - min(returns)) if scaled else 1.0
    raw = np.concatenate([e.rewards for e in episodes]).astype(np.float32)
    config = offline_cql.TrainConfig(env=f"mujoco/{task}/medium-v0", normalize_reward=True, reward_scale=2.0,
                                     reward_bias=-1.0)
    data = offline_cql.load_dataset(config)
    offline_cql.normalize_rewards(data, config)
    np.testing.assert_allclose(data.rewards, raw * factor * 2.0 - 1.0, rtol=1e-4, atol=1e-4)
    fconfig = finetune_cql.TrainConfig(env=f"mujoco/{task}/medium-v0", normalize_reward=True, reward_scale=2.0,
                                       reward_bias=-1.0)
    transform = finetune_cql.make_reward_transform(fconfig, finetune_cql.load_dataset(fconfig))
    np.testing.assert_allclose(transform(raw), data.rewards, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- whole runs
def test_config_loads_trains_and_scores_on_the_d4rl_references(tmp_path, capsys, one_thread):
    path = REPO / "configs/offline/cql/hopper/medium_v0_minari.yaml"
    config = offline_cql.parse_config(["--config_path", str(path)])
    assert config.env == "mujoco/hopper/medium-v0" and config.normalize_reward and config.max_episode_steps == 1000
    make_dataset("mujoco/hopper/medium-v0", "Hopper-v5", n_episodes=12)
    config = offline_cql.parse_config([
        "--config_path", str(path), "--max_timesteps=300", "--batch_size=32", "--cql_n_actions=2",
        "--eval_freq=150", "--n_episodes=2", "--log_freq=100", "--device=cpu", "--wandb_mode=disabled",
        f"--log_dir={tmp_path / 'runs'}"])
    summary = offline_cql.train(config)
    out = capsys.readouterr().out
    assert summary["updates"] == 300
    assert out.count("normalized score: 0 at return -20.2723, 100 at return 3234.3 (D4RL's hopper random and "
                     "expert returns; the Minari dataset stores none)") == 1
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.startswith("CQL-mujoco-hopper-medium-v0-0-")
    rows = eval_rows(run_dir, "d4rl_normalized_score")
    assert [r["step"] for r in rows] == [150, 300]
    for r in rows:
        assert r["d4rl_normalized_score"] == pytest.approx(100 * (r["eval_return_mean"] + 20.272305) / 3254.572305)
    assert summary["last_score"] == rows[-1]["d4rl_normalized_score"]


def test_finetune_trains_offline_then_online_on_a_mujoco_dataset(tmp_path, capsys, one_thread):
    make_dataset("mujoco/walker2d/medium-v0", "Walker2d-v5", n_episodes=8)
    config = finetune_cql.parse_config([
        "--env=mujoco/walker2d/medium-v0", "--offline_iterations=100", "--online_iterations=60",
        "--batch_size=32", "--cql_n_actions=2", "--eval_freq=80", "--n_episodes=2", "--log_freq=40",
        "--normalize_reward=true", "--device=cpu", "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"])
    summary = finetune_cql.train(config)
    assert "normalized score: 0 at return 1.62901, 100 at return 4592.3 (D4RL's walker2d" in capsys.readouterr().out
    rows = eval_rows(Path(summary["run_dir"]), "eval/d4rl_normalized_score")
    assert [r["step"] for r in rows] == [80, 160]
    for r in rows:
        expected = 100 * (r["eval_return_mean"] - 1.629008) / (4592.3 - 1.629008)
        assert r["eval/d4rl_normalized_score"] == pytest.approx(expected)


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_dataset_without_references_says_so_once_and_logs_the_raw_return(script, tmp_path, capsys, one_thread):
    cql = MODULES[script]
    make_dataset("mujoco/invertedpendulum/medium-v0", "InvertedPendulum-v5", n_episodes=6, max_episode_steps=50)
    length = ["--max_timesteps=40"] if script == "offline" else ["--offline_iterations=20", "--online_iterations=20"]
    config = cql.parse_config(["--env=mujoco/invertedpendulum/medium-v0", *length, "--batch_size=16",
                               "--cql_n_actions=2", "--eval_freq=20", "--n_episodes=2", "--log_freq=20",
                               "--device=cpu", "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"])
    data = cql.load_dataset(config)
    assert (data.ref_min_score, data.ref_max_score, data.is_locomotion) == (None, None, False)
    summary = cql.train(config)
    out = capsys.readouterr().out
    said = ("Minari dataset mujoco/invertedpendulum/medium-v0: no reference return (ref_min_score and "
            "ref_max_score), so no normalized score: evaluations log the raw return (eval_return_mean)")
    assert out.count(said) == 1 and out.index(said) < out.index("CQL on")  # once, at the start
    rows = metrics_rows(summary["run_dir"])
    returns = [r for r in rows if "eval_return_mean" in r]
    assert [r["step"] for r in returns] == [20, 40]
    assert not any("d4rl_normalized_score" in k for r in rows for k in r)
    assert summary["last_score"] is None
