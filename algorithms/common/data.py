"""Datasets and the envs they are scored on: D4RL names (their HDF5 files, downloaded once, and reference
returns), D4RL-format HDF5 files, Minari ids; goal-conditioned Dict observations as flat state rows; the checks
that a dataset fits its env; the normalized score.

The scripts evaluate on Gymnasium: D4RL's locomotion data on the MuJoCo v4 tasks (the same observation
layout), the tasks whose D4RL envs need mujoco-py through Minari's ports of them (MINARI_EQUIVALENTS).
"""
import contextlib
import io
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import gymnasium as gym
import h5py
import numpy as np
from tqdm.auto import tqdm

from algorithms.common.config import FLOAT32_MAX, MAX_STEPS, ConfigError, DatasetError, RunFault
from algorithms.common.process import host_memory

# D4RL's locomotion data was recorded on the v2/v3 MuJoCo tasks; Gymnasium's v4 tasks keep their
# observation layout, so we evaluate on v4 on purpose and silence its "out of date" notice.
warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")
# D4RL's dataset files and reference returns (d4rl/infos.py): name -> (url, ref min, ref max).
_D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
_ANTMAZE = {  # name -> D4RL file stem (multistart, multigoal)
    "umaze": "u-maze_noisy_multistart_False_multigoal_False",
    "umaze-diverse": "u-maze_noisy_multistart_True_multigoal_True",
    "medium-play": "big-maze_noisy_multistart_True_multigoal_False",
    "medium-diverse": "big-maze_noisy_multistart_True_multigoal_True",
    "large-play": "hardest-maze_noisy_multistart_True_multigoal_False",
    "large-diverse": "hardest-maze_noisy_multistart_True_multigoal_True",
}
D4RL_DATASETS: Dict[str, Tuple[str, float, float]] = {
    **{
        f"{task}-{kind}-v2": (f"{_D4RL_URL}/gym_mujoco_v2/{task}_{kind.replace('-', '_')}-v2.hdf5", low, high)
        for task, low, high in [("halfcheetah", -280.178953, 12135.0), ("hopper", -20.272305, 3234.3),
                                ("walker2d", 1.629008, 4592.3), ("ant", -325.6, 3879.7)]
        for kind in ["random", "medium", "medium-replay", "medium-expert", "expert", "full-replay"]
    },
    **{
        f"antmaze-{kind}-v2": (f"{_D4RL_URL}/ant_maze_v2/Ant_maze_{stem}_sparse_fixed.hdf5", 0.0, 1.0)
        for kind, stem in _ANTMAZE.items()
    },
    **{
        f"maze2d-{maze}{dense}-v1": (f"{_D4RL_URL}/maze2d/maze2d-{maze}-{dense[1:] or 'sparse'}-v1.hdf5", low, high)
        for maze, dense, low, high in [
            ("umaze", "", 23.85, 161.86), ("medium", "", 13.13, 277.39), ("large", "", 6.7, 273.99),
            ("umaze", "-dense", 68.537689, 193.66285642381482), ("medium", "-dense", 44.264742, 297.4552547777125),
            ("large", "-dense", 30.569041, 303.4857382709002)]
    },
    **{
        f"{task}-{kind}-v1": (f"{_D4RL_URL}/hand_dapg_v1/{task}-{kind}-v1.hdf5", low, high)
        for task, low, high in [("pen", 96.262799, 3076.8331017826877), ("door", -56.512833, 2880.5693087298737),
                                ("hammer", -274.856578, 12794.134825156867),
                                ("relocate", -6.425911, 4233.877797728884)]
        for kind in ["human", "cloned", "expert"]
    },
}
# D4RL tasks whose environments need old gym/mujoco-py: the Minari dataset to use instead.
MINARI_EQUIVALENTS: Dict[str, str] = {
    **{f"antmaze-{kind}-v2": f"D4RL/antmaze/{kind}-v1" for kind in _ANTMAZE},
    **{f"maze2d-{maze}{dense}-v1": f"D4RL/pointmaze/{maze}{dense}-v2"
       for maze in ["umaze", "medium", "large"] for dense in ["", "-dense"]},
    **{f"{task}-{kind}-v1": f"D4RL/{task}/{kind}-v2"
       for task in ["pen", "door", "hammer", "relocate"] for kind in ["human", "cloned", "expert"]},
}

# D4RL locomotion tasks evaluate on Gymnasium's MuJoCo v4 envs (same observation layout).
LOCOMOTION_ENVS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "halfcheetah": ("HalfCheetah-v4", {}),
    "hopper": ("Hopper-v4", {}),
    "walker2d": ("Walker2d-v4", {}),
    "ant": ("Ant-v4", {"use_contact_forces": True}),  # D4RL's ant observations include contacts
}
# A Minari dataset recorded on one of these envs (any version: mujoco/hopper/medium-v0 is Hopper-v5) that
# stores no reference returns is scored by D4RL's random and expert returns of the task.
GYM_LOCOMOTION_TASKS: Dict[str, str] = {env_id.split("-")[0]: task for task, (env_id, _) in LOCOMOTION_ENVS.items()}


@dataclass
class OfflineData:
    """Transitions (s, a, r, s', done) as float32 arrays, and how to evaluate on their task."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    make_env: Callable[[], gym.Env]
    ref_min_score: Optional[float]
    ref_max_score: Optional[float]
    is_locomotion: bool  # rewards are rescaled by the dataset's return range (CORL's modify_reward)
    source: str  # the file or dataset id, for messages
    goal_in_state: bool = False  # goal Dict observations were flattened with desired_goal (make_env's too)
    episode_ends: Optional[np.ndarray] = None  # 1 at each episode's last row where known (Minari); None: CORL's split
    ref_origin: str = ""  # where ref_min_score / ref_max_score come from when not the dataset's own, for the start line


def d4rl_cache_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets"))


class DownloadFault(RunFault):
    """A download that failed: no network, a server that refused or went silent, a file cut short, a full
    disk. A fault, not bad input (exit code 3): the same command works once the network does."""


def download_file(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Downloads url to dest through a temporary file in dest's folder, renamed only when complete;
    any failure is a DownloadFault and leaves no file behind."""
    tmp_name = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadFault(f"download {url}: got {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException as e:
        if tmp_name is not None:
            os.unlink(tmp_name)
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            raise DownloadFault(f"download {url}: {e.reason}") from None  # not "<urlopen error ...>"
        if isinstance(e, OSError):  # HTTPError, a timeout, a reset connection, the disk
            raise DownloadFault(f"download {url}: {e}") from None
        raise
    return dest


# The columns and metadata of a D4RL-format HDF5 file that load_dataset reads (others are left unread).
D4RL_COLUMNS = ("observations", "actions", "rewards", "terminals", "timeouts")
D4RL_ATTRS = ("env_id", "max_episode_steps", "ref_min_score", "ref_max_score")
FLAG_COLUMNS = ("terminals", "timeouts", "terminations")  # 0 or 1 per row


def _shown(value: Any) -> str:
    """value for a one-line message: an array by its shape and dtype, anything else by a repr of at most 80 chars."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.3g} TB"


def available_memory() -> Optional[int]:
    """Bytes a new allocation on the host can get (process.host_memory); None where unknown."""
    memory = host_memory()
    return None if memory is None else memory[0]


def _check_d4rl_columns(f: h5py.File, where: str) -> Dict[str, h5py.Dataset]:
    """The columns load_dataset reads, their layout checked without reading them: arrays (not groups or
    scalars) of real numbers, 2-D observations and actions, one value per row for the rest, as many rows in
    each, and all of them fitting in the memory available."""
    missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
    columns: Dict[str, h5py.Dataset] = {}
    for key in (k for k in D4RL_COLUMNS if k in f):
        try:
            node = f[key]
        except KeyError as e:  # a soft or external link to nothing
            raise DatasetError(f"{where}: '{key}' cannot be opened ({_first_line(e)})") from None
        if isinstance(node, h5py.Group):  # e.g. a Dict observation stored as one array per key
            inside = ", ".join(list(node)[:5]) + (", ..." if len(node) > 5 else "")
            raise DatasetError(f"{where}: '{key}' is an HDF5 group (of {inside or 'nothing'}), expected an array")
        if not isinstance(node, h5py.Dataset) or node.shape is None:  # a committed type, an empty dataspace
            raise DatasetError(f"{where}: '{key}' holds no array ({_shown(node)}), expected an array")
        if node.dtype.kind not in "biuf":  # text, compound or complex values would fail in numpy, not name the file
            raise DatasetError(f"{where}: '{key}' must hold real numbers, got dtype {node.dtype}")
        if key in ("observations", "actions") and len(node.shape) != 2:
            raise DatasetError(f"{where}: '{key}' must be 2-D (rows, dim), got shape {node.shape}")
        if key not in ("observations", "actions") and not (len(node.shape) == 1 or node.shape[1:] == (1,)):
            raise DatasetError(f"{where}: '{key}' must hold one value per row, shape (rows,), "
                               f"got shape {node.shape}")
        columns[key] = node
    n = columns["rewards"].shape[0]
    for key, node in columns.items():
        if node.shape[0] != n:
            raise DatasetError(f"{where}: '{key}' has {node.shape[0]} rows, rewards has {n}")
    if n < 2:
        raise DatasetError(f"{where}: needs at least 2 rows, has {n}")
    # A chunked dataset can claim any shape with no data written: reading it would allocate all of it.
    need = sum(node.size * node.dtype.itemsize for node in columns.values())
    available = available_memory()
    if available is not None and need > available:
        largest = max(columns, key=lambda k: columns[k].size * columns[k].dtype.itemsize)
        raise DatasetError(f"{where}: its columns claim {n} rows, {_size(need)} to read ('{largest}' of shape "
                           f"{columns[largest].shape} and dtype {columns[largest].dtype} the largest), more than "
                           f"the {_size(available)} of memory available")
    return columns


def _read_d4rl_attrs(f: h5py.File, path: Path) -> Dict[str, Any]:
    """The metadata load_dataset reads, as text or numbers (check_d4rl_attrs checks their types)."""
    attrs = {}
    for key in (k for k in D4RL_ATTRS if k in f.attrs):
        try:
            value = f.attrs[key]
        except (OSError, TypeError, ValueError) as e:  # a type h5py cannot give as numpy
            raise DatasetError(f"dataset file {path}: attribute '{key}' cannot be read ({_first_line(e)})") from None
        try:  # h5py decodes UTF-8 text with surrogateescape: bytes that are not UTF-8 become lone surrogates
            value = value.decode() if isinstance(value, bytes) else value
            if isinstance(value, str):
                value.encode()
        except UnicodeError:
            raise DatasetError(f"dataset file {path}: attribute '{key}' is not UTF-8 text, got "
                               f"{_shown(value)}") from None
        attrs[key] = value
    check_d4rl_attrs(attrs, path)
    return attrs


def inspect_d4rl_hdf5(path: Union[str, Path]) -> Dict[str, Any]:
    """The metadata of a D4RL-format HDF5 file, once its columns' layout and its metadata are checked; reads
    no array (load_dataset checks the eval env with it before the arrays are read)."""
    path = Path(path)
    where = f"dataset file {path}"
    if not path.is_file():
        raise DatasetError(f"{where}: not found")
    try:
        with h5py.File(path, "r") as f:
            _check_d4rl_columns(f, where)
            return _read_d4rl_attrs(f, path)
    except (OSError, KeyError) as e:
        raise DatasetError(f"{where}: not a readable HDF5 file ({e})") from None


def check_column_values(where: str, key: str, values: np.ndarray, at: Callable[[int], str] = "row {}".format
                        ) -> None:
    """A DatasetError unless the float32 buffer holds the column as it is: real numbers, finite and within
    float32's range (beyond it they would be inf); flags (FLAG_COLUMNS) 0 or 1. at(row) names a row."""
    if values.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: '{key}' must hold real numbers, got dtype {values.dtype}")
    if key in FLAG_COLUMNS:
        flags = values.reshape(-1)
        bad = ~np.isin(flags, (0, 1))  # astype(bool) would read 0.5 or NaN as true
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(f"{where}: '{key}' must be 0 or 1, got {flags[row]} at {at(row)}")
        return
    for what, bad in (("non-finite values", ~np.isfinite(values)),
                      ("values beyond float32's range", np.abs(values) > FLOAT32_MAX)):
        if bad.any():
            raise DatasetError(f"{where}: '{key}' has {what} (first at {at(int(np.argwhere(bad)[0][0]))})")


def read_d4rl_hdf5(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Reads the arrays of a D4RL-format HDF5 file once its layout is checked (inspect_d4rl_hdf5), then their
    values; "attrs" holds its metadata."""
    path = Path(path)
    where = f"dataset file {path}"
    attrs = inspect_d4rl_hdf5(path)
    try:
        with h5py.File(path, "r") as f:
            data = {k: f[k][()] for k in D4RL_COLUMNS if k in f}
    except (OSError, KeyError) as e:
        raise DatasetError(f"{where}: not a readable HDF5 file ({e})") from None
    for key, values in data.items():
        check_column_values(where, key, values)
    return {**data, "attrs": attrs}


def check_d4rl_attrs(attrs: Dict[str, Any], path: Path) -> None:
    """A DatasetError unless the file's metadata that load_dataset reads has the type it needs."""
    if "env_id" in attrs and not isinstance(attrs["env_id"], str):
        raise DatasetError(f"dataset file {path}: attribute 'env_id' must be a Gymnasium id (text), "
                           f"got {_shown(attrs['env_id'])}")
    steps = attrs.get("max_episode_steps")
    if steps is not None and not (isinstance(steps, (int, np.integer)) and not isinstance(steps, (bool, np.bool_))
                                  and 0 < steps <= MAX_STEPS):
        raise DatasetError(f"dataset file {path}: attribute 'max_episode_steps' must be an integer in "
                           f"[1, {MAX_STEPS}], got {_shown(steps)}")
    for key in ("ref_min_score", "ref_max_score"):
        value = attrs.get(key)
        if value is not None and not (isinstance(value, (int, float, np.integer, np.floating))
                                      and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)):
            raise DatasetError(f"dataset file {path}: attribute '{key}' must be a finite number, "
                               f"got {_shown(value)}")


def qlearning_transitions(data: Dict[str, np.ndarray], max_episode_steps: int = 1000) -> Dict[str, np.ndarray]:
    """(s, a, r, s', done) rows exactly as d4rl.qlearning_dataset builds them.

    s' is the next row's observation; a row that ends by time limit (a timeout, or without a
    timeouts key the max_episode_steps-th step of an episode) has no valid s' and is dropped, and
    so is the last row.
    """
    n = len(data["rewards"])
    terminals = data["terminals"].astype(bool).reshape(-1)
    if "timeouts" in data:
        final = data["timeouts"].astype(bool).reshape(-1)[: n - 1]
    else:
        final = np.zeros(n - 1, dtype=bool)
        episode_step = 0
        for i in range(n - 1):
            final[i] = episode_step == max_episode_steps - 1
            episode_step = 0 if (terminals[i] or final[i]) else episode_step + 1
    keep = np.flatnonzero(~final)
    return {
        "observations": data["observations"][keep].astype(np.float32),
        "actions": data["actions"][keep].astype(np.float32),
        "rewards": data["rewards"].reshape(-1)[keep].astype(np.float32),
        "next_observations": data["observations"][keep + 1].astype(np.float32),
        "terminals": terminals[keep].astype(np.float32),
    }


# The keys of a goal-conditioned Dict observation (Gymnasium-Robotics' mazes, Fetch), sorted: the
# order of Gymnasium's own flattening (FlattenObservation), and so the order of the state's columns.
GOAL_DICT_KEYS = ("achieved_goal", "desired_goal", "observation")


def state_keys(goal_in_state: bool) -> Tuple[str, ...]:
    """The keys of a goal Dict observation that make up the state, in the order of their columns."""
    return GOAL_DICT_KEYS if goal_in_state else ("achieved_goal", "observation")


def resolve_goal_in_state(config: Any, hdf5: bool) -> bool:
    """config.goal_in_state, or its default: false for an HDF5 file (D4RL's AntMaze layout), else true."""
    return (not hdf5) if config.goal_in_state is None else config.goal_in_state


def _describe_space(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Dict):
        return f"a Dict of {', '.join(space.keys())}"
    if isinstance(space, gym.spaces.Discrete):
        return f"a Discrete of {space.n} values"
    return f"a {type(space).__name__} of shape {getattr(space, 'shape', None)}"


def check_observation_space(space: gym.Space, where: str) -> None:
    """A 1-D Box, or a goal Dict of exactly observation, achieved_goal and desired_goal as 1-D Boxes."""
    def flat_box(s: gym.Space) -> bool:
        return isinstance(s, gym.spaces.Box) and len(s.shape) == 1

    goal_dict = (isinstance(space, gym.spaces.Dict) and set(space.keys()) == set(GOAL_DICT_KEYS)
                 and all(flat_box(space[key]) for key in GOAL_DICT_KEYS))
    if not (flat_box(space) or goal_dict):
        raise DatasetError(f"{where}: observations are {_describe_space(space)}; expected a 1-D Box or a goal "
                           f"Dict (observation, achieved_goal, desired_goal as 1-D Boxes)")


def state_columns(space: gym.Space, goal_in_state: bool) -> List[Tuple[str, int]]:
    """(part, dims) of the flattened state in column order: [("observation", n)] for a Box."""
    if isinstance(space, gym.spaces.Dict):
        return [(key, space[key].shape[0]) for key in state_keys(goal_in_state)]
    return [("observation", space.shape[0])]


def flatten_observation(obs: Any, goal_in_state: bool = True) -> np.ndarray:
    """A goal Dict observation (or a batch of them) as state rows; a Box observation as it is.

    The row is achieved_goal ++ desired_goal ++ observation, or without desired_goal when not
    goal_in_state (AntMaze-v4's is then qpos[:15] ++ qvel[:14], D4RL's AntMaze observation); docs/data.md
    "Goal-conditioned observations" says why the goal is in the state by default, but not for HDF5
    files. The envs of make_env give rows flattened the same way already (flat_observation_env).
    """
    if isinstance(obs, dict):
        return np.concatenate([np.asarray(obs[key]) for key in state_keys(goal_in_state)], axis=-1)
    return np.asarray(obs)


def flat_observation_env(env: gym.Env, goal_in_state: bool) -> gym.Env:
    """env with its goal Dict observations flattened as flatten_observation flattens a dataset's.

    Gymnasium's own FilterObservation + FlattenObservation, so that env.spec names them and a
    background evaluator's gym.make(env.spec) builds the same env.
    """
    check_observation_space(env.observation_space, f"env {env.spec.id if env.spec else env}")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(gym.wrappers.FilterObservation(env, list(state_keys(goal_in_state))))
    return env


def check_env_id(env_id: str) -> None:
    """A DatasetError unless env_id is a registered Gymnasium env; Gymnasium-Robotics registers its ids
    (AntMaze_*, PointMaze_*, AdroitHand*) when imported, so it is imported when an id is not found."""
    try:
        gym.spec(env_id)
        return
    except gym.error.Error:
        pass
    try:  # its import prints a Farama notice to stderr, which would break one-line errors
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics  # noqa: F401
    except ImportError:
        pass
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise DatasetError(f"eval env {env_id!r}: not a registered Gymnasium env ({e})") from None


def is_gym_id(name: str) -> bool:
    try:
        check_env_id(name)
    except DatasetError:  # unknown or malformed ids
        return False
    return True


@contextlib.contextmanager
def env_dependencies(env_id: str) -> Iterator[None]:
    """A missing optional dependency of env_id's env (Gymnasium's DependencyNotInstalled, or an ImportError
    while it is made) as a DatasetError naming the env, what is missing and what to install."""
    try:
        yield
    except gym.error.DependencyNotInstalled as e:  # its message names what is missing and the pip command
        raise DatasetError(f"env {env_id}: a dependency is not installed: {_first_line(e)}") from None
    except ImportError as e:
        hint = f"e.g. `pip install {e.name.split('.')[0]}`" if e.name else "the package that provides it"
        raise DatasetError(f"env {env_id}: needs {e.name or 'a module'}, which cannot be imported "
                           f"({_first_line(e)}); install {hint}") from None


def make_gym_env(env_id: str, kwargs: Dict[str, Any], max_episode_steps: Optional[int],
                  goal_in_state: bool) -> Callable[[], gym.Env]:
    check_env_id(env_id)
    extra = {"max_episode_steps": int(max_episode_steps)} if max_episode_steps else {}  # an HDF5 attr is numpy.int64

    def make_env() -> gym.Env:
        with env_dependencies(env_id):
            env = gym.make(env_id, **kwargs, **extra)
        return flat_observation_env(env, goal_in_state)
    return make_env


def check_env(make_env: Callable[[], gym.Env], what: str = "eval env") -> None:
    """Makes the env once (its dependencies, its observations) and checks its actions, so that an env the
    scripts cannot use stops before a dataset is downloaded or its arrays are read."""
    env = make_env()
    try:
        action_bound(env, what)
    finally:
        env.close()


def minari_datasets_dir() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def _load_minari(config: Any) -> OfflineData:
    import minari

    root = minari_datasets_dir()
    if not config.minari_download and not (root / config.env / "data").is_dir():
        raise DatasetError(f"Minari dataset {config.env}: not stored locally (in {root}); fetch it with "
                           f"`minari download {config.env}` or set --minari_download=true (needs internet)")
    try:
        dataset = minari.load_dataset(config.env, download=config.minari_download)
    except Exception as e:  # minari raises several types for a missing or damaged dataset
        raise DatasetError(f"Minari dataset {config.env}: cannot load ({str(e).splitlines()[0]})") from None
    where = f"Minari dataset {config.env}"
    check_observation_space(dataset.observation_space, where)
    goal_in_state = resolve_goal_in_state(config, hdf5=False)
    if config.eval_env is not None:
        check_env_id(config.eval_env)
    env_spec = dataset.spec.env_spec

    def make_env() -> gym.Env:
        with env_dependencies(config.eval_env or (env_spec.id if env_spec is not None else config.env)):
            if config.eval_env is not None:
                env = gym.make(config.eval_env)
            else:
                env = dataset.recover_environment(eval_env=True)
        if config.max_episode_steps:
            env = gym.wrappers.TimeLimit(env, config.max_episode_steps)
        return flat_observation_env(env, goal_in_state)

    check_env(make_env)
    episodes = []
    for episode in dataset.iterate_episodes():
        # Minari keeps every episode's last observation: a truncated episode's last row has its real s'
        # and is not terminal (D4RL's files lack that s', so qlearning_transitions drops such rows).
        columns = {"observations": flatten_observation(episode.observations, goal_in_state),
                   "actions": np.asarray(episode.actions), "rewards": np.asarray(episode.rewards),
                   "terminations": np.asarray(episode.terminations)}
        for key, values in columns.items():  # as read_d4rl_hdf5 checks a file's, before anything uses them
            check_column_values(where, key, values, f"episode {episode.id}, step {{}}".format)
        obs = columns["observations"].astype(np.float32)
        episodes.append({"observations": obs[:-1], "next_observations": obs[1:],
                         "actions": columns["actions"].astype(np.float32),
                         "rewards": columns["rewards"].astype(np.float32),
                         "terminals": columns["terminations"].astype(np.float32),
                         "episode_ends": np.arange(len(episode.rewards)) == len(episode.rewards) - 1})
    if not episodes:
        raise DatasetError(f"{where}: has no episodes")
    arrays = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    metadata = dataset.storage.metadata
    task = GYM_LOCOMOTION_TASKS.get(env_spec.name) if env_spec is not None else None
    ref_min, ref_max, origin = metadata.get("ref_min_score"), metadata.get("ref_max_score"), ""
    if ref_min is None and ref_max is None and task is not None:
        ref_min, ref_max = D4RL_DATASETS[f"{task}-random-v2"][1:]
        origin = f"D4RL's {task} random and expert returns; the Minari dataset stores none"
    return OfflineData(
        **arrays, make_env=make_env, ref_min_score=ref_min, ref_max_score=ref_max,
        is_locomotion=task in ("halfcheetah", "hopper", "walker2d"), source=where,
        ref_origin=origin, goal_in_state=goal_in_state,
    )


def load_dataset(config: Any) -> OfflineData:
    """Resolves config.env to transitions and an eval env: D4RL name, HDF5 path or Minari id."""
    name = config.env
    ref_min, ref_max = None, None
    goal_in_state = resolve_goal_in_state(config, hdf5=True)  # for the HDF5 branches; Minari decides its own
    if name in D4RL_DATASETS or name in MINARI_EQUIVALENTS:
        task = name.split("-")[0]
        if config.eval_env is not None:
            make_env = make_gym_env(config.eval_env, {}, config.max_episode_steps, goal_in_state)
        elif task in LOCOMOTION_ENVS:
            make_env = make_gym_env(*LOCOMOTION_ENVS[task], config.max_episode_steps, goal_in_state)
        else:
            raise DatasetError(
                f"env {name}: its D4RL environment needs gym and mujoco-py; use the Minari dataset "
                f"{MINARI_EQUIVALENTS.get(name, '(none known)')} instead, or set eval_env")
        check_env(make_env)
        if config.dataset_path is not None:
            path = Path(config.dataset_path)
        else:
            url = D4RL_DATASETS[name][0]
            path = d4rl_cache_dir() / url.rsplit("/", 1)[1]
            if not path.is_file():
                try:
                    download_file(url, path)
                except DownloadFault as e:
                    raise DownloadFault(f"env {name}: {e}; without network, put D4RL's file {path.name} at {path} "
                                        f"(the folder: $D4RL_DATASET_DIR, default ~/.d4rl/datasets) or pass "
                                        f"--dataset_path=<the file>") from None
        if name in D4RL_DATASETS:
            ref_min, ref_max = D4RL_DATASETS[name][1:]
        is_locomotion = task in ("halfcheetah", "hopper", "walker2d")
    elif name.endswith((".hdf5", ".h5")) or Path(name).is_file():
        path = Path(config.dataset_path or name)
        is_locomotion = None  # decided from the eval env's id below
    elif "/" in name:
        data = _load_minari(config)
        data.ref_min_score = config.ref_min_score if config.ref_min_score is not None else data.ref_min_score
        data.ref_max_score = config.ref_max_score if config.ref_max_score is not None else data.ref_max_score
        return data
    else:
        raise DatasetError(
            f"env {name!r}: not a known D4RL dataset, an existing HDF5 file or a Minari id (namespace/name-vN)"
            + (" (a Gymnasium env: set offline_iterations=0 to train online from scratch)" if is_gym_id(name) else ""))
    if is_locomotion is None:  # the file's metadata names its env: checked before the arrays are read
        attrs = inspect_d4rl_hdf5(path)
        env_id = config.eval_env or attrs.get("env_id")
        if env_id is None:
            raise DatasetError(f"dataset file {path}: set eval_env (the file's metadata names no env_id)")
        steps = config.max_episode_steps or attrs.get("max_episode_steps")
        make_env = make_gym_env(env_id, {}, steps, goal_in_state)
        check_env(make_env)
        is_locomotion = any(t in env_id.lower() for t in ("halfcheetah", "hopper", "walker2d"))
        ref_min, ref_max = attrs.get("ref_min_score"), attrs.get("ref_max_score")
    raw = read_d4rl_hdf5(path)
    raw.pop("attrs")
    ref_min = config.ref_min_score if config.ref_min_score is not None else ref_min
    ref_max = config.ref_max_score if config.ref_max_score is not None else ref_max
    transitions = qlearning_transitions(raw)
    return OfflineData(**transitions, make_env=make_env, ref_min_score=None if ref_min is None else float(ref_min),
                       ref_max_score=None if ref_max is None else float(ref_max),
                       is_locomotion=is_locomotion, source=f"dataset file {path}", goal_in_state=goal_in_state)


def check_dataset_matches_env(data: OfflineData, env: gym.Env) -> None:
    """The dataset's rows fit the eval env's flattened observations and its actions; else a DatasetError
    that, for a goal Dict env, spells out the state's parts and whether goal_in_state would fit."""
    name = env.spec.id if env.spec else env
    if not len(data.rewards):  # e.g. every row a timeout: D4RL's layout has no next observation for those
        raise DatasetError(f"{data.source}: no transitions left once the rows that end an episode by time limit "
                           f"are dropped")
    obs_dim = env.observation_space.shape[0]  # make_env's envs give flat rows (flat_observation_env)
    if data.observations.shape[1] != obs_dim:
        raw, layout = env.unwrapped.observation_space, ""
        if isinstance(raw, gym.spaces.Dict) and set(raw.keys()) == set(GOAL_DICT_KEYS):
            layout = " (" + " + ".join(f"{key} {dims}" for key, dims in state_columns(raw, data.goal_in_state)) + ")"
            if data.observations.shape[1] == sum(dims for _, dims in state_columns(raw, not data.goal_in_state)):
                layout += (f"; goal_in_state={str(not data.goal_in_state).lower()} "
                           f"{'adds' if not data.goal_in_state else 'leaves out'} desired_goal")
        raise DatasetError(f"{data.source}: observations have {data.observations.shape[1]} dims, "
                           f"the eval env {name} has {obs_dim}{layout}")
    if data.actions.shape[1] != env.action_space.shape[0]:
        raise DatasetError(f"{data.source}: actions have {data.actions.shape[1]} dims, "
                           f"the eval env {name} has {env.action_space.shape[0]}")


def action_bound(env: gym.Env, what: str) -> float:
    """The bound m of env's actions, [-m, m] in every dim; a DatasetError naming the env for any other space."""
    space, name = env.action_space, env.spec.id if env.spec else type(env.unwrapped).__name__
    of_env = "" if name in what else f" from env {name}"
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:  # e.g. CartPole's discrete actions
        raise DatasetError(f"{what}: needs a 1-D Box action space (continuous actions), got "
                           f"{_describe_space(space)}{of_env}")
    if not np.allclose(space.high, space.high[0]) or not np.allclose(space.low, -space.high):
        raise DatasetError(f"{what}: actions must lie in a symmetric box [-m, m], got low {space.low.tolist()} "
                           f"and high {space.high.tolist()}{of_env}")
    return float(space.high[0])


def actions_outside_line(data: OfflineData, max_action: float) -> Optional[str]:
    """The start line on dataset rows whose actions lie outside the env's [-max_action, max_action] (some D4RL
    and Minari files have them); None when there are none. They stay as they are: the line says what uses them."""
    magnitude = np.abs(data.actions).max(axis=1, initial=0.0)
    outside = magnitude > max_action * (1 + 1e-6)  # a tiny tolerance: float32 rounding of values on the bound
    if not outside.any():
        return None
    return (f"{data.source}: {int(outside.sum())} of {len(outside)} rows have actions outside the env's "
            f"[-{max_action:g}, {max_action:g}] (largest |a| {magnitude.max():.4g}): the behaviour-cloning "
            f"log-likelihood (bc_steps) clamps them to the bound; the critics train on them as they are; "
            f"the policy's own actions stay within the bound")


def reference_scores_line(config: Any, source: str, ref_min: Optional[float], ref_max: Optional[float],
                          origin: str = "") -> str:
    """The start line on the returns that the normalized score maps to 0 and 100.

    ConfigError when min >= max and the config set either; when both are the dataset's, the line says so.
    """
    overridden = [name for name in ("ref_min_score", "ref_max_score") if getattr(config, name) is not None]
    if overridden:
        origin = f"{' and '.join(overridden)} from the config" + (f"; {origin}" if origin else "")
    if ref_min is None or ref_max is None:
        missing = " and ".join(name for name, value in (("ref_min_score", ref_min), ("ref_max_score", ref_max))
                               if value is None)
        return (f"{source}: no reference return ({missing}), so no normalized score: "
                f"evaluations log the raw return (eval_return_mean)")
    if not ref_min < ref_max and overridden:
        raise ConfigError(f"{source}: fields 'ref_min_score' ({ref_min}) >= 'ref_max_score' ({ref_max})"
                          f" ({origin}): the return that scores 0 must be below the one that scores 100")
    if not ref_min < ref_max:  # e.g. a dataset tool's learner that ended worse than it began
        return (f"{source}: warning: its reference returns are not increasing (ref_min_score {ref_min:g} >= "
                f"ref_max_score {ref_max:g}), so the normalized score means little; set both to override")
    return f"normalized score: 0 at return {ref_min:g}, 100 at return {ref_max:g}" + (f" ({origin})" if origin else "")


def dataset_label(env: str) -> str:
    """A dataset's name in run names: a file's stem, or the name (a Minari id with '-' for '/')."""
    return Path(env).stem if env.endswith((".hdf5", ".h5")) or Path(env).is_file() else env.replace("/", "-")


def return_range(rewards: np.ndarray, terminals: np.ndarray, max_episode_steps: int) -> Tuple[float, float]:
    """Min and max episode return, episodes split as CORL splits the transitions (terminal or length)."""
    returns, episode_return, episode_length = [], 0.0, 0
    for reward, done in zip(rewards, terminals):
        episode_return += float(reward)
        episode_length += 1
        if done or episode_length == max_episode_steps:
            returns.append(episode_return)
            episode_return, episode_length = 0.0, 0
    if not returns:
        returns.append(episode_return)
    return min(returns), max(returns)


def normalized_score(returns: Union[np.ndarray, float], ref_min: Optional[float],
                     ref_max: Optional[float]) -> Optional[float]:
    """D4RL's score: 0 at the reference min return, 100 at the reference max return."""
    if ref_min is None or ref_max is None:
        return None
    return float(100.0 * (np.mean(returns) - ref_min) / (ref_max - ref_min))
