"""Dataset sources of the offline script: D4RL HDF5 rows, the download path, Minari, rewards."""
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import algorithms.offline.cql as cql
from tools.rollouts import random_episodes, random_transitions, write_minari_dataset


def test_qlearning_transitions_match_hand_computed_rows():
    # Rows 0-2: an episode cut by a timeout at row 2; rows 3-4: an episode ending in a terminal at 4;
    # rows 5-6: an unfinished episode. Observation i is [i, 10 i] so that rows are easy to name.
    obs = np.array([[i, 10 * i] for i in range(7)], dtype=np.float32)
    data = {
        "observations": obs,
        "actions": np.arange(7, dtype=np.float32)[:, None] / 10,
        "rewards": np.arange(7, dtype=np.float32) + 0.5,
        "terminals": np.array([0, 0, 0, 0, 1, 0, 0], dtype=bool),
        "timeouts": np.array([0, 0, 1, 0, 0, 0, 0], dtype=bool),
    }
    t = cql.qlearning_transitions(data)
    # Kept rows: 0, 1 (s' = next row), 3, 4 (terminal; s' is the next row, unused), 5. Dropped: the
    # timeout row 2 (its next row starts another episode) and the last row 6 (no next row).
    np.testing.assert_array_equal(t["observations"][:, 0], [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(t["next_observations"][:, 0], [1, 2, 4, 5, 6])
    np.testing.assert_array_equal(t["rewards"], [0.5, 1.5, 3.5, 4.5, 5.5])
    np.testing.assert_array_equal(t["terminals"], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(t["actions"][:, 0], [0.0, 0.1, 0.3, 0.4, 0.5])
    assert all(v.dtype == np.float32 for v in t.values())


def test_qlearning_transitions_without_timeouts_count_episode_steps():
    # No timeouts key: with max_episode_steps 3, the 3rd step of each episode counts as a timeout.
    data = {
        "observations": np.arange(8, dtype=np.float32)[:, None],
        "actions": np.zeros((8, 1), dtype=np.float32),
        "rewards": np.zeros(8, dtype=np.float32),
        "terminals": np.array([0, 1, 0, 0, 0, 0, 0, 0], dtype=bool),
    }
    t = cql.qlearning_transitions(data, max_episode_steps=3)
    # Episode A: rows 0, 1 (terminal). Episode B: rows 2, 3, 4 (4 is its 3rd step: dropped).
    # Episode C: rows 5, 6, (7 is the last row: dropped).
    np.testing.assert_array_equal(t["observations"][:, 0], [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(t["terminals"], [0, 1, 0, 0, 0, 0])


def test_locomotion_reward_normalisation_rescales_return_range_then_scale_bias():
    rewards = np.array([1, 1, 1, 2, 2, 5], dtype=np.float32)  # episodes: [1,1,1] and [2,2] and [5]
    terminals = np.array([0, 0, 1, 0, 1, 1], dtype=np.float32)
    data = cql.OfflineData(np.zeros((6, 1)), np.zeros((6, 1)), rewards, np.zeros((6, 1)), terminals,
                           make_env=None, ref_min_score=None, ref_max_score=None, is_locomotion=True, source="x")
    config = cql.TrainConfig(reward_scale=2.0, reward_bias=-1.0)
    cql.normalize_rewards(data, config, max_episode_steps=1000)
    # returns 3, 4, 5: range 2 -> r / 2 * 1000, then * 2 - 1
    np.testing.assert_allclose(data.rewards, rewards / 2 * 1000 * 2 - 1, rtol=1e-6)


# --------------------------------------------------------------------------- downloads
class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    cut_after = None  # send only this many bytes, then drop the connection

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        body = self.payload if self.cut_after is None else self.payload[: self.cut_after]
        self.wfile.write(body)
        self.wfile.flush()
        if self.cut_after is not None:
            self.connection.shutdown(2)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(payload: bytes, cut_after=None) -> str:
        handler = type("H", (_Handler,), {"payload": payload, "cut_after": cut_after})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_d4rl_name_downloads_into_cache_once_and_trains_on_it(serve, hopper_hdf5, tmp_path, monkeypatch):
    url = serve(hopper_hdf5.read_bytes()) + "/hopper_random-v2.hdf5"
    monkeypatch.setitem(cql.D4RL_DATASETS, "hopper-random-v2", (url, -20.272305, 3234.3))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    config = cql.TrainConfig(env="hopper-random-v2")
    data = cql.load_dataset(config)
    cached = tmp_path / "cache" / "hopper_random-v2.hdf5"
    assert cached.read_bytes() == hopper_hdf5.read_bytes()
    assert os.listdir(tmp_path / "cache") == ["hopper_random-v2.hdf5"]
    assert (data.ref_min_score, data.ref_max_score) == (-20.272305, 3234.3) and data.is_locomotion
    assert data.make_env().spec.id == "Hopper-v4"
    # A second load reads the cache: a dead URL does not matter any more.
    dead = ("http://127.0.0.1:9/hopper_random-v2.hdf5", -20.272305, 3234.3)
    monkeypatch.setitem(cql.D4RL_DATASETS, "hopper-random-v2", dead)
    again = cql.load_dataset(config)
    np.testing.assert_array_equal(again.observations, data.observations)


def test_interrupted_download_leaves_no_file_in_cache(serve, tmp_path):
    url = serve(b"x" * 100_000, cut_after=30_000) + "/file.hdf5"
    dest = tmp_path / "cache" / "file.hdf5"
    with pytest.raises(cql.DatasetError, match="download"):
        cql.download_file(url, dest)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_download_is_a_dataset_error(tmp_path):
    with pytest.raises(cql.DatasetError, match="download http://127.0.0.1:9"):
        cql.download_file("http://127.0.0.1:9/none.hdf5", tmp_path / "none.hdf5", timeout=5)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- minari
def make_minari_dataset(dataset_id: str, n_episodes: int = 6, seed: int = 0):
    import gymnasium as gym

    env = gym.make("Hopper-v4", max_episode_steps=60)
    return write_minari_dataset(dataset_id, random_episodes(env, n_episodes, seed), env, ref_min_score=-20.0,
                                ref_max_score=3000.0, algorithm_name="random")


def test_local_minari_dataset_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    dataset = make_minari_dataset("cqltest/hopper-random-v0")
    episodes = list(dataset.iterate_episodes())
    config = cql.parse_config(["--env", "cqltest/hopper-random-v0", "--max_timesteps=20", "--eval_freq=20",
                               "--batch_size=16", "--cql_n_actions=2", "--n_episodes=2", "--log_freq=10",
                               "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}", "--max_episode_steps=30",
                               "--background_eval=true"])  # the worker rebuilds the env from its spec
    data = cql.load_dataset(config)
    assert len(data.rewards) == sum(len(e.rewards) for e in episodes)
    first = episodes[0]
    np.testing.assert_allclose(data.observations[: len(first.rewards)], first.observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(data.next_observations[: len(first.rewards)], first.observations[1:], rtol=1e-6)
    assert (data.ref_min_score, data.ref_max_score) == (-20.0, 3000.0)
    summary = cql.train(config)
    assert summary["updates"] == 20 and summary["last_score"] is not None
    rows = [line for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("d4rl_normalized_score" in r for r in rows)


def test_missing_minari_dataset_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    with pytest.raises(cql.DatasetError, match="Minari dataset cqltest/absent-v0: not stored locally .*"
                       "`minari download cqltest/absent-v0` or set --minari_download=true"):
        cql.load_dataset(cql.TrainConfig(env="cqltest/absent-v0"))


def test_dict_observations_flatten_to_achieved_goal_goal_and_observation():
    obs = {"observation": np.array([1.0, 2.0]), "achieved_goal": np.array([9.0, 8.0]),
           "desired_goal": np.array([3.0, 4.0])}
    np.testing.assert_array_equal(cql.flatten_observation(obs, goal_in_state=True), [9, 8, 3, 4, 1, 2])
    np.testing.assert_array_equal(cql.flatten_observation(obs, goal_in_state=False), [9, 8, 1, 2])
    batch = {k: np.stack([v, v + 10]) for k, v in obs.items()}
    np.testing.assert_array_equal(cql.flatten_observation(batch, goal_in_state=False), [[9, 8, 1, 2], [19, 18, 11, 12]])


def test_d4rl_tasks_without_gymnasium_env_name_the_minari_equivalent():
    name = next(n for n in cql.MINARI_EQUIVALENTS if n.startswith("antmaze"))
    with pytest.raises(cql.DatasetError, match=cql.MINARI_EQUIVALENTS[name].replace("/", "/")):
        cql.load_dataset(cql.TrainConfig(env=name))


def test_hdf5_path_with_metadata_gives_env_and_scores(hopper_hdf5):
    data = cql.load_dataset(cql.TrainConfig(env=str(hopper_hdf5)))
    assert data.make_env().spec.id == "Hopper-v4"
    assert data.ref_max_score == pytest.approx(3234.3) and data.is_locomotion
    arrays = random_transitions("Hopper-v4", 3000, seed=0)
    assert len(data.rewards) == 3000 - 1 - int(arrays["timeouts"][:-1].sum())
