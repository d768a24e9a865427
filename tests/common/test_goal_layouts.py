"""Goal-conditioned Dict observations on Gymnasium-Robotics' AntMaze (the env ships with the package).

The state must hold the ant's torso x/y (AntMaze's `observation` lacks it; it is `achieved_goal`),
in the same columns for a dataset and for the eval/online env, and goal_in_state=false must give
D4RL's AntMaze observation, qpos[:15] ++ qvel[:14]. Local Minari datasets are made here from random
actions in a temporary MINARI_DATASETS_PATH; nothing is downloaded.

The flattening and loading are algorithms/common/data.py's, checked once; the runs and the bad inputs through
main are each script's (every bad input once, through the offline script; the finetune script's main with two).
"""
import dataclasses
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import metrics_rows

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as offline
from algorithms.common import data as common_data
from algorithms.common.runs import load_state_file
from tools.rollouts import random_episodes, write_d4rl_hdf5, write_minari_dataset

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("minari")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

SCRIPTS = [offline, finetune]
ENV_ID = "AntMaze_UMaze-v4"  # the env of Minari's D4RL/antmaze/*-v1 datasets (AntMaze-v5 adds contact forces)
DATASET = "cqltest/antmaze/umaze-v1"
DENSE_DATASET = "cqltest/antmaze/umaze-dense-v1"
TINY = ["--batch_size=16", "--cql_n_actions=2", "--n_episodes=2", "--q_n_hidden_layers=1", "--wandb_mode=disabled",
        "--max_episode_steps=20"]


def robotics_env(env_id: str = ENV_ID, **kwargs) -> gym.Env:
    common_data.check_env_id(env_id)  # registers Gymnasium-Robotics' ids
    return gym.make(env_id, **kwargs)


def sim_state(env: gym.Env, info: dict) -> dict:
    """What Minari's D4RL/antmaze datasets keep in their infos: the simulator's qpos/qvel and success."""
    sim = env.unwrapped.data
    return {"qpos": sim.qpos.copy(), "qvel": sim.qvel.copy(), "success": info["success"]}


def make_antmaze_dataset(dataset_id: str, env_id: str, n_episodes: int = 3, steps: int = 25, seed: int = 0) -> list:
    """A local Minari dataset as Minari's D4RL/antmaze ones are made (continuing task, goal kept), but
    from random actions; infos keep qpos, qvel and success as theirs do."""
    env = robotics_env(env_id, max_episode_steps=steps, continuing_task=True, reset_target=False)
    episodes = random_episodes(env, n_episodes, seed, record=sim_state)
    with pytest.warns(UserWarning):  # Minari asks for an author, a description, ...
        write_minari_dataset(dataset_id, episodes, env, algorithm_name="random")
    return episodes


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    """MINARI_DATASETS_PATH with the two local AntMaze datasets; yields their episodes."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        episodes = {DATASET: make_antmaze_dataset(DATASET, ENV_ID),
                    DENSE_DATASET: make_antmaze_dataset(DENSE_DATASET, "AntMaze_UMazeDense-v4", seed=10)}
    return root, episodes


@pytest.fixture
def antmaze(minari_root, monkeypatch):
    root, episodes = minari_root
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return episodes



# ------------------------------------------------------------------ the state's columns
def test_flattened_antmaze_observation_holds_the_torso_and_d4rl_layout():
    for goal_in_state in (False, True):
        env = common_data.flat_observation_env(robotics_env(), goal_in_state)
        sim, maze = env.unwrapped.data, env.unwrapped
        assert common_data.state_columns(maze.observation_space, goal_in_state) == (
            [("achieved_goal", 2), ("desired_goal", 2), ("observation", 27)] if goal_in_state
            else [("achieved_goal", 2), ("observation", 27)])
        obs, _ = env.reset(seed=1)
        rng = np.random.default_rng(0)
        for _ in range(10):
            assert obs.shape == (31 if goal_in_state else 29,)
            np.testing.assert_array_equal(obs[:2], sim.qpos[:2])  # the torso x/y
            assert np.abs(obs[:2]).max() > 0.5  # a U-maze position, not near-zero joint readings
            d4rl = np.concatenate([sim.qpos[:15], sim.qvel[:14]])  # D4RL's AntMaze observation
            if goal_in_state:
                np.testing.assert_array_equal(obs[2:4], maze.goal)
                np.testing.assert_array_equal(np.delete(obs, [2, 3]), d4rl)
            else:
                np.testing.assert_array_equal(obs, d4rl)  # column for column
            obs = env.step(rng.uniform(-1, 1, 8))[0]


def test_minari_antmaze_rows_match_the_simulator_and_the_eval_env(antmaze):
    episodes = antmaze[DATASET]
    for goal_in_state in (None, False):  # None: a Minari dataset keeps the goal
        data = common_data.load_dataset(offline.TrainConfig(env=DATASET, goal_in_state=goal_in_state))
        assert data.goal_in_state is (goal_in_state is None)
        n = len(episodes[0].actions)
        first = episodes[0]
        sim = np.concatenate([first.infos["qpos"], first.infos["qvel"]], axis=1).astype(np.float32)
        rows = np.concatenate([data.observations[:n], data.next_observations[n - 1: n]])
        if data.goal_in_state:
            np.testing.assert_array_equal(rows[:, 2:4], first.observations["desired_goal"].astype(np.float32))
            rows = np.delete(rows, [2, 3], axis=1)
        np.testing.assert_array_equal(rows, sim)  # x, y, z, quaternion, 8 joints, then 14 velocities
        # The eval env, seeded as the dataset's first episode was, starts on the dataset's first row.
        env = data.make_env()
        common_data.check_dataset_matches_env(data, env)
        np.testing.assert_array_equal(env.reset(seed=0)[0].astype(np.float32), data.observations[0])
        assert env.spec.id == ENV_ID and env.spec.max_episode_steps == 25


# ------------------------------------------------------------------ end to end, both scripts
def test_offline_trains_and_evaluates_on_a_minari_antmaze_dataset(antmaze, tmp_path):
    config = offline.parse_config([f"--env={DATASET}", "--max_timesteps=30", "--eval_freq=15", "--log_freq=15",
                                   f"--checkpoints_path={tmp_path}", "--background_eval=true", *TINY])
    summary = offline.train(config)  # the background worker rebuilds the flattening env from env.spec
    assert summary["updates"] == 30
    evals = [r for r in metrics_rows(summary["run_dir"]) if "eval_return_mean" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(r["eval_return_mean"] == 0.0 for r in evals)  # random data: the goal is never reached
    checkpoint = load_state_file(Path(summary["run_dir"]) / "checkpoint_30.pt")
    assert checkpoint["state_mean"].shape == (31,)


def _finetune(tmp_path, dataset, *extra):
    config = finetune.parse_config([f"--env={dataset}", "--offline_iterations=20", "--online_iterations=40",
                                    "--eval_freq=20", "--log_freq=20", f"--log_dir={tmp_path}", *TINY, *extra])
    summary = finetune.train(config)
    rows = metrics_rows(summary["run_dir"])
    return ([r for r in rows if "eval/success_rate" in r], [r for r in rows if "train/is_success" in r], summary)


def test_finetune_success_and_regret_come_from_antmaze_info(antmaze, tmp_path, monkeypatch):
    # Dense AntMaze: every reward is exp(-distance) > 0, so a reward > 0 rule (the fallback for sparse
    # tasks without info) would call every step a success; info["success"] says no.
    assert all((e.rewards > 0).all() and not e.infos["success"].any() for e in antmaze[DENSE_DATASET])
    evals, episodes, summary = _finetune(tmp_path, DENSE_DATASET)
    assert summary["updates"] == 60
    # success rate and regret come with the online phase's evaluations only (as CORL); 40 online steps: two episodes
    assert [r["step"] for r in evals] == [40, 60] and len(episodes) == 2
    assert all(r["eval/success_rate"] == 0.0 and r["eval/regret"] == 1.0 for r in evals)
    assert all(r["train/is_success"] == 0.0 and r["train/regret"] == 1.0 for r in episodes)

    # The same real env with its goal moved onto the ant's start: info["success"] is true from the first step.
    import gymnasium_robotics.envs.maze.maze_v4 as maze_v4

    reset = maze_v4.MazeEnv.reset

    def goal_at_start(self, *args, **kwargs):
        result = reset(self, *args, **kwargs)
        self.goal = self.reset_pos.copy()
        return result

    monkeypatch.setattr(maze_v4.MazeEnv, "reset", goal_at_start)
    evals, episodes, _ = _finetune(tmp_path, DENSE_DATASET)
    assert all(r["eval/success_rate"] == 1.0 and r["eval/regret"] == 0.0 for r in evals)
    assert [r["train/is_success"] for r in episodes] == [1.0, 1.0]
    assert [r["train/regret"] for r in episodes] == [0.0, 0.0]


def test_finetune_online_rows_have_the_datasets_columns(antmaze, tmp_path):
    evals, episodes, summary = _finetune(tmp_path, DATASET, "--goal_in_state=false", f"--checkpoints_path={tmp_path}")
    assert summary["updates"] == 60 and len(evals) == 2 and len(episodes) == 2
    run_dir = Path(summary["run_dir"])
    checkpoint = load_state_file(run_dir / "checkpoint_60.pt")
    replay = load_state_file(run_dir / "replay_60.pt")
    online = replay["observations"].numpy() * checkpoint["state_std"] + checkpoint["state_mean"]
    # The first online state is the training env's reset (seeded seed + 0): the torso x/y first, D4RL's layout.
    env = finetune.load_dataset(finetune.TrainConfig(env=DATASET, goal_in_state=False)).make_env()
    env.reset(seed=0)
    sim = env.unwrapped.data
    np.testing.assert_allclose(online[0], np.concatenate([sim.qpos, sim.qvel]), rtol=1e-5, atol=1e-5)


def test_finetune_pure_online_on_a_gymnasium_robotics_id(tmp_path):
    # No dataset: the id is registered by importing Gymnasium-Robotics, the goal is in the state (31 dims).
    config = finetune.parse_config([f"--env={ENV_ID}", "--offline_iterations=0", "--online_iterations=30",
                                    "--warmup_steps=20", "--cql_alpha_online=0", "--eval_freq=30", "--log_freq=10",
                                    f"--checkpoints_path={tmp_path}", *TINY[:-1], "--max_episode_steps=10"])
    summary = finetune.train(config)
    assert summary["updates"] == 10
    checkpoint = load_state_file(Path(summary["run_dir"]) / "checkpoint_30.pt")
    assert checkpoint["state_mean"].shape == (31,)
    episodes = [r for r in metrics_rows(summary["run_dir"]) if "train/is_success" in r]
    assert [r["train/episode_length"] for r in episodes] == [10, 10, 10]


# ------------------------------------------------------------------ a D4RL AntMaze file on Gymnasium-Robotics
def d4rl_antmaze_file(path: Path, columns=slice(None), n_episodes: int = 3, steps: int = 40) -> Path:
    """An HDF5 file in D4RL's AntMaze layout, written from the simulator (qpos[:15] ++ qvel[:14]), not
    from the scripts' flattening; `columns` cuts it (27 dims: the old bug's layout, without x/y)."""
    episodes = random_episodes(robotics_env(max_episode_steps=steps), n_episodes, seed=5, record=sim_state)
    arrays = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for e in episodes:
        arrays["observations"].append(np.concatenate([e.infos["qpos"], e.infos["qvel"]], axis=1)[:-1][:, columns])
        arrays["actions"].append(e.actions)
        arrays["rewards"].append(e.rewards)
        arrays["terminals"].append(e.terminations)
        arrays["timeouts"].append(e.truncations)
    return write_d4rl_hdf5(path, {k: np.concatenate(v).astype(np.float32 if k in ("observations", "actions", "rewards")
                                                         else bool) for k, v in arrays.items()})


def test_d4rl_antmaze_file_trains_and_evaluates_on_gymnasium_robotics_antmaze(tmp_path):
    path = d4rl_antmaze_file(tmp_path / "antmaze-umaze-v2.hdf5")
    config = offline.parse_config(["--env=antmaze-umaze-v2", f"--dataset_path={path}", f"--eval_env={ENV_ID}",
                                   "--max_timesteps=20", "--eval_freq=20", "--log_freq=10", f"--log_dir={tmp_path}",
                                   *TINY])
    data = offline.load_dataset(config)
    assert not data.goal_in_state and data.observations.shape[1] == 29
    env = data.make_env()
    offline.check_dataset_matches_env(data, env)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, np.concatenate([env.unwrapped.data.qpos, env.unwrapped.data.qvel]))
    summary = offline.train(config)
    assert summary["updates"] == 20 and summary["last_score"] == 0.0  # D4RL's antmaze references: 0 and 1


# ------------------------------------------------------------------ bad input: one line, exit code 2
def _bad_minari_dataset(dataset_id: str, space: gym.Space) -> None:
    import minari
    from minari.data_collector import EpisodeBuffer

    if (common_data.minari_datasets_dir() / dataset_id).exists():
        return
    observations = [space.sample() for _ in range(4)]
    stacked = ({k: np.stack([o[k] for o in observations]) for k in space.keys()}
               if isinstance(space, gym.spaces.Dict) else np.stack(observations))
    buffer = EpisodeBuffer(id=0, observations=stacked, actions=np.zeros((3, 2), np.float32), rewards=[0.0] * 3,
                           terminations=[False] * 3, truncations=[False, False, True], infos={})
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(dataset_id, [buffer], observation_space=space,
                                           action_space=gym.spaces.Box(-1, 1, (2,), np.float32))


def bad_inputs(tmp_path: Path):
    box = gym.spaces.Box(-1, 1, (3,), np.float64)
    _bad_minari_dataset("cqltest/nogoal-v0", gym.spaces.Dict({"position": box, "velocity": box}))
    _bad_minari_dataset("cqltest/image-v0", gym.spaces.Box(0, 1, (4, 4), np.float32))
    d4rl = d4rl_antmaze_file(tmp_path / "d4rl.hdf5", n_episodes=1, steps=10)
    no_xy = d4rl_antmaze_file(tmp_path / "noxy.hdf5", columns=slice(2, None), n_episodes=1, steps=10)
    return [  # (what, argv, message)
        ("Minari id not stored locally", ["--env=D4RL/antmaze/umaze-v1"],
         r"Minari dataset D4RL/antmaze/umaze-v1: not stored locally \(in .*\); fetch it with "
         r"`minari download D4RL/antmaze/umaze-v1` or set --minari_download=true"),
        ("Minari Dict without goal keys", ["--env=cqltest/nogoal-v0"],
         r"Minari dataset cqltest/nogoal-v0: observations are a Dict of position, velocity; expected a 1-D Box "
         r"or a goal Dict"),
        ("Minari 2-D Box", ["--env=cqltest/image-v0"],
         r"Minari dataset cqltest/image-v0: observations are a Box of shape \(4, 4\); expected a 1-D Box"),
        ("goal in the state, D4RL file without", [f"--env={d4rl}", f"--eval_env={ENV_ID}", "--goal_in_state=true"],
         rf"dataset file .*d4rl.hdf5: observations have 29 dims, the eval env {ENV_ID} has 31 \(achieved_goal 2 \+ "
         r"desired_goal 2 \+ observation 27\); goal_in_state=false leaves out desired_goal"),
        ("goal left out, Minari data with it", [f"--env={DATASET}", "--goal_in_state=false",
                                                "--eval_env=AntMaze_UMaze-v5"],
         r"Minari dataset .*: observations have 29 dims, the eval env AntMaze_UMaze-v5 has 107 \(achieved_goal 2 \+ "
         r"observation 105\)$"),
        ("file without the torso x/y", [f"--env={no_xy}", f"--eval_env={ENV_ID}"],
         rf"observations have 27 dims, the eval env {ENV_ID} has 29 \(achieved_goal 2 \+ observation 27\)$"),
        ("goal_in_state not a boolean", [f"--env={DATASET}", "--goal_in_state=maybe"],
         r"command line: field 'goal_in_state' expects true or false, got 'maybe'"),
    ]


@pytest.mark.parametrize("cql", SCRIPTS, ids=["offline", "finetune"])
def test_bad_goal_observation_inputs_exit_2_with_one_line(cql, antmaze, tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    if cql is finetune:  # the checks are common: the finetune script's wiring, for a Minari id and a file
        cases = [case for case in cases if case[0] in ("Minari Dict without goal keys",
                                                       "goal in the state, D4RL file without")]
    short = ["--max_timesteps=1"] if cql is offline else ["--offline_iterations=1", "--online_iterations=0"]
    capsys.readouterr()
    for what, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:  # a bad input that slipped through would train one update
            cql.main([*argv, *short, "--n_episodes=1", "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (what, err)
        assert re.search(message, err[0]), (what, err[0])


# ------------------------------------------------------------------ one loader for both scripts
def test_both_scripts_load_goal_observations_through_the_common_module():
    """The goal-observation helpers were copies in each script; now both scripts take algorithms/common/data.py's,
    and their goal_in_state options are the same."""
    for name in ("load_dataset", "check_dataset_matches_env", "resolve_goal_in_state"):
        if hasattr(offline, name):
            assert getattr(offline, name) is getattr(common_data, name), name
        if hasattr(finetune, name):
            assert getattr(finetune, name) is getattr(common_data, name), name
    assert offline.load_dataset is finetune.load_dataset is common_data.load_dataset
    assert common_data.GOAL_DICT_KEYS == tuple(sorted(common_data.GOAL_DICT_KEYS))
    fields = {f.name: (f.type, f.default) for f in dataclasses.fields(offline.TrainConfig)}
    assert fields["goal_in_state"] == {f.name: (f.type, f.default)
                                       for f in dataclasses.fields(finetune.TrainConfig)}["goal_in_state"]
