"""Random-action rollouts of a Gymnasium env, as D4RL-format arrays or HDF5 files and as local Minari datasets.

The tests and benchmarks make their own small datasets with these (nothing is downloaded):

    arrays = random_transitions("Hopper-v4", 3000, seed=0)       # D4RL's layout, episodes cut by terminal or timeout
    write_d4rl_hdf5(path, arrays, {"env_id": "Hopper-v4"})
    episodes = random_episodes(gym.make("Hopper-v4", max_episode_steps=60), n_episodes=6, seed=0)
    write_minari_dataset("local/hopper-random-v0", episodes, env)  # into MINARI_DATASETS_PATH
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import gymnasium as gym
import h5py
import numpy as np

D4RL_COLUMNS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def random_transitions(env_id: str, n_steps: int, seed: int, max_episode_steps: int = 100) -> Dict[str, np.ndarray]:
    """n_steps of uniformly random actions in D4RL's layout: an episode ends by terminal or timeout (a
    truncation that is not a termination), and the next one starts from a fresh reset."""
    env = gym.make(env_id, max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    columns: Dict[str, list] = {k: [] for k in D4RL_COLUMNS}
    obs, _ = env.reset(seed=seed)
    for _ in range(n_steps):
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(D4RL_COLUMNS, (obs, action, reward, terminated, truncated and not terminated,
                                             next_obs)):
            columns[key].append(value)
        obs = env.reset()[0] if (terminated or truncated) else next_obs
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    for k in ("observations", "actions", "rewards", "next_observations"):
        arrays[k] = arrays[k].astype(np.float32)
    return arrays


def write_d4rl_hdf5(path: Path, arrays: Dict[str, np.ndarray], attrs: Optional[Dict[str, Any]] = None) -> Path:
    """arrays as the datasets of a D4RL-format HDF5 file, attrs as its metadata (env_id, ref_min_score, ...)."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


@dataclass
class Episode:
    """One episode: observations include the one after the last step (len(actions) + 1 of them; a
    goal Dict env's as a dict of arrays); infos holds what record() returned, after reset and each step."""

    observations: Any
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    infos: Dict[str, np.ndarray] = field(default_factory=dict)


def random_episodes(env: gym.Env, n_episodes: int, seed: int,
                    record: Optional[Callable[[gym.Env, Dict[str, Any]], Dict[str, Any]]] = None) -> List[Episode]:
    """Episodes of actions drawn uniformly from env's action space (np.random.default_rng(seed)), episode e
    reset with seed + e and run until it terminates or is truncated."""
    rng = np.random.default_rng(seed)
    space = env.action_space
    episodes = []
    for e in range(n_episodes):
        obs, info = env.reset(seed=seed + e)
        observations, recorded = [obs], [record(env, info) if record else {}]
        actions, rewards, terminations, truncations = [], [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = rng.uniform(space.low, space.high).astype(np.float32)
            obs, reward, terminated, truncated, info = env.step(action)
            observations.append(obs)
            recorded.append(record(env, info) if record else {})
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
        stacked = ({k: np.stack([o[k] for o in observations]) for k in observations[0]}
                   if isinstance(observations[0], dict) else np.array(observations))
        episodes.append(Episode(stacked, np.array(actions), np.array(rewards), np.array(terminations),
                                np.array(truncations), {k: np.array([r[k] for r in recorded]) for k in recorded[0]}))
    return episodes


def write_minari_dataset(dataset_id: str, episodes: List[Episode], env: gym.Env, **metadata: Any) -> Any:
    """A local Minari dataset (in MINARI_DATASETS_PATH) of the episodes, recorded on env; metadata as
    minari.create_dataset_from_buffers takes it (ref_min_score, algorithm_name, ...)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, observations=e.observations, actions=e.actions, rewards=list(e.rewards),
                             terminations=list(e.terminations), truncations=list(e.truncations), infos=e.infos)
               for i, e in enumerate(episodes)]
    metadata.setdefault("algorithm_name", "uniform random")
    return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, **metadata)
