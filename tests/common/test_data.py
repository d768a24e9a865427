"""Dataset sources (algorithms/common/data.py): D4RL HDF5 rows, the download path, Minari, rewards; the checks
that run once against the common module, and one run per script through its main for the wiring."""
import http.server
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as cql
from algorithms.common import data as common_data
from algorithms.common.config import DatasetError
from tools.rollouts import random_episodes, random_transitions, write_d4rl_hdf5, write_minari_dataset


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
    t = common_data.qlearning_transitions(data)
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
    t = common_data.qlearning_transitions(data, max_episode_steps=3)
    # Episode A: rows 0, 1 (terminal). Episode B: rows 2, 3, 4 (4 is its 3rd step: dropped).
    # Episode C: rows 5, 6, (7 is the last row: dropped).
    np.testing.assert_array_equal(t["observations"][:, 0], [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(t["terminals"], [0, 1, 0, 0, 0, 0])


def test_locomotion_reward_normalisation_rescales_return_range_then_scale_bias():
    rewards = np.array([1, 1, 1, 2, 2, 5], dtype=np.float32)  # episodes: [1,1,1] and [2,2] and [5]
    terminals = np.array([0, 0, 1, 0, 1, 1], dtype=np.float32)
    data = common_data.OfflineData(np.zeros((6, 1)), np.zeros((6, 1)), rewards, np.zeros((6, 1)), terminals,
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
    monkeypatch.setitem(common_data.D4RL_DATASETS, "hopper-random-v2", (url, -20.272305, 3234.3))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    config = cql.TrainConfig(env="hopper-random-v2")
    data = common_data.load_dataset(config)
    cached = tmp_path / "cache" / "hopper_random-v2.hdf5"
    assert cached.read_bytes() == hopper_hdf5.read_bytes()
    assert os.listdir(tmp_path / "cache") == ["hopper_random-v2.hdf5"]
    assert (data.ref_min_score, data.ref_max_score) == (-20.272305, 3234.3) and data.is_locomotion
    assert data.make_env().spec.id == "Hopper-v4"
    # A second load reads the cache: a dead URL does not matter any more.
    dead = ("http://127.0.0.1:9/hopper_random-v2.hdf5", -20.272305, 3234.3)
    monkeypatch.setitem(common_data.D4RL_DATASETS, "hopper-random-v2", dead)
    again = common_data.load_dataset(config)
    np.testing.assert_array_equal(again.observations, data.observations)


def test_interrupted_download_leaves_no_file_in_cache(serve, tmp_path):
    url = serve(b"x" * 100_000, cut_after=30_000) + "/file.hdf5"
    dest = tmp_path / "cache" / "file.hdf5"
    with pytest.raises(common_data.DownloadFault, match="download"):
        common_data.download_file(url, dest)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_download_is_a_fault(tmp_path):  # not bad input: tests/common/test_download.py
    with pytest.raises(common_data.DownloadFault, match="download http://127.0.0.1:9"):
        common_data.download_file("http://127.0.0.1:9/none.hdf5", tmp_path / "none.hdf5", timeout=5)
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
    data = common_data.load_dataset(config)
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
    with pytest.raises(DatasetError, match="Minari dataset cqltest/absent-v0: not stored locally .*"
                       "`minari download cqltest/absent-v0` or set --minari_download=true"):
        common_data.load_dataset(cql.TrainConfig(env="cqltest/absent-v0"))


def test_dict_observations_flatten_to_achieved_goal_goal_and_observation():
    obs = {"observation": np.array([1.0, 2.0]), "achieved_goal": np.array([9.0, 8.0]),
           "desired_goal": np.array([3.0, 4.0])}
    np.testing.assert_array_equal(common_data.flatten_observation(obs, goal_in_state=True), [9, 8, 3, 4, 1, 2])
    np.testing.assert_array_equal(common_data.flatten_observation(obs, goal_in_state=False), [9, 8, 1, 2])
    batch = {k: np.stack([v, v + 10]) for k, v in obs.items()}
    np.testing.assert_array_equal(common_data.flatten_observation(batch, goal_in_state=False),
                                  [[9, 8, 1, 2], [19, 18, 11, 12]])


def test_d4rl_tasks_without_gymnasium_env_name_the_minari_equivalent():
    name = next(n for n in common_data.MINARI_EQUIVALENTS if n.startswith("antmaze"))
    with pytest.raises(DatasetError, match=common_data.MINARI_EQUIVALENTS[name].replace("/", "/")):
        common_data.load_dataset(cql.TrainConfig(env=name))


def test_hdf5_path_with_metadata_gives_env_and_scores(hopper_hdf5):
    data = common_data.load_dataset(cql.TrainConfig(env=str(hopper_hdf5)))
    assert data.make_env().spec.id == "Hopper-v4"
    assert data.ref_max_score == pytest.approx(3234.3) and data.is_locomotion
    arrays = random_transitions("Hopper-v4", 3000, seed=0)
    assert len(data.rewards) == 3000 - 1 - int(arrays["timeouts"][:-1].sum())


# --------------------------------------------------------------------------- actions outside the env's bound
def _outside_line(source: str, n_outside: int, n_rows: int, largest: str) -> str:
    return (f"{source}: {n_outside} of {n_rows} rows have actions outside the env's [-1, 1] (largest |a| {largest}): "
            "the behaviour-cloning log-likelihood (bc_steps) clamps them to the bound; the critics train on them as "
            "they are; the policy's own actions stay within the bound")


SHORT_RUN = {  # a few updates with the behaviour-cloning warm-up, one evaluation episode
    "offline": ["--max_timesteps=4", "--bc_steps=2", "--eval_freq=4", "--log_freq=2", "--max_episode_steps=5"],
    "finetune": ["--offline_iterations=2", "--online_iterations=2", "--bc_steps=1", "--eval_freq=2", "--log_freq=2",
                 "--max_episode_steps=5"],
}


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_actions_outside_the_bound_are_reported_once_and_the_run_completes(script, tmp_path, capsys):
    """Each script's wiring, through its main: one line for a stack of runs, and the stack trains."""
    module = cql if script == "offline" else finetune_cql
    arrays = random_transitions("Hopper-v4", 300, seed=3, max_episode_steps=50)
    arrays["actions"][:12] *= 1.5  # |a| up to 1.5; D4RL's and Minari's Adroit files hold such rows
    arrays["actions"][5, 1] = -1.37 * 1.5
    arrays["actions"][12] = [1.0, -1.0, 1.0 + 1e-7]  # on the bound, up to float32 rounding: inside
    path = write_d4rl_hdf5(tmp_path / "outside.hdf5", arrays, {"env_id": "Hopper-v4"})
    n_rows = len(common_data.load_dataset(module.TrainConfig(env=str(path))).rewards)
    n_outside = int((np.abs(arrays["actions"][:12]).max(1) > 1).sum())
    capsys.readouterr()
    module.main([f"--env={path}", *SHORT_RUN[script], "--seeds=2", "--batch_size=8", "--n_episodes=1",
                 "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"])
    out = capsys.readouterr().out.splitlines()
    assert out.count(_outside_line(f"dataset file {path}", n_outside, n_rows, "2.055")) == 1, out
    assert sum("outside the env's" in line for line in out) == 1
    assert any(line.startswith("done: ") for line in out)


def test_actions_within_the_bound_print_no_line(hopper_hdf5):
    data = common_data.load_dataset(cql.TrainConfig(env=str(hopper_hdf5)))
    assert common_data.actions_outside_line(data, 1.0) is None
    assert common_data.actions_outside_line(data, 0.5).startswith(f"dataset file {hopper_hdf5}: ")  # a tighter env
    data.actions = np.zeros((len(data.rewards), 0), np.float32)  # no action dims: nothing outside
    assert common_data.actions_outside_line(data, 1.0) is None


def test_minari_dataset_with_actions_outside_the_bound_runs(tmp_path, monkeypatch, capsys):
    import gymnasium as gym

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gym.make("Hopper-v4", max_episode_steps=30)
    episodes = random_episodes(env, 3, seed=0)
    episodes[1].actions[:4] = 1.25
    write_minari_dataset("cqltest/hopper-outside-v0", episodes, env)
    n_rows = sum(len(e.rewards) for e in episodes)
    capsys.readouterr()
    cql.main(["--env=cqltest/hopper-outside-v0", *SHORT_RUN["offline"], "--batch_size=8", "--n_episodes=1",
              "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"])
    out = capsys.readouterr().out.splitlines()
    assert out.count(_outside_line("Minari dataset cqltest/hopper-outside-v0", 4, n_rows, "1.25")) == 1, out


# --------------------------------------------------------------------------- malformed dataset files
def _malformed(tmp_path: Path) -> list:
    arrays = random_transitions("Hopper-v4", 200, seed=2, max_episode_steps=50)
    n = len(arrays["rewards"])
    hopper = {"env_id": "Hopper-v4"}

    def variant(name, attrs=hopper, **columns):
        return write_d4rl_hdf5(tmp_path / f"{name}.hdf5", {**arrays, **columns}, attrs)

    huge = arrays["observations"].astype(np.float64)
    huge[3, 2] = 1e300  # finite in the file, inf in the float32 buffer
    return [  # (what, file, expected message after "dataset file <path>: ")
        ("text observations", variant("text", observations=np.full((n, 11), b"a")),
         r"'observations' must hold real numbers, got dtype \|S1"),
        ("complex actions", variant("complex", actions=arrays["actions"].astype(np.complex64)),
         r"'actions' must hold real numbers, got dtype complex64"),
        ("rewards of 3 columns", variant("rewards3", rewards=np.stack([arrays["rewards"]] * 3, 1)),
         rf"'rewards' must hold one value per row, shape \(rows,\), got shape \({n}, 3\)"),
        ("terminals of 0.5", variant("half", terminals=np.full(n, 0.5)),
         r"'terminals' must be 0 or 1, got 0.5 at row 0"),
        ("NaN terminals", variant("nanterm", terminals=np.where(np.arange(n) == 7, np.nan, 0.0)),
         r"'terminals' must be 0 or 1, got nan at row 7"),
        ("timeouts of 2", variant("two", timeouts=np.full(n, 2)), r"'timeouts' must be 0 or 1, got 2 at row 0"),
        ("values past float32", variant("huge", observations=huge),
         r"'observations' has values beyond float32's range \(first at row 3\)"),
        ("every row a timeout", variant("alltimeouts", timeouts=np.ones(n, bool)),
         r"no transitions left once the rows that end an episode by time limit are dropped"),
        ("max_episode_steps attribute text", variant("stepstext", {**hopper, "max_episode_steps": "abc"}),
         r"attribute 'max_episode_steps' must be an integer in \[1, 1000000000000\], got 'abc'"),
        ("max_episode_steps attribute negative", variant("stepsneg", {**hopper, "max_episode_steps": -5}),
         r"attribute 'max_episode_steps' must be an integer in \[1, 1000000000000\], got .*-5"),
        ("env_id attribute a number", variant("envnum", {"env_id": 5}),
         r"attribute 'env_id' must be a Gymnasium id \(text\), got .*5"),
        ("ref_min_score attribute text", variant("reftext", {**hopper, "ref_min_score": "x", "ref_max_score": 1.0}),
         r"attribute 'ref_min_score' must be a finite number, got 'x'"),
        ("ref_max_score attribute infinite",
         variant("refinf", {**hopper, "ref_min_score": 0.0, "ref_max_score": np.inf}),
         r"attribute 'ref_max_score' must be a finite number, got .*inf"),
    ]


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_malformed_dataset_files_exit_2_with_one_line_naming_the_file(script, tmp_path, capsys):
    """The checks are algorithms/common/data.py's: every case once, through the offline script's main; the
    finetune script's main with a file refused on reading and one refused once read (every row a timeout)."""
    module = cql if script == "offline" else finetune_cql
    cases = _malformed(tmp_path)
    if script == "finetune":
        cases = [case for case in cases if case[0] in ("text observations", "every row a timeout")]
    for what, path, message in cases:
        with pytest.raises(SystemExit) as exit_info:  # one that slipped through would train a few updates
            module.main([f"--env={path}", *SHORT_RUN[script], "--batch_size=8", "--n_episodes=1",
                         "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (what, err)
        assert re.search(f"^error: dataset file {re.escape(str(path))}: {message}", err[0]), (what, err[0])


def test_integer_observations_are_numbers_and_train(tmp_path):
    arrays = random_transitions("Hopper-v4", 200, seed=2, max_episode_steps=50)
    arrays["observations"] = np.round(arrays["observations"] * 100).astype(np.int32)
    path = write_d4rl_hdf5(tmp_path / "int.hdf5", arrays, {"env_id": "Hopper-v4"})
    data = common_data.load_dataset(cql.TrainConfig(env=str(path)))
    assert data.observations.dtype == np.float32 and data.observations[0, 0] == arrays["observations"][0, 0]
