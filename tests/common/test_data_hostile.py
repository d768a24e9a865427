"""Datasets and envs that lie about themselves (algorithms/common/data.py): HDF5 files whose structure or metadata
is not what the layout says, envs whose actions are not a Box or whose dependency is missing, Minari datasets
with non-finite values. Each stops before training, and before the arrays are read where it can, with one
line naming the file or env and the field (exit 2 through a script)."""
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from conftest import CHILD_ENV, FINETUNE_SCRIPT, OFFLINE_SCRIPT

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as cql
from algorithms.common import data as common_data
from algorithms.common.config import DatasetError
from tools.rollouts import random_episodes, random_transitions, write_d4rl_hdf5, write_minari_dataset

HUGE_ROWS = 10**11  # 4.4 TB of float32 observations: more than any test machine holds


def _rows() -> dict:
    return random_transitions("Hopper-v4", 200, seed=2, max_episode_steps=50)


def _file(path: Path, change=None, attrs=None) -> Path:
    """A small Hopper file in D4RL's layout; change(f) then rewrites what it likes in the open file."""
    write_d4rl_hdf5(path, _rows(), {"env_id": "Hopper-v4"} if attrs is None else attrs)
    if change is not None:
        with h5py.File(path, "a") as f:
            change(f)
    return path


def _replace(key: str, **dataset):
    """A change that puts dataset (create_dataset's keywords) where key was."""
    def change(f):
        del f[key]
        f.create_dataset(key, **dataset)
    return change


def _as_group(key: str):
    def change(f):
        values = f[key][()]
        del f[key]
        f.create_group(key).create_dataset("observation", data=values)
    return change


def _huge(f):
    """Every column claims HUGE_ROWS rows; chunked with nothing written, so the file stays small."""
    for key, dim in (("observations", 11), ("actions", 3), ("rewards", None), ("terminals", None),
                     ("timeouts", None)):
        del f[key]
        shape = (HUGE_ROWS,) if dim is None else (HUGE_ROWS, dim)
        f.create_dataset(key, shape=shape, dtype="?" if dim is None and key != "rewards" else "f4",
                         chunks=(1024,) + shape[1:])


def _lying_files(tmp_path: Path) -> list:
    """(what, file, message after "dataset file <path>: "): each a traceback or a several-line error before."""
    def variant(name, change=None, attrs=None):
        return _file(tmp_path / f"{name}.hdf5", change, attrs)

    hopper = {"env_id": "Hopper-v4"}
    return [
        ("scalar observations", variant("scalar_obs", _replace("observations", data=3.0)),
         r"'observations' must be 2-D \(rows, dim\), got shape \(\)"),
        ("scalar actions", variant("scalar_actions", _replace("actions", data=np.float32(0.5))),
         r"'actions' must be 2-D \(rows, dim\), got shape \(\)"),
        ("observations a group", variant("group_obs", _as_group("observations")),
         r"'observations' is an HDF5 group \(of observation\), expected an array"),
        ("terminals a group", variant("group_terminals", _as_group("terminals")),
         r"'terminals' is an HDF5 group \(of observation\), expected an array"),
        ("rewards an empty dataspace", variant("empty_rewards", _replace("rewards", data=h5py.Empty("f4"))),
         r"'rewards' holds no array \(.*\), expected an array"),
        ("actions a link to nothing", variant("dangling", lambda f: (f.__delitem__("actions"),
                                                                     f.__setitem__("actions", h5py.SoftLink("/x")))),
         r"'actions' cannot be opened"),
        ("observations claim far more rows than the rest",
         variant("huge_obs", _replace("observations", shape=(HUGE_ROWS, 11), dtype="f4", chunks=(1024, 11))),
         rf"'observations' has {HUGE_ROWS} rows, rewards has 200"),
        ("every column claims more rows than memory holds", variant("huge", _huge),
         rf"its columns claim {HUGE_ROWS} rows, .* TB to read \('observations' of shape \({HUGE_ROWS}, 11\) and "
         r"dtype float32 the largest\), more than the .* of memory available"),
        ("env_id bytes that are not UTF-8", variant("bytes_env", attrs={"env_id": np.bytes_(b"\xff\xfeHop")}),
         r"attribute 'env_id' is not UTF-8 text, got np.bytes_\(b'\\xff\\xfeHop'\)"),
        ("env_id text stored from bytes that are not UTF-8",
         variant("vlen_env", lambda f: f.attrs.create("env_id", b"\xff\xfeHop", dtype=h5py.string_dtype())),
         r"attribute 'env_id' is not UTF-8 text"),
        ("env_id an array", variant("array_env", attrs={"env_id": np.arange(100)}),
         r"attribute 'env_id' must be a Gymnasium id \(text\), got an array of shape \(100,\) and dtype int64$"),
        ("ref_min_score an array", variant("array_ref", attrs={**hopper, "ref_min_score": np.linspace(0, 1, 50)}),
         r"attribute 'ref_min_score' must be a finite number, got an array of shape \(50,\) and dtype float64$"),
    ]


def test_lying_hdf5_files_are_one_line_dataset_errors(tmp_path):
    for what, path, message in _lying_files(tmp_path):
        with pytest.raises(DatasetError) as error:
            common_data.load_dataset(cql.TrainConfig(env=str(path)))
        assert "\n" not in str(error.value), (what, str(error.value)[:300])
        assert re.search(f"^dataset file {re.escape(str(path))}: {message}", str(error.value)), (what, error.value)


def test_layout_and_metadata_are_checked_before_any_array_is_read(tmp_path, monkeypatch):
    """Text or compound columns (rejected once read before) and a bad attribute stop with nothing read."""
    compound = np.zeros(200, dtype=[("reward", "f4"), ("cost", "f4")])
    cases = [(_file(tmp_path / "compound.hdf5", _replace("rewards", data=compound)),
              r"'rewards' must hold real numbers, got dtype \[\('reward', '<f4'\), \('cost', '<f4'\)\]"),
             (_file(tmp_path / "text.hdf5", _replace("actions", data=np.full((200, 3), b"a"))),
              r"'actions' must hold real numbers, got dtype \|S1"),
             (_file(tmp_path / "steps.hdf5", attrs={"env_id": "Hopper-v4", "max_episode_steps": "abc"}),
              r"attribute 'max_episode_steps' must be an integer")]

    def no_reading(self, selection):
        raise AssertionError(f"{self.name} was read")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    for path, message in cases:
        with pytest.raises(DatasetError, match=message):
            common_data.load_dataset(cql.TrainConfig(env=str(path)))


def test_memory_check_uses_the_memory_available(tmp_path, monkeypatch):
    path = _file(tmp_path / "small.hdf5")
    assert common_data.available_memory() > 0
    monkeypatch.setattr(common_data, "available_memory", lambda: 1000)
    with pytest.raises(DatasetError, match=r"its columns claim 200 rows, .* KB to read .*more than the 1 KB of memory"):
        common_data.read_d4rl_hdf5(path)
    monkeypatch.setattr(common_data, "available_memory", lambda: None)  # unknown: no check
    assert len(common_data.read_d4rl_hdf5(path)["rewards"]) == 200


def test_attributes_the_loader_does_not_read_may_hold_anything(tmp_path):
    path = _file(tmp_path / "notes.hdf5", attrs={"env_id": "Hopper-v4", "notes": np.bytes_(b"\xff\xfe"),
                                                 "matrix": np.ones((30, 30))})
    assert common_data.read_d4rl_hdf5(path)["attrs"] == {"env_id": "Hopper-v4"}


# --------------------------------------------------------------------------- envs the scripts cannot use
def _four_dim_file(path: Path, env_id: str = "CartPole-v1") -> Path:
    """Rows whose observations have CartPole's 4 dims (and one action column): only the actions can be wrong."""
    rng = np.random.default_rng(0)
    n = 100
    return write_d4rl_hdf5(path, {"observations": rng.standard_normal((n, 4)).astype(np.float32),
                                  "actions": rng.uniform(-1, 1, (n, 1)).astype(np.float32),
                                  "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool),
                                  "timeouts": np.arange(n) % 50 == 49}, {"env_id": env_id})


DISCRETE = r"needs a 1-D Box action space \(continuous actions\), got a Discrete of 2 values from env CartPole-v1"


def test_discrete_action_env_is_refused_before_the_arrays_are_read(tmp_path, monkeypatch):
    path = _four_dim_file(tmp_path / "cartpole.hdf5")
    read = []
    monkeypatch.setattr(common_data, "read_d4rl_hdf5", lambda p: read.append(p))
    with pytest.raises(DatasetError, match=f"^eval env: {DISCRETE}$"):
        common_data.load_dataset(cql.TrainConfig(env=str(path)))
    with pytest.raises(DatasetError, match=f"^eval env: {DISCRETE}$"):  # as eval_env of a D4RL name: no download
        common_data.load_dataset(cql.TrainConfig(env="hopper-medium-v2", eval_env="CartPole-v1",
                                                 dataset_path=str(tmp_path / "absent.hdf5")))
    assert read == []


@pytest.fixture
def unusable_envs():
    """Two registered envs that cannot be made: one whose optional dependency is missing, one whose module is."""
    def needs_box2d(**kwargs):
        raise gym.error.DependencyNotInstalled('Box2D is not installed, run `pip install "gymnasium[box2d]"`')

    ids = {"missing dependency": "cqltest/NeedsBox2D-v0", "missing module": "cqltest/NeedsModule-v0"}
    gym.register(ids["missing dependency"], entry_point=needs_box2d)
    gym.register(ids["missing module"], entry_point="cqltest_absent_package.envs:Env")
    yield ids
    for env_id in ids.values():
        del gym.registry[env_id]


MISSING = {
    "missing dependency": r"env cqltest/NeedsBox2D-v0: a dependency is not installed: Box2D is not installed, "
                          r"run `pip install \"gymnasium\[box2d\]\"`",
    "missing module": r"env cqltest/NeedsModule-v0: needs cqltest_absent_package, which cannot be imported "
                      r"\(No module named 'cqltest_absent_package'\); "
                      r"install e.g. `pip install cqltest_absent_package`",
}


def test_env_with_a_missing_dependency_names_it_and_what_to_install(unusable_envs, tmp_path, hopper_hdf5):
    for what, env_id in unusable_envs.items():
        with pytest.raises(DatasetError, match=f"^{MISSING[what]}$"):
            common_data.make_gym_env(env_id, {}, None, False)()
        with pytest.raises(DatasetError, match=f"^{MISSING[what]}$"):  # an HDF5 file's eval env
            common_data.load_dataset(cql.TrainConfig(env=str(hopper_hdf5), eval_env=env_id))


@pytest.mark.parametrize("what", ["missing dependency", "missing module"])
def test_finetune_env_or_eval_env_that_cannot_be_made_exits_2(what, unusable_envs, tmp_path, capsys):
    """The finetune script's pure online mode makes its env and its eval_env itself (make_gym_env)."""
    for argv in ([f"--env={unusable_envs[what]}"], ["--env=Pendulum-v1", f"--eval_env={unusable_envs[what]}"]):
        with pytest.raises(SystemExit) as exit_info:
            finetune_cql.main([*argv, "--offline_iterations=0", "--online_iterations=2", "--eval_freq=2",
                               "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert re.search(f"^error: {MISSING[what]}$", err[0]), err[0]
    with pytest.raises(SystemExit):
        finetune_cql.main(["--env=CartPole-v1", "--offline_iterations=0", "--online_iterations=2",
                           "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
    assert re.search(f"^error: training env: {DISCRETE}$", capsys.readouterr().err.strip())


# --------------------------------------------------------------------------- Minari datasets with non-finite values
def _minari_with(dataset_id: str, change) -> None:
    env = gym.make("Hopper-v4", max_episode_steps=30)
    episodes = random_episodes(env, 3, seed=0)
    change(episodes)
    write_minari_dataset(dataset_id, episodes, env, ref_min_score=-20.0, ref_max_score=3000.0)


def _set(field: str, episode: int, index, value):
    def change(episodes):
        getattr(episodes[episode], field)[index] = value
    return change


def _float64_rewards(episodes):
    episodes[2].rewards = episodes[2].rewards.astype(np.float64)
    episodes[2].rewards[4] = 1e300  # finite in the dataset, inf in the float32 buffer


MINARI_CASES = [  # (what, change, message after "Minari dataset <id>: ")
    ("NaN reward", _set("rewards", 1, 5, np.nan), r"'rewards' has non-finite values \(first at episode 1, step 5\)"),
    ("inf observation", _set("observations", 0, (3, 2), np.inf),
     r"'observations' has non-finite values \(first at episode 0, step 3\)"),
    ("NaN action", _set("actions", 2, (7, 0), np.nan),
     r"'actions' has non-finite values \(first at episode 2, step 7\)"),
    ("reward beyond float32", _float64_rewards,
     r"'rewards' has values beyond float32's range \(first at episode 2, step 4\)"),
]


@pytest.mark.parametrize("what, change, message", MINARI_CASES, ids=[case[0] for case in MINARI_CASES])
def test_minari_dataset_with_non_finite_values_names_the_field(what, change, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    _minari_with("cqltest/hopper-bad-v0", change)
    with pytest.raises(DatasetError, match=f"^Minari dataset cqltest/hopper-bad-v0: {message}$"):
        common_data.load_dataset(cql.TrainConfig(env="cqltest/hopper-bad-v0", normalize_reward=True))


def test_minari_dataset_whose_eval_env_cannot_be_made_stops_before_its_episodes_are_read(
        unusable_envs, tmp_path, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    _minari_with("cqltest/hopper-ok-v0", lambda episodes: None)
    monkeypatch.setattr(minari.MinariDataset, "iterate_episodes", lambda *args: pytest.fail("episodes read"))
    with pytest.raises(DatasetError, match=f"^{MISSING['missing module']}$"):
        common_data.load_dataset(cql.TrainConfig(env="cqltest/hopper-ok-v0", eval_env=unusable_envs["missing module"]))
    with pytest.raises(DatasetError, match=f"^eval env: {DISCRETE}$"):
        common_data.load_dataset(cql.TrainConfig(env="cqltest/hopper-ok-v0", eval_env="CartPole-v1"))


# --------------------------------------------------------------------------- through the scripts, as a user runs them
def test_each_class_exits_2_with_one_line_through_the_scripts(tmp_path, monkeypatch):
    """A file claiming 4.4 TB, a discrete-action eval env, a Minari dataset with a NaN reward: one `error:` line on
    stderr and exit code 2, each before any training (the runs would otherwise go on to train)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    _minari_with("cqltest/hopper-nan-v0", _set("rewards", 1, 5, np.nan))
    child_env = {**CHILD_ENV, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    huge = _file(tmp_path / "huge.hdf5", _huge)
    cases = [
        (OFFLINE_SCRIPT, [f"--env={huge}"], rf"^error: dataset file {re.escape(str(huge))}: its columns claim "),
        (OFFLINE_SCRIPT, [f"--env={_four_dim_file(tmp_path / 'cartpole.hdf5')}", "--eval_env=CartPole-v1"],
         f"^error: eval env: {DISCRETE}$"),
        (FINETUNE_SCRIPT, ["--env=cqltest/hopper-nan-v0", "--online_iterations=2"],
         r"^error: Minari dataset cqltest/hopper-nan-v0: 'rewards' has non-finite values \(first at episode 1, "
         r"step 5\)$"),
    ]
    for script, argv, message in cases:
        result = subprocess.run([sys.executable, script, *argv, "--offline_iterations=2" if script == FINETUNE_SCRIPT
                                 else "--max_timesteps=2", "--wandb_mode=disabled", f"--log_dir={tmp_path / 'runs'}"],
                                env=child_env, capture_output=True, text=True, timeout=300)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1, (argv, result.stderr[-2000:])
        assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()  # stopped before a run directory was made
