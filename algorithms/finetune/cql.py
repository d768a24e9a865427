"""Conservative Q-Learning (CQL), offline-to-online: pre-train on a dataset, then keep training while acting.

Kumar et al., 2020 (https://arxiv.org/abs/2006.04779), with the options, defaults, initialisation and
evaluation of CORL's finetune CQL, on Gymnasium + MuJoCo, h5py and Minari instead of gym, d4rl and mujoco-py.

    python algorithms/finetune/cql.py --config_path configs/finetune/cql/antmaze/umaze_v2_minari.yaml
    python algorithms/finetune/cql.py --config_path configs/finetune/cql/antmaze/umaze_v2_minari.yaml --seeds=4
    python algorithms/finetune/cql.py --env Pendulum-v1 --offline_iterations 0 --cql_alpha_online 0  # plain SAC
    python algorithms/finetune/cql.py --help  # every option, with its meaning and default

offline_iterations updates on the data, then online_iterations iterations of one step in the training
env with the stochastic policy (into the same replay ring) and one update; at the switch cql_alpha
becomes cql_alpha_online. The manual is README.md: "Offline-to-online" (metrics, pure online mode,
how it differs from CORL), "Durable runs, loud mistakes" (checkpoints, --resume, --load_model,
non-finite values) and "Many seeds in one process".

Layout: config -> data -> replay buffer -> networks -> algorithm and its speed layer -> evaluation, logging
and checkpoints -> training (Run, train()) -> main. The data, networks, losses and speed layer are those of
algorithms/offline/cql.py, copied on purpose (one file per algorithm variant); tests/test_parity.py
keeps the shared copies identical.
"""
import contextlib
import copy
import errno
import fcntl
import functools
import io
import json
import logging
import math
import os
import pickle
import random
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union, get_args, get_origin

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

# D4RL's locomotion data was recorded on the v2/v3 MuJoCo tasks; Gymnasium's v4 tasks keep their
# observation layout, so we evaluate on v4 on purpose and silence its "out of date" notice.
warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")


# ======================================================================================
# Config
# ======================================================================================
@dataclass
class TrainConfig:
    """CORL's finetune CQL options with their defaults, then this project's additions (dataset_path on)."""

    device: str = "auto"  # torch device; "auto": cuda when available, else cpu
    env: str = "halfcheetah-medium-expert-v2"  # D4RL name, Minari id, HDF5 path, or (pure online) a Gymnasium id
    seed: int = 0  # seeds python, numpy, torch and the training env
    seeds: Optional[str] = None  # runs in one process: a list "0,1,2,3" or a count "4" (seed..seed+3); None: one
    eval_seed: Optional[int] = None  # None: eval episode i is seeded seed + i (as CORL); an int: eval_seed + i
    eval_freq: int = 5_000  # evaluate (and checkpoint) every this many iterations
    n_episodes: int = 10  # evaluation episodes, run side by side
    offline_iterations: int = 1_000_000  # updates on the dataset alone
    online_iterations: int = 1_000_000  # iterations of one env step and one update each
    checkpoints_path: Optional[str] = None  # where run directories with checkpoints go; None: no checkpoints
    load_model: str = ""  # checkpoint file to continue from; "" starts fresh
    buffer_size: int = 2_000_000  # replay ring capacity (transitions): the dataset, then online ones over the oldest
    batch_size: int = 256  # transitions per update
    discount: float = 0.99  # discount factor gamma
    alpha_multiplier: float = 1.0  # multiplies the SAC entropy temperature alpha
    use_automatic_entropy_tuning: bool = True  # learn alpha towards entropy -action_dim
    backup_entropy: bool = False  # subtract alpha * log_pi(a'|s') in the TD target
    policy_lr: float = 3e-5  # actor (and alpha) learning rate
    qf_lr: float = 3e-4  # critic (and Lagrange alpha') learning rate
    soft_target_update_rate: float = 5e-3  # tau of the Polyak target update
    bc_steps: int = 0  # first updates train the actor by behaviour cloning (log-likelihood)
    target_update_period: int = 1  # update the target critics every this many updates
    cql_alpha: float = 10.0  # weight of the CQL penalty during the offline iterations
    cql_alpha_online: float = 10.0  # weight of the CQL penalty during the online iterations
    cql_n_actions: int = 10  # sampled actions per state for the CQL penalty
    cql_importance_sample: bool = True  # importance-weight sampled actions by their density
    cql_lagrange: bool = False  # tune the penalty weight alpha' towards cql_target_action_gap
    cql_target_action_gap: float = -1.0  # Lagrange target for the penalty (logsumexp Q - data Q)
    cql_temp: float = 1.0  # temperature of the logsumexp over sampled actions
    cql_max_target_backup: bool = False  # TD target from the max over cql_n_actions next actions
    cql_clip_diff_min: float = -math.inf  # lower clip of the penalty (logsumexp Q - data Q)
    cql_clip_diff_max: float = math.inf  # upper clip of the penalty
    orthogonal_init: bool = True  # orthogonal (gain sqrt 2) init of every layer of actor and critics, as CORL finetune
    normalize: bool = True  # normalise states by the dataset mean and std (online states too)
    normalize_reward: bool = False  # rescale rewards (locomotion: returns to a 1000 range), then scale/bias
    q_n_hidden_layers: int = 2  # hidden layers of 256 units in each critic
    reward_scale: float = 1.0  # reward multiplier applied when normalize_reward
    reward_bias: float = 0.0  # reward offset applied when normalize_reward
    policy_log_std_multiplier: float = 1.0  # initial value of the actor's learnable log-std multiplier
    project: str = "CORL"  # wandb project
    group: str = "CQL-D4RL"  # wandb group
    name: str = "CQL"  # run name prefix; the run directory is <name>-<env>-<seed>-<id>
    dataset_path: Optional[str] = None  # read env's data from this HDF5 file instead of the D4RL cache
    eval_env: Optional[str] = None  # Gymnasium id to train and evaluate on; default: the dataset's own env
    max_episode_steps: Optional[int] = None  # episode length of the training and eval envs; default: the env's
    ref_min_score: Optional[float] = None  # return that scores 0; default: D4RL's / the dataset's
    ref_max_score: Optional[float] = None  # return that scores 100; default: D4RL's / the dataset's
    minari_download: bool = False  # let Minari download a dataset that is not stored locally
    goal_in_state: Optional[bool] = None  # goal Dict envs: desired_goal in the state; None: false for HDF5, else true
    background_eval: Optional[bool] = None  # evaluate in a worker process while training goes on; None: on for cuda
    checkpoint_freq: Optional[int] = None  # checkpoint every this many iterations; None: at each evaluation
    keep_checkpoints: int = 0  # keep only the newest this many checkpoint files; 0 keeps all
    resume: Optional[str] = None  # run directory of a stopped run: continue exactly from its newest checkpoint
    on_nonfinite: str = "stop"  # at a non-finite loss or gradient: "stop" naming it, or "skip" that update and go on
    log_freq: int = 1_000  # average and log training metrics every this many iterations
    log_dir: str = "runs"  # where run directories go when checkpoints_path is None
    wandb_mode: Optional[str] = None  # online, offline or disabled; None: online if an API key is set, else offline
    warmup_steps: int = 5_000  # pure online mode only: first iterations act uniformly at random, no updates
    compile: Optional[bool] = None  # torch.compile the losses and one run's Adam step (same math); None: on for cuda
    cudagraphs: bool = True  # on cuda, replay the whole update (sampling, losses, backward, Adam) as a CUDA graph
    tf32: bool = False  # allow TF32 matmuls on cuda: faster, ~1e-3 relative precision instead of fp32's
    env_workers: bool = False  # step a stack's training envs side by side in processes (pays for slow envs only)
    env_errors_in_a_row: int = 5  # failed training-env steps in a row that stop the run; a rarer one ends its episode


class ConfigError(ValueError):
    """A config value or key is not acceptable; the message is one line naming the field."""


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message is one line naming the file."""


class RunFault(RuntimeError):
    """A fault that stops a run (beside non-finite values, FloatingPointError): the message is one line
    naming what happened and the last good checkpoint (exit code 3)."""


class EvaluationWorkerError(RunFault):
    """A background evaluation failed, or its worker died again before the evaluations it was restarted
    for were done."""


INFINITE_ALLOWED = ("cql_clip_diff_min", "cql_clip_diff_max")  # +-inf: no clip, their defaults
FLOAT32_MAX = float(np.finfo(np.float32).max)


_NONE_WORDS = {"none", "null", "~"}  # None on the command line and in a YAML file alike
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any depth (SafeLoader keeps the last),
    with a ConfigError naming the file, the key and both lines; a key that a merge (<<) brings in and the
    mapping sets again counts as twice too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        self.flatten_mapping(node)  # merged keys first, as SafeLoader takes them
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                twice = key in lines
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if twice:
                raise ConfigError(f"config file {self.name}: key '{key}' given twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _read_scalar(text: str) -> Any:
    """A command-line value read as YAML reads a scalar (true, 3, 1_000, 0.5, .inf, null); text that YAML
    leaves as text stays so (PyYAML reads 1e6 and 3e-4 as text: parse_value takes those as numbers)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_value(name: str, annotation: Any, value: Any, where: str) -> Any:
    """One config value, a YAML scalar or a command-line string, as the field's type, or a ConfigError.

    Command-line values are typed as YAML types them (a string field keeps its text), so both sources
    follow one rule: bools are YAML's (true/false, yes/no, on/off), integers may be written 1e6 or
    1_000_000, numbers may not be NaN, and none/null/~ is None for Optional fields only. A float must lie
    within float32's range, which the networks compute in (but those of INFINITE_ALLOWED: no learning rate,
    weight, reward scale or score means anything at inf), and a string holds no NUL (no name or path can).
    """
    optional = get_origin(annotation) is Union and type(None) in get_args(annotation)
    base = next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
    if base not in _EXPECTED:
        raise ConfigError(f"{where}: field '{name}' has an unsupported type {annotation}")

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field '{name}' expects {expected}, got {value!r}")

    parsed = value
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        parsed = None
    elif isinstance(value, str) and base is not str:
        parsed = _read_scalar(value.strip())
    if parsed is None:
        if optional:
            return None
        raise fail(f"a {base.__name__}" + (" (use '' for none)" if base is str else ""))
    if base in (int, float) and isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            raise fail(_EXPECTED[base]) from None
    number = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
    if base is float and number and math.isnan(parsed):
        raise fail("a number, not NaN")
    if base is float and number and not abs(parsed) <= FLOAT32_MAX and name not in INFINITE_ALLOWED:
        raise fail(f"a finite number within float32's range (|value| <= {FLOAT32_MAX:.4g})")
    if base is str and isinstance(parsed, str) and "\0" in parsed:
        raise fail("a string without NUL characters")
    if base is int and number and not (math.isfinite(parsed) and parsed == int(parsed)):
        raise fail("an integer")
    if not (isinstance(parsed, bool) if base is bool else number if base in (int, float) else isinstance(parsed, str)):
        raise fail(_EXPECTED[base])
    return base(parsed)


def check_bounds(config: Any, bounds: Dict[str, Tuple[float, Optional[float], bool]],
                 choices: Dict[str, Tuple[Optional[str], ...]]) -> None:
    """A ConfigError for the first field outside its bounds (low, high or None, whether low is allowed;
    high is allowed) or its choices; a None value of an Optional field is not checked."""
    for name, (low, high, low_allowed) in bounds.items():
        value = getattr(config, name)
        if value is None or ((value >= low if low_allowed else value > low) and (high is None or value <= high)):
            continue
        if high is None:
            raise ConfigError(f"field '{name}' must be {'>=' if low_allowed else '>'} {low}, got {value!r}")
        raise ConfigError(f"field '{name}' must be in {'[' if low_allowed else '('}{low}, {high}], got {value!r}")
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            named = [a for a in allowed if a is not None]
            raise ConfigError(f"field '{name}' must be {', '.join(named[:-1])} or {named[-1]}, "
                              f"got {getattr(config, name)!r}")


MAX_SEED = 2**32 - 1  # numpy's global seed; Gymnasium refuses negative seeds
MAX_RUNS = 1024  # runs in one --seeds stack: more is a typo, not an experiment one GPU holds
# Upper limits of counts: generous, but each well past any run one GPU makes (a larger value is a typo, and
# past 2^63 it does not even fit the int64 that torch and numpy take).
MAX_STEPS = 10**12  # updates, iterations, episode steps, frequencies: 30 years at 1000 updates/s
MAX_ROWS = 10**9  # transitions in a replay buffer: 100+ GB even for a 10-dim task, more than one GPU holds
MAX_BATCH = 2**20  # transitions per update; times cql_n_actions critic rows, so a million already fills a GPU
MAX_SAMPLED_ACTIONS = 10_000  # cql_n_actions: CORL uses 10
MAX_EPISODES = 10_000  # evaluation episodes, run side by side: each its own simulator
MAX_HIDDEN_LAYERS = 100  # of 256 units per critic: CORL uses 2 to 5
# Numeric fields' allowed values: (low, high or None, whether low itself is allowed).
BOUNDS: Dict[str, Tuple[float, Optional[float], bool]] = {
    "seed": (0, MAX_SEED, True),
    "eval_seed": (0, MAX_SEED, True),
    "eval_freq": (0, None, False),
    "n_episodes": (0, None, False),
    "buffer_size": (0, None, False),
    "batch_size": (0, None, False),
    "target_update_period": (0, None, False),
    "cql_n_actions": (0, None, False),
    "q_n_hidden_layers": (0, None, False),
    "log_freq": (0, None, False),
    "policy_lr": (0, None, False),
    "qf_lr": (0, None, False),
    "cql_temp": (0, None, False),
    "offline_iterations": (0, None, True),
    "online_iterations": (0, None, True),
    "warmup_steps": (0, None, True),
    "bc_steps": (0, None, True),
    "cql_alpha": (0, None, True),
    "cql_alpha_online": (0, None, True),
    "alpha_multiplier": (0, None, True),
    "discount": (0, 1, True),
    "soft_target_update_rate": (0, 1, False),
    "checkpoint_freq": (0, None, False),
    "keep_checkpoints": (0, None, True),
    "max_episode_steps": (0, None, False),
    "env_errors_in_a_row": (0, None, False),
}
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # wandb.init refuses a project name with any of these
# Upper limits of numeric fields (check_limits), apart from BOUNDS so that their messages stay as they were.
LIMITS: Dict[str, float] = {
    "eval_freq": MAX_STEPS,
    "n_episodes": MAX_EPISODES,
    "buffer_size": MAX_ROWS,
    "batch_size": MAX_BATCH,
    "target_update_period": MAX_STEPS,
    "cql_n_actions": MAX_SAMPLED_ACTIONS,
    "q_n_hidden_layers": MAX_HIDDEN_LAYERS,
    "log_freq": MAX_STEPS,
    "offline_iterations": MAX_STEPS,
    "online_iterations": MAX_STEPS,
    "warmup_steps": MAX_STEPS,
    "bc_steps": MAX_STEPS,
    "checkpoint_freq": MAX_STEPS,
    "keep_checkpoints": MAX_STEPS,
    "max_episode_steps": MAX_STEPS,
    "policy_lr": 1,  # Adam moves each weight by about lr per update: past 1 it only wrecks them
    "qf_lr": 1,
}
CHOICES: Dict[str, Tuple[Optional[str], ...]] = {"wandb_mode": (None, "online", "offline", "disabled"),
                                              "on_nonfinite": ("stop", "skip")}


def check_limits(config: Any, limits: Dict[str, float]) -> None:
    """A ConfigError for the first field above its upper limit; a None value of an Optional field is not checked."""
    for name, limit in limits.items():
        value = getattr(config, name)
        if value is not None and value > limit:
            raise ConfigError(f"field '{name}' must be at most {limit}, got {value!r}")


def check_config(config: TrainConfig) -> None:
    """Rejects impossible values with a one-line ConfigError naming the field."""
    check_bounds(config, BOUNDS, CHOICES)
    check_limits(config, LIMITS)
    if config.cql_clip_diff_min > config.cql_clip_diff_max:
        raise ConfigError(f"fields 'cql_clip_diff_min' ({config.cql_clip_diff_min}) > "
                          f"'cql_clip_diff_max' ({config.cql_clip_diff_max})")
    if config.ref_min_score is not None and config.ref_max_score is not None \
            and not config.ref_min_score < config.ref_max_score:
        raise ConfigError(f"fields 'ref_min_score' ({config.ref_min_score}) >= 'ref_max_score' "
                          f"({config.ref_max_score}): the return that scores 0 must be below the one that scores 100")
    run_seeds(config)  # a bad seeds value fails here, not after the data is loaded
    if config.device != "auto":
        try:
            device_type = torch.device(config.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cpu", "cuda"):  # torch knows meta, mps, xpu, ...: the scripts run on these two
            raise ConfigError(f"field 'device' must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    if "/" in config.name:  # else the run directory would land in a folder of that name
        raise ConfigError(f"field 'name' starts the run directory's name <name>-<env>-<seed>-<id>: no '/', "
                          f"got {config.name!r}")
    forbidden = [c for c in WANDB_PROJECT_FORBIDDEN if c in config.project]
    if forbidden:
        raise ConfigError(f"field 'project': a wandb project name cannot hold {' '.join(forbidden)}, "
                          f"got {config.project!r}")
    if is_pure_online(config) and config.online_iterations == 0:
        raise ConfigError(f"field 'online_iterations': pure online mode on {config.env} (no dataset, "
                          f"offline_iterations 0) needs online_iterations > 0")


def run_seeds(config: TrainConfig) -> Optional[List[int]]:
    """The seeds of a multi-seed run ("0,1,2,3" -> [0, 1, 2, 3], "4" -> seed..seed+3); None: one run."""
    if config.seeds is None:
        return None
    text = config.seeds.strip()
    expected = f"field 'seeds' expects a count like 4 or a list like 0,1,2,3, got {config.seeds!r}"
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise ConfigError(expected) from None
    count = seeds if isinstance(seeds, int) else len(seeds)
    if count > MAX_RUNS:  # before a count becomes a list
        raise ConfigError(f"field 'seeds': at most {MAX_RUNS} runs in one process, got {count}")
    if isinstance(seeds, int):  # a count: seed, seed + 1, ...
        seeds = list(range(config.seed, config.seed + seeds))
    if not seeds:
        raise ConfigError(expected)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"field 'seeds' lists a seed twice: {config.seeds!r}")
    outside = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if outside:
        raise ConfigError(f"field 'seeds' lists a seed outside [0, {MAX_SEED}]: {outside[0]}")
    return seeds


STACK_RECORD = "stack.yaml"  # in each run directory of a --seeds stack, beside the run's own config.yaml


@dataclass
class StackRecord:
    """<run dir>/stack.yaml of each run of a --seeds stack: the stack the run came from. Its config.yaml
    is the run's own (run_config); --resume of any of the stack's run directories takes seed and seeds
    from here, so the whole stack resumes."""

    seeds: str  # the stack's seeds field, as given: "0,1,2,3", or a count "4" (seed..seed+3)
    seed: int  # the stack's seed: where a count starts, and the one stream of its batches and noise
    runs: List[str]  # the stack's run directory names, in the order of its seeds


def run_config(config: Any, seed: int) -> Any:
    """The config of the run with this seed alone, as its config.yaml and checkpoints record it:
    --config_path of it trains that seed from the start (no seeds, no resume)."""
    return replace(config, seed=seed, seeds=None, resume=None)


def parse_config(argv: List[str], config_class: type = TrainConfig,
                 check: Optional[Callable[[Any], None]] = None) -> Any:
    """Strict parsing of `--config_path file.yaml` plus `--key=value` / `--key value` overrides into
    config_class, then check (default: check_config); tools/make_dataset.py parses its options so too.

    pyrallis draws the `--help` page from the field comments; values are converted here, since
    pyrallis accepts `--normalize=notabool` as True and `--load_model=None` as the text 'None'.
    """
    if "-h" in argv or "--help" in argv:
        import pyrallis

        pyrallis.parse(config_class=config_class, args=["--help"])  # prints the help and exits
    types = {f.name: f.type for f in fields(config_class)}
    overrides: Dict[str, str] = {}
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: expected --key=value, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            value = next(tokens, "--")
            if value.startswith("--"):
                raise ConfigError(f"command line: option '--{key}' needs a value")
        key = key.replace("-", "_")
        if key not in types and key != "config_path":
            raise ConfigError(f"command line: unknown option '--{key}'")
        overrides[key] = value
    config_path = overrides.pop("config_path", None)
    values: Dict[str, Any] = {}
    sources: List[Tuple[str, str, Set[str], Set[str]]] = []  # YAML files in order: what, path, keys allowed, needed
    if config_path is None and "resume" in overrides:  # a resumed run keeps its own config ...
        config_path = str(Path(overrides["resume"]) / "config.yaml")
        if not Path(config_path).is_file():
            raise ConfigError(f"field 'resume': {overrides['resume']} is not a run directory (no config.yaml)")
        stack_path = Path(overrides["resume"]) / STACK_RECORD
        if stack_path.is_file():  # ... and a run of a stack its stack's seed and seeds: the whole stack resumes
            record_keys = {f.name for f in fields(StackRecord)}
            sources.append(("stack record", str(stack_path), record_keys, record_keys))
    if config_path is not None:
        sources.insert(0, ("config file", config_path, set(types), set()))
    for what, path, keys, needed in sources:
        where = f"{what} {path}"
        try:
            with open(path) as f:
                loaded = yaml.load(f, Loader=StrictLoader)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: expected a mapping of field: value")
        missing = sorted(needed - set(loaded))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        for key, value in loaded.items():
            if key not in keys:
                raise ConfigError(f"{where}: unknown key '{key}'")
            if key not in types:  # a stack record's run directory names: the checkpoints name them too
                continue
            if key == "seeds" and isinstance(value, list):  # YAML `seeds: [0, 1]` (a list of one keeps its comma)
                value = ",".join(map(str, value)) + ("," if len(value) == 1 else "")
            elif key == "seeds" and isinstance(value, int) and not isinstance(value, bool):  # YAML `seeds: 4`
                value = str(value)
            values[key] = parse_value(key, types[key], value, where)
    for key, value in overrides.items():
        values[key] = parse_value(key, types[key], value, "command line")
    config = config_class(**values)
    (check or check_config)(config)
    return config




# ======================================================================================
# Data
# ======================================================================================
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


def download_file(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Downloads url to dest through a temporary file in dest's folder, renamed only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DatasetError(f"download {url}: got {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException as e:
        os.unlink(tmp_name)
        if isinstance(e, OSError):
            raise DatasetError(f"download {url}: {e}") from None
        raise
    return dest


def read_d4rl_hdf5(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Reads the arrays of a D4RL-format HDF5 file and checks their shapes and values."""
    path = Path(path)
    where = f"dataset file {path}"
    if not path.is_file():
        raise DatasetError(f"{where}: not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
            data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k in f}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as e:
        raise DatasetError(f"{where}: not a readable HDF5 file ({e})") from None
    for key, values in data.items():  # text, compound or complex values would fail in numpy below, not name the file
        if values.dtype.kind not in "biuf":  # bool, integers or floats
            raise DatasetError(f"{where}: '{key}' must hold real numbers, got dtype {values.dtype}")
    for key in ("rewards", "terminals", "timeouts"):
        if key in data and not (data[key].ndim == 1 or data[key].shape[1:] == (1,)):
            raise DatasetError(f"{where}: '{key}' must hold one value per row, shape (rows,), "
                               f"got shape {data[key].shape}")
    n = len(data["rewards"])
    for key, values in data.items():
        if len(values) != n:
            raise DatasetError(f"{where}: '{key}' has {len(values)} rows, rewards has {n}")
    for key in ("observations", "actions"):
        if data[key].ndim != 2:
            raise DatasetError(f"{where}: '{key}' must be 2-D (rows, dim), got shape {data[key].shape}")
    for key in ("observations", "actions", "rewards"):  # the buffer holds float32: beyond its range would be inf
        for what, bad in (("non-finite values", ~np.isfinite(data[key])),
                          ("values beyond float32's range", np.abs(data[key]) > FLOAT32_MAX)):
            if bad.any():
                raise DatasetError(f"{where}: '{key}' has {what} (first at row {int(np.argwhere(bad)[0][0])})")
    for key in ("terminals", "timeouts"):
        flags = data[key].reshape(-1) if key in data else np.zeros(0)
        if not np.isin(flags, (0, 1)).all():  # astype(bool) would read 0.5 or NaN as true
            row = int(np.flatnonzero(~np.isin(flags, (0, 1)))[0])
            raise DatasetError(f"{where}: '{key}' must be 0 or 1, got {flags[row]} at row {row}")
    check_d4rl_attrs(attrs, path)
    if n < 2:
        raise DatasetError(f"{where}: needs at least 2 rows, has {n}")
    return {**data, "attrs": attrs}


def check_d4rl_attrs(attrs: Dict[str, Any], path: Path) -> None:
    """A DatasetError unless the file's metadata that load_dataset reads has the type it needs."""
    if "env_id" in attrs and not isinstance(attrs["env_id"], str):
        raise DatasetError(f"dataset file {path}: attribute 'env_id' must be a Gymnasium id (text), "
                           f"got {attrs['env_id']!r}")
    steps = attrs.get("max_episode_steps")
    if steps is not None and not (isinstance(steps, (int, np.integer)) and not isinstance(steps, (bool, np.bool_))
                                  and 0 < steps <= MAX_STEPS):
        raise DatasetError(f"dataset file {path}: attribute 'max_episode_steps' must be an integer in "
                           f"[1, {MAX_STEPS}], got {steps!r}")
    for key in ("ref_min_score", "ref_max_score"):
        value = attrs.get(key)
        if value is not None and not (isinstance(value, (int, float, np.integer, np.floating))
                                      and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)):
            raise DatasetError(f"dataset file {path}: attribute '{key}' must be a finite number, got {value!r}")


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


def resolve_goal_in_state(config: TrainConfig, hdf5: bool) -> bool:
    """config.goal_in_state, or its default: false for an HDF5 file (D4RL's AntMaze layout), else true."""
    return (not hdf5) if config.goal_in_state is None else config.goal_in_state


def _describe_space(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Dict):
        return f"a Dict of {', '.join(space.keys())}"
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
    goal_in_state (AntMaze-v4's is then qpos[:15] ++ qvel[:14], D4RL's AntMaze observation); README
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


def _make_gym_env(env_id: str, kwargs: Dict[str, Any], max_episode_steps: Optional[int],
                  goal_in_state: bool) -> Callable[[], gym.Env]:
    check_env_id(env_id)
    extra = {"max_episode_steps": int(max_episode_steps)} if max_episode_steps else {}  # an HDF5 attr is numpy.int64
    return lambda: flat_observation_env(gym.make(env_id, **kwargs, **extra), goal_in_state)


def minari_datasets_dir() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def _load_minari(config: TrainConfig) -> OfflineData:
    import minari

    root = minari_datasets_dir()
    if not config.minari_download and not (root / config.env / "data").is_dir():
        raise DatasetError(f"Minari dataset {config.env}: not stored locally (in {root}); fetch it with "
                           f"`minari download {config.env}` or set --minari_download=true (needs internet)")
    try:
        dataset = minari.load_dataset(config.env, download=config.minari_download)
    except Exception as e:  # minari raises several types for a missing or damaged dataset
        raise DatasetError(f"Minari dataset {config.env}: cannot load ({str(e).splitlines()[0]})") from None
    check_observation_space(dataset.observation_space, f"Minari dataset {config.env}")
    goal_in_state = resolve_goal_in_state(config, hdf5=False)
    episodes = []
    for episode in dataset.iterate_episodes():
        # Minari keeps every episode's last observation: a truncated episode's last row has its real s'
        # and is not terminal (D4RL's files lack that s', so qlearning_transitions drops such rows).
        obs = flatten_observation(episode.observations, goal_in_state).astype(np.float32)
        episodes.append({"observations": obs[:-1], "next_observations": obs[1:],
                         "actions": np.asarray(episode.actions, dtype=np.float32),
                         "rewards": np.asarray(episode.rewards, dtype=np.float32),
                         "terminals": np.asarray(episode.terminations, dtype=np.float32),
                         "episode_ends": np.arange(len(episode.rewards)) == len(episode.rewards) - 1})
    if not episodes:
        raise DatasetError(f"Minari dataset {config.env}: has no episodes")
    arrays = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    metadata = dataset.storage.metadata
    if config.eval_env is not None:
        check_env_id(config.eval_env)

    def make_env() -> gym.Env:
        if config.eval_env is not None:
            env = gym.make(config.eval_env)
        else:
            env = dataset.recover_environment(eval_env=True)
        if config.max_episode_steps:
            env = gym.wrappers.TimeLimit(env, config.max_episode_steps)
        return flat_observation_env(env, goal_in_state)

    env_spec = dataset.spec.env_spec
    task = GYM_LOCOMOTION_TASKS.get(env_spec.name) if env_spec is not None else None
    ref_min, ref_max, origin = metadata.get("ref_min_score"), metadata.get("ref_max_score"), ""
    if ref_min is None and ref_max is None and task is not None:
        ref_min, ref_max = D4RL_DATASETS[f"{task}-random-v2"][1:]
        origin = f"D4RL's {task} random and expert returns; the Minari dataset stores none"
    return OfflineData(
        **arrays, make_env=make_env, ref_min_score=ref_min, ref_max_score=ref_max,
        is_locomotion=task in ("halfcheetah", "hopper", "walker2d"), source=f"Minari dataset {config.env}",
        ref_origin=origin, goal_in_state=goal_in_state,
    )


def load_dataset(config: TrainConfig) -> OfflineData:
    """Resolves config.env to transitions and an eval env: D4RL name, HDF5 path or Minari id."""
    name = config.env
    ref_min, ref_max = None, None
    goal_in_state = resolve_goal_in_state(config, hdf5=True)  # for the HDF5 branches; Minari decides its own
    if name in D4RL_DATASETS or name in MINARI_EQUIVALENTS:
        task = name.split("-")[0]
        if config.eval_env is not None:
            make_env = _make_gym_env(config.eval_env, {}, config.max_episode_steps, goal_in_state)
        elif task in LOCOMOTION_ENVS:
            make_env = _make_gym_env(*LOCOMOTION_ENVS[task], config.max_episode_steps, goal_in_state)
        else:
            raise DatasetError(
                f"env {name}: its D4RL environment needs gym and mujoco-py; use the Minari dataset "
                f"{MINARI_EQUIVALENTS.get(name, '(none known)')} instead, or set eval_env")
        if config.dataset_path is not None:
            path = Path(config.dataset_path)
        else:
            url = D4RL_DATASETS[name][0]
            path = d4rl_cache_dir() / url.rsplit("/", 1)[1]
            if not path.is_file():
                download_file(url, path)
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
    raw = read_d4rl_hdf5(path)
    attrs = raw.pop("attrs")
    if is_locomotion is None:
        env_id = config.eval_env or attrs.get("env_id")
        if env_id is None:
            raise DatasetError(f"dataset file {path}: set eval_env (the file's metadata names no env_id)")
        steps = config.max_episode_steps or attrs.get("max_episode_steps")
        make_env = _make_gym_env(env_id, {}, steps, goal_in_state)
        is_locomotion = any(t in env_id.lower() for t in ("halfcheetah", "hopper", "walker2d"))
        ref_min, ref_max = attrs.get("ref_min_score"), attrs.get("ref_max_score")
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


def reference_scores_line(config: TrainConfig, source: str, ref_min: Optional[float], ref_max: Optional[float],
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


def is_gym_id(name: str) -> bool:
    try:
        check_env_id(name)
    except DatasetError:  # unknown or malformed ids
        return False
    return True


def is_pure_online(config: TrainConfig) -> bool:
    """No dataset: offline_iterations 0, no dataset_path, and env a registered Gymnasium id."""
    return config.offline_iterations == 0 and config.dataset_path is None and is_gym_id(config.env)


def make_reward_transform(config: TrainConfig, data: Optional[OfflineData],
                          max_episode_steps: int = 1000) -> Callable[[Any], np.ndarray]:
    """CORL's modify_reward and modify_reward_online as one function of raw rewards, made once from the
    dataset so that online rows are on the dataset's scale. Only when normalize_reward: locomotion rewards
    times max_episode_steps / (max - min dataset episode return) (no dataset: no range), then every reward
    times reward_scale plus reward_bias."""
    factor = 1.0
    if config.normalize_reward and data is not None and data.is_locomotion:
        low, high = return_range(data.rewards, data.terminals if data.episode_ends is None else data.episode_ends,
                                 max_episode_steps)
        if not high > low:
            raise DatasetError(f"{data.source}: every episode has return {high}; cannot rescale rewards "
                               f"by the return range (set normalize_reward false)")
        factor = max_episode_steps / (high - low)
    scale, bias = (config.reward_scale, config.reward_bias) if config.normalize_reward else (1.0, 0.0)

    def transform(reward: Any) -> np.ndarray:
        with np.errstate(over="ignore"):  # an overflow is train's error on the dataset, not a warning on stderr
            return (np.asarray(reward, dtype=np.float64) * factor * scale + bias).astype(np.float32)

    return transform


# Tasks that end in success or failure: D4RL / Minari names and their Gymnasium-Robotics env ids.
GOAL_TASKS = ("antmaze", "maze2d", "pointmaze", "pen", "door", "hammer", "relocate", "adroithand")
SUCCESS_KEYS = ("success", "is_success", "goal_achieved")


def is_goal_task(*names: Optional[str]) -> bool:
    """Whether any of the names (dataset, env id) is a goal task, by the leading word of a part of its path
    (Minari ids: D4RL/antmaze/..., file paths)."""
    words = [word for name in names if name for word in name.lower().replace("\\", "/").split("/")]
    return any(word.startswith(GOAL_TASKS) for word in words)


def step_success(reward: float, info: Dict[str, Any], sparse_reward: bool) -> Optional[bool]:
    """Whether a step reached the goal: the env's info['success'] (or is_success, goal_achieved);
    for antmaze-like sparse tasks without it, a positive raw reward; None if the step cannot tell."""
    for key in SUCCESS_KEYS:
        if key in info:
            return bool(np.any(info[key]))
    return reward > 0 if sparse_reward else None


# ======================================================================================
# Replay buffer
# ======================================================================================
BUFFER_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


class ReplayBuffer:
    """A ring of device tensors: the dataset in rows [0, n_data), then online transitions at `pointer`,
    which wraps at capacity (the oldest row, dataset rows first, goes). The filled count is also the device
    tensor `size_tensor`, written in place, so that an update captured once as a CUDA graph samples the whole,
    growing ring with no host sync. A checkpoint keeps online_state(): the online rows, pointer, size, counts.

    With runs = (n_seeds,), one ring per run of a seed stack (storage (n_seeds, capacity, ...)); every run
    adds one transition per online iteration, so pointer and size are shared.
    """

    def __init__(self, capacity: int, state_dim: int, action_dim: int, device: torch.device,
                 runs: Tuple[int, ...] = ()):
        self.capacity = capacity
        self.device = device
        self.runs = runs
        self.shapes = {"observations": (state_dim,), "actions": (action_dim,), "rewards": (),
                       "next_observations": (state_dim,), "terminals": ()}
        try:
            self.storage = {k: torch.zeros((*runs, capacity, *shape), dtype=torch.float32, device=device)
                            for k, shape in self.shapes.items()}
        except RuntimeError as e:  # torch.OutOfMemoryError on cuda, "can't allocate memory" on the cpu
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            row_bytes = 4 * sum(math.prod(shape) for shape in self.shapes.values()) * math.prod(runs)
            raise ConfigError(f"field 'buffer_size': a replay ring of {capacity} transitions "
                              f"({capacity * row_bytes / 2**30:.1f} GiB) does not fit in {device}'s memory") from None
        self.size_tensor = torch.zeros((), dtype=torch.int64, device=device)
        self._size = 0
        self.n_data = 0  # dataset rows loaded at the start
        self.n_added = 0  # transitions added online so far (some may be overwritten)
        self.pointer = 0  # the row the next transition goes to

    @property
    def size(self) -> int:
        """Rows holding a transition."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        self.size_tensor.fill_(value)  # in place: a captured graph reads the new size

    def load_dataset(self, arrays: Dict[str, np.ndarray]) -> None:
        n = len(arrays["rewards"])
        if self.size:
            raise ValueError("the dataset goes into an empty buffer")
        if n > self.capacity:
            raise ConfigError(f"field 'buffer_size' ({self.capacity}) is smaller than the dataset ({n} transitions)")
        for key in BUFFER_FIELDS:
            rows = torch.as_tensor(arrays[key], dtype=torch.float32, device=self.device)
            self.storage[key][self._rows(slice(0, n))] = rows
        self.n_data = self.size = n
        self.pointer = n % self.capacity

    def _rows(self, rows: Any) -> Tuple[Any, ...]:
        """Index of `rows` in every run's ring."""
        return (*(slice(None) for _ in self.runs), rows)

    def add(self, obs: np.ndarray, action: np.ndarray, reward: Any, next_obs: np.ndarray, terminal: Any) -> None:
        """One transition, or for a stack one per run (each value with a leading n_seeds dim)."""
        values = (obs, action, reward, next_obs, terminal)  # one copy to the device, then split there
        row = np.concatenate([np.reshape(v, (*self.runs, -1)) for v in values], axis=-1).astype(np.float32)
        parts = torch.as_tensor(row, device=self.device).split([math.prod(self.shapes[k]) for k in BUFFER_FIELDS], -1)
        i = self.pointer
        for key, part in zip(BUFFER_FIELDS, parts):
            self.storage[key][self._rows(i)] = part.view((*self.runs, *self.shapes[key]))
        self.pointer = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.n_added += 1

    def sample(self, batch_size: int, runs: Tuple[int, ...] = ()) -> Tuple[torch.Tensor, ...]:
        """A batch of rows; for a stack (runs = (n_seeds,)) one batch from each run's own ring."""
        # Uniform over [0, 2^62), modulo the filled size read on the device: the first (2^62 mod
        # size) rows are drawn more often by a relative 1 / floor(2^62 / size), under 1e-12 for a
        # ring of up to 4 million rows.
        index = torch.randint(0, 2**62, (*runs, batch_size), device=self.device) % self.size_tensor
        if not runs:
            return tuple(self.storage[key][index] for key in BUFFER_FIELDS)
        run = torch.arange(runs[0], device=self.device)[:, None]
        return tuple(self.storage[key][run, index] for key in BUFFER_FIELDS)

    def newest(self, run: int) -> Tuple[np.ndarray, ...]:
        """The newest row of run `run`'s ring, as add() takes it (normalized, transformed)."""
        i = (self.pointer - 1) % self.capacity
        return tuple(self.storage[key][run, i].cpu().numpy() for key in BUFFER_FIELDS)

    def online_rows(self) -> np.ndarray:
        """Row indices holding online transitions, oldest first."""
        m = min(self.n_added, self.capacity)
        return (self.pointer - m + np.arange(m)) % self.capacity

    def _ring(self, key: str, run: Optional[int]) -> torch.Tensor:
        return self.storage[key] if run is None else self.storage[key][run]

    def online_state(self, run: Optional[int] = None) -> Dict[str, Any]:
        """The online rows (of run `run` of a stack: a one-run buffer's state)."""
        rows = self.online_rows()
        index = torch.as_tensor(rows, device=self.device)
        return {"capacity": self.capacity, "n_data": self.n_data, "n_added": self.n_added, "pointer": self.pointer,
                "size": self.size, "rows": rows, **{k: self._ring(k, run)[index].cpu() for k in BUFFER_FIELDS}}

    def load_online_state(self, state: Dict[str, Any], where: str, field: str = "load_model",
                          run: Optional[int] = None) -> None:
        """Puts a checkpoint's online rows back; the ring must be the same, unless it never wrapped."""
        if state["n_data"] != self.n_data:
            raise ConfigError(f"field '{field}': {where} was made with a dataset of {state['n_data']} "
                              f"transitions, this one has {self.n_data}")
        end = state["n_data"] + state["n_added"]
        if state["capacity"] != self.capacity and not end <= min(state["capacity"], self.capacity):
            raise ConfigError(f"field '{field}': {where} holds a full replay ring of {state['capacity']} "
                              f"rows, this run's has {self.capacity} (keep buffer_size and online_iterations)")
        index = torch.as_tensor(state["rows"], device=self.device)
        for key in BUFFER_FIELDS:
            self._ring(key, run)[index] = state[key].to(self.device)
        self.n_added = state["n_added"]
        if state["capacity"] == self.capacity:
            self.pointer, self.size = state["pointer"], state["size"]
        else:  # it never wrapped: rows [0, end) are filled
            self.pointer, self.size = end % self.capacity, end


# ======================================================================================
# Networks
# ======================================================================================
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def init_linear(linear: nn.Linear, last: bool, orthogonal: bool) -> None:
    """CORL finetune's initialisation of one layer (its init_module_weights, applied to every layer
    of the actor and of both critics when orthogonal_init is on, else to the output layer only).

    orthogonal: every layer, the output layers too, gets orthogonal weights with gain sqrt(2) and a
    zero bias. Otherwise only the output layer changes: xavier-uniform weights with gain 1e-2, its
    bias left at PyTorch's default. The offline script's init_linear is CORL offline's scheme
    (gain 1e-2 output layers, an actor never orthogonal), which differs.
    """
    if orthogonal:
        nn.init.orthogonal_(linear.weight, gain=math.sqrt(2))
        nn.init.zeros_(linear.bias)
    elif last:
        nn.init.xavier_uniform_(linear.weight, gain=1e-2)


class TanhGaussianActor(nn.Module):
    """a = max_action * tanh(u), u ~ N(mean(s), std(s)); 3x256 MLP, learnable log-std scale/offset."""

    def __init__(self, state_dim: int, action_dim: int, max_action: float, log_std_multiplier: float = 1.0,
                 log_std_offset: float = -1.0, orthogonal_init: bool = False):
        super().__init__()
        self.action_dim = action_dim
        self.max_action = max_action
        self.net = nn.Sequential(
            nn.Linear(state_dim, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 2 * action_dim),
        )
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for layer, linear in enumerate(linears):
            init_linear(linear, last=layer == len(linears) - 1, orthogonal=orthogonal_init)
        self.log_std_multiplier = nn.Parameter(torch.tensor(float(log_std_multiplier)))
        self.log_std_offset = nn.Parameter(torch.tensor(float(log_std_offset)))

    def mean_log_std(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, raw_log_std = self.net(obs).split(self.action_dim, dim=-1)
        log_std = (self.log_std_multiplier * raw_log_std + self.log_std_offset).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std

    @staticmethod
    def tanh_log_prob(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log density of tanh(u) for u ~ N(mean, exp(log_std)), summed over action dims."""
        gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # log |d tanh(u)/du| = log(1 - tanh(u)^2), written stably for large |u|
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return (gaussian - log_det).sum(-1)

    def sample(self, mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised action and its log-prob from standard-normal noise of shape mean.shape,
        or (batch, n, A) for n samples per state."""
        if noise.dim() > mean.dim():
            mean, log_std = mean.unsqueeze(-2), log_std.unsqueeze(-2)
        u = mean + log_std.exp() * noise
        return self.max_action * torch.tanh(u), self.tanh_log_prob(mean, log_std, u)

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sample(*self.mean_log_std(obs), noise)

    def action_log_prob(self, mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of given (dataset) actions, used by the behaviour-cloning warm-up."""
        squashed = (actions / self.max_action).clamp(-1.0 + 1e-6, 1.0 - 1e-6)  # data may sit on the bound
        return self.tanh_log_prob(mean, log_std, torch.atanh(squashed))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.action_log_prob(*self.mean_log_std(obs), actions)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic action max_action * tanh(mean), for evaluation."""
        return self.max_action * torch.tanh(self.mean_log_std(obs)[0])


PER_MEMBER_GRAD_UP_TO = 2  # ensemble members up to which EnsembleLinear's weight gradient goes member by member
# (a module constant: torch.compile cannot trace a class attribute read in backward, and breaks the graph)


class EnsembleLinear(torch.autograd.Function):
    """y[e] = x[e % len(x)] @ weight[e] + bias[e] for every member e: x shared by all members when
    its first dim is 1, one x per member, or (seed stacks, members ordered critic-major) one x per seed.
    bias may be None. With weight_rows k, only the first k rows of each member reach the weight and bias
    gradients (the rest, policy rows of EnsembleCritic's one pass, pass their gradient to x only).

    The same as torch.baddbmm, but faster on a GPU: bmm then a bias add (that torch.compile fuses
    with the following relu), as baddbmm first copies the bias into every output row and then runs
    a slower accumulating kernel (1.4x the time of bmm + add at the critics' shapes on an H100); and
    for a few members the weight gradient is one plain matmul per member: cuBLAS runs the batched
    x^T @ grad_y of 2 members, a reduction over all batch rows, with a small-tile kernel 4-6x slower
    (benchmarks/critic_matmul.py); with many members (seed stacks) the batched form fills the GPU.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                weight_rows: Optional[int] = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.weight_rows = weight_rows
        members, inputs = weight.shape[0], x.shape[0]
        if inputs == 1:
            x = x.expand(members, -1, -1)
        elif inputs < members:
            x = x.repeat(members // inputs, 1, 1)  # member e reads x[e % inputs]
        y = torch.bmm(x, weight)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        members, inputs = weight.shape[0], x.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_y, weight.transpose(1, 2))
            if inputs < members:  # the members that share an input add their gradients
                grad_x = grad_x.unflatten(0, (members // inputs, inputs)).sum(0)
        if ctx.weight_rows is not None:
            x, grad_y = x[:, :ctx.weight_rows], grad_y[:, :ctx.weight_rows]
        if ctx.needs_input_grad[1] and members <= PER_MEMBER_GRAD_UP_TO:
            grad_weight = torch.stack([x[e % inputs].T @ grad_y[e] for e in range(members)])
        elif ctx.needs_input_grad[1]:
            per_member_x = x.repeat(members // inputs, 1, 1) if inputs < members else x
            grad_weight = torch.bmm(per_member_x.transpose(1, 2), grad_y)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(1, keepdim=True)
        return grad_x, grad_weight, grad_bias, None


class ActorStack(nn.Module):
    """The actors of n_seeds runs as stacked weights (n_seeds, in, out): one batched matmul per layer.

    Takes (n_seeds, rows, S) states, row block i for actor i; sampling and log-probs are
    TanhGaussianActor's own, on (n_seeds, rows, ...) tensors. member(i) gives run i's actor weights
    in TanhGaussianActor's layout, for evaluation and per-run checkpoints.
    """

    def __init__(self, actors: List[TanhGaussianActor]):
        super().__init__()
        self.action_dim, self.max_action = actors[0].action_dim, actors[0].max_action
        linears = [[m for m in actor.net if isinstance(m, nn.Linear)] for actor in actors]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([run[layer].weight.detach().T for run in linears]))
                                        for layer in range(len(linears[0])))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([run[layer].bias.detach()[None] for run in linears]))
                                       for layer in range(len(linears[0])))
        self.log_std_multiplier = nn.Parameter(torch.stack([a.log_std_multiplier.detach() for a in actors]))
        self.log_std_offset = nn.Parameter(torch.stack([a.log_std_offset.detach() for a in actors]))

    def mean_log_std(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = obs
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = EnsembleLinear.apply(x, weight, bias)
            if layer < len(self.weights) - 1:
                x = torch.relu(x)
        mean, raw_log_std = x.split(self.action_dim, dim=-1)
        log_std = (self.log_std_multiplier[:, None, None] * raw_log_std
                   + self.log_std_offset[:, None, None]).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std

    forward = TanhGaussianActor.forward  # (n_seeds, rows, S) states, (n_seeds, rows, A) noise
    tanh_log_prob = staticmethod(TanhGaussianActor.tanh_log_prob)
    sample = TanhGaussianActor.sample
    action_log_prob = TanhGaussianActor.action_log_prob

    def member(self, run: int) -> Dict[str, torch.Tensor]:
        """Run `run`'s actor as a TanhGaussianActor state dict (views of the stacked weights)."""
        state = {}
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            state[f"net.{2 * layer}.weight"] = weight[run].T
            state[f"net.{2 * layer}.bias"] = bias[run, 0]
        state["log_std_multiplier"], state["log_std_offset"] = self.log_std_multiplier[run], self.log_std_offset[run]
        return state


class EnsembleCritic(nn.Module):
    """n_critics Q-networks of equal depth as stacked weights: one batched matmul per layer."""

    def __init__(self, state_dim: int, action_dim: int, n_hidden_layers: int, orthogonal_init: bool,
                 n_critics: int = 2, hidden: int = 256):
        super().__init__()
        sizes = [state_dim + action_dim] + [hidden] * n_hidden_layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = layer == len(sizes) - 2
            members = []
            for _ in range(n_critics):  # each member initialised as its own nn.Linear would be
                linear = nn.Linear(fan_in, fan_out)  # [s, a] -> hidden in one matrix: what CORL's first layer is
                init_linear(linear, last, orthogonal_init)
                members.append(linear)
            self.weights.append(nn.Parameter(torch.stack([m.weight.detach().T for m in members])))
            self.biases.append(nn.Parameter(torch.stack([m.bias.detach()[None] for m in members])))
        self.n_seeds = 1
        self.one_pass = False  # score forward's policy_actions in the same batched pass (UpdateStep's compile)
        self.sum_output = False  # the output layer as multiply-and-sum (UpdateStep's compile)

    @staticmethod
    def stack(critics: List["EnsembleCritic"]) -> "EnsembleCritic":
        """The ensembles of n_seeds runs as one of n_critics * n_seeds members, critic-major:
        member c * n_seeds + i is critic c of run i, so that outputs reshape to (n_critics, n_seeds, ...)."""
        stacked = copy.deepcopy(critics[0])
        stacked.n_seeds = len(critics)
        for name in ("weights", "biases"):
            for layer, _ in enumerate(getattr(stacked, name)):
                members = torch.stack([getattr(c, name)[layer].detach() for c in critics], dim=1)
                getattr(stacked, name)[layer] = nn.Parameter(members.flatten(0, 1))
        return stacked

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False,
                policy_actions: Optional[torch.Tensor] = None) -> Any:
        """Q-values of shape (n_critics, *batch) for actions (*batch, A) at obs (*obs_batch, S), where
        obs_batch broadcasts to batch (one state against several actions: (B, 1) against (B, k)); for
        a stack of runs, both start with n_seeds and each run's rows meet only its own critics.

        policy_actions (*obs_batch, A), one per state, are scored too and returned second, as
        forward(obs, policy_actions, detach_params=True) scores them (the actor's objective: the gradient
        reaches the actions only). With one_pass they join the same batched pass as rows whose weight
        gradients are left out: 4 fewer matmuls of 256 rows forward and back, the same math."""
        if policy_actions is not None and not self.one_pass:
            return self(obs, actions, detach_params), self(obs, policy_actions, detach_params=True)
        weights, biases = list(self.weights), list(self.biases)
        if detach_params:  # gradient flows to the inputs only (the actor's objective)
            weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
        # The first layer in two parts, [s, a] @ W = s @ W_s + a @ W_a: the state part once per state,
        # shared by all the actions scored at it (1 + 3 * cql_n_actions per state in the penalty).
        state_dim, members, hidden = obs.shape[-1], weights[0].shape[0], weights[0].shape[-1]
        from_state = EnsembleLinear.apply(obs.reshape(self.n_seeds, -1, state_dim), weights[0][:, :state_dim],
                                          biases[0])
        from_action = EnsembleLinear.apply(actions.reshape(self.n_seeds, -1, actions.shape[-1]),
                                           weights[0][:, state_dim:], None)
        run_dims = int(self.n_seeds > 1)  # a stack's seed dim is folded into the members
        x = (from_state.reshape(members, *obs.shape[run_dims:-1], hidden)
             + from_action.reshape(members, *actions.shape[run_dims:-1], hidden))
        x = x.reshape(members, -1, hidden)
        rows = x.shape[1]  # the rows that train the weights
        if policy_actions is not None:  # the policy rows go last, through detached first-layer weights
            policy_part = EnsembleLinear.apply(policy_actions.reshape(self.n_seeds, -1, actions.shape[-1]),
                                               weights[0][:, state_dim:].detach(), None)
            x = torch.cat([x, from_state.detach() + policy_part], dim=1)
        weight_rows = None if policy_actions is None else rows
        for weight, bias in zip(weights[1:-1], biases[1:-1]):
            x = EnsembleLinear.apply(torch.relu(x), weight, bias, weight_rows)
        x = torch.relu(x)
        if self.sum_output:  # the one-unit output layer as multiply-and-sum, which torch.compile fuses with the
            # relu and its backward instead of running matrix-vector kernels; policy rows through detached weights
            weight, bias = weights[-1].transpose(1, 2), biases[-1][..., 0]  # (members, 1, hidden), (members, 1)
            q = (x[:, :rows] * weight).sum(-1) + bias
            if policy_actions is not None:
                q = torch.cat([q, (x[:, rows:] * weight.detach()).sum(-1) + bias.detach()], dim=1)
        else:
            q = EnsembleLinear.apply(x, weights[-1], biases[-1], weight_rows).reshape(members, -1)
        if policy_actions is None:
            return q.reshape(-1, *actions.shape[:-1])
        return q[:, :rows].reshape(-1, *actions.shape[:-1]), q[:, rows:].reshape(-1, *policy_actions.shape[:-1])


# ======================================================================================
# Algorithm
# ======================================================================================
METRIC_NAMES = (  # CORL's names, in the order losses() returns them
    "policy_loss", "alpha_loss", "alpha", "log_pi", "qf1_loss", "qf2_loss", "average_qf1", "average_qf2",
    "average_target_q", "cql_std_q1", "cql_std_q2", "cql_q1_rand", "cql_q2_rand", "cql_q1_current_actions",
    "cql_q2_current_actions", "cql_q1_next_actions", "cql_q2_next_actions", "cql_min_qf1_loss",
    "cql_min_qf2_loss", "cql_qf1_diff", "cql_qf2_diff", "alpha_prime_loss", "alpha_prime",
)


class CQL:
    """SAC with the CQL(H) critic penalty. train(batch) makes one update and returns device metrics.

    `cql_alpha` (config.cql_alpha offline, cql_alpha_online after train()'s switch) is read by the losses
    from `cql_alpha_tensor`, written in place, so a captured CUDA graph sees the switch. At 0 without
    cql_lagrange the penalty reaches no gradient, so it is not computed (a phase of its own; metrics 0).

    With seeds, one trainer holds len(seeds) independent runs, as in the offline script: a leading run
    dimension on every network, alpha and Adam state (critic-major in the critic ensemble), so the summed
    loss and one element-wise Adam step are exactly n_seeds separate updates; run i starts from the one-seed
    run of seeds[i]; all share cql_alpha.

    With on_nonfinite "skip", apply_update sets the device scalar `found_inf` (no host sync) when the loss
    or a gradient is non-finite; fused Adam (the one that reads optimizer.found_inf, as AMP's GradScaler)
    then leaves weights, moments and step counts, and the targets stay. One found_inf skips a whole stack.
    """

    def __init__(self, config: TrainConfig, state_dim: int, action_dim: int, max_action: float,
                 device: torch.device, capturable: bool = False, seeds: Optional[List[int]] = None):
        self.config = config
        self.device = device
        self.action_dim = action_dim
        self.target_entropy = -float(action_dim)
        self.seeds = seeds
        self.run_shape: Tuple[int, ...] = () if seeds is None else (len(seeds),)
        if seeds is None:
            layers, log_std_multiplier = config.q_n_hidden_layers, config.policy_log_std_multiplier
            self.actor = TanhGaussianActor(state_dim, action_dim, max_action, log_std_multiplier,
                                           orthogonal_init=config.orthogonal_init).to(device)
            self.critic = EnsembleCritic(state_dim, action_dim, layers, config.orthogonal_init).to(device)
            self.target_critic = EnsembleCritic(state_dim, action_dim, layers, False).to(device)
            self.target_critic.load_state_dict(self.critic.state_dict())
            self.log_alpha = nn.Parameter(torch.zeros((), device=device))
            self.log_alpha_prime = nn.Parameter(torch.ones((), device=device))
        else:
            runs = []
            with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on untouched
                for seed in seeds:
                    torch.manual_seed(seed)
                    runs.append(CQL(config, state_dim, action_dim, max_action, torch.device("cpu")))
            self.actor = ActorStack([r.actor for r in runs]).to(device)
            self.critic = EnsembleCritic.stack([r.critic for r in runs]).to(device)
            self.target_critic = EnsembleCritic.stack([r.target_critic for r in runs]).to(device)
            self.log_alpha = nn.Parameter(torch.stack([r.log_alpha.detach() for r in runs]).to(device))
            self.log_alpha_prime = nn.Parameter(torch.stack([r.log_alpha_prime.detach() for r in runs]).to(device))
        self.target_critic.requires_grad_(False)
        self.skip_nonfinite = config.on_nonfinite == "skip"
        # One Adam over four groups: each parameter only gets the gradient of its own loss (see losses),
        # so a single step equals CORL's four optimizers stepping one after another.
        self.optimizer = torch.optim.Adam([
            {"params": list(self.actor.parameters()), "lr": config.policy_lr},
            {"params": list(self.critic.parameters()), "lr": config.qf_lr},
            {"params": [self.log_alpha], "lr": config.policy_lr},
            {"params": [self.log_alpha_prime], "lr": config.qf_lr},
        ], **({"capturable": True, "fused": True} if capturable  # fused, step count on the device
              else {"fused": True} if self.skip_nonfinite else {}))  # only fused Adam can skip a step
        self.found_inf = torch.zeros((), device=device)  # 1.0 while the update just made was skipped
        self.unit_scale = torch.ones((), device=device)  # the non-finite check's "unscale": by 1
        if self.skip_nonfinite:
            self.optimizer.found_inf = self.found_inf  # Adam.step hands it to the fused step
        self.step_optimizer = self.optimizer.step  # compile_optimizer_step() compiles it
        self.total_it = 0
        self.cql_alpha_tensor = torch.zeros((), device=device)
        self.cql_alpha = config.cql_alpha

    @property
    def cql_alpha(self) -> float:
        return self._cql_alpha

    @cql_alpha.setter
    def cql_alpha(self, value: float) -> None:
        self._cql_alpha = value
        self.cql_alpha_tensor.fill_(float(value))

    def draw_noise(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """Every random draw of one update, so that a test can replay the same update by hand."""
        n, a, b = self.config.cql_n_actions, self.action_dim, (*self.run_shape, batch_size)  # each run its own
        next_shape = (*b, n, a) if self.config.cql_max_target_backup else (*b, a)
        kwargs = {"device": self.device}
        return {
            "policy": torch.randn(*b, a, **kwargs),
            "next": torch.randn(*next_shape, **kwargs),
            "cql_current": torch.randn(*b, n, a, **kwargs),
            "cql_next": torch.randn(*b, n, a, **kwargs),
            "cql_random": torch.rand(*b, n, a, **kwargs) * 2.0 - 1.0,
        }

    def losses(self, batch: Tuple[torch.Tensor, ...], noise: Dict[str, torch.Tensor], bc: bool, penalty: bool
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sum of the four losses, each reaching only its own parameters, and the metrics; the CQL
        penalty only when `penalty` (else its metrics are 0).

        Tensors are (*runs, batch, ...) with runs = run_shape: () for one run, (n_seeds,) for a stack,
        so batch reductions are over dim -1 (or -2 for rows of vectors), and each loss and metric
        has shape runs; the total sums the runs' losses, which share no parameter.
        """
        c = self.config
        obs, actions, rewards, next_obs, dones = batch
        runs = rewards.shape[:-1]

        # One actor pass over s and s' serves every sample of the update; the gradient reaches the
        # actor only through the policy sample at s.
        mean, log_std = self.actor.mean_log_std(torch.cat([obs, next_obs], dim=-2))
        (mean_s, mean_next), (log_std_s, log_std_next) = mean.chunk(2, dim=-2), log_std.chunk(2, dim=-2)
        new_actions, log_pi = self.actor.sample(mean_s, log_std_s, noise["policy"])
        if c.use_automatic_entropy_tuning:
            alpha_loss = -(self.log_alpha[..., None] * (log_pi.detach() + self.target_entropy)).mean(-1)
            alpha = self.log_alpha.exp().detach() * c.alpha_multiplier
        else:
            alpha_loss = obs.new_zeros(runs)
            alpha = obs.new_full(runs, c.alpha_multiplier)
        alpha_row = alpha[..., None]  # each run's alpha against its batch rows
        if bc:  # the warm-up's objective: the data actions' log-likelihood (after it: Q, scored below)
            policy_objective = self.actor.action_log_prob(mean_s, log_std_s, actions)

        # TD target
        with torch.no_grad():
            mean_s, log_std_s, mean_next, log_std_next = (t.detach() for t in (mean_s, log_std_s, mean_next,
                                                                               log_std_next))
            next_actions, next_log_pi = self.actor.sample(mean_next, log_std_next, noise["next"])
            target_q = self.target_critic(next_obs.unsqueeze(-2) if c.cql_max_target_backup else next_obs,
                                          next_actions).min(0).values
            if c.cql_max_target_backup:  # best of n sampled next actions, and its log-prob
                target_q, best = target_q.max(-1)
                next_log_pi = next_log_pi.gather(-1, best[..., None]).squeeze(-1)
            if c.backup_entropy:
                target_q = target_q - alpha_row * next_log_pi
            td_target = rewards + (1.0 - dones) * c.discount * target_q

        if not penalty:  # plain SAC critic loss; after the warm-up the actor's objective in the same pass
            if bc:
                q_data = self.critic(obs, actions)  # (2, *runs, B)
            else:
                q_data, q_policy = self.critic(obs, actions, policy_actions=new_actions)
                policy_objective = q_policy.min(0).values
            policy_loss = (alpha_row * log_pi - policy_objective).mean(-1)
            qf_losses = ((q_data - td_target) ** 2).mean(-1)
            zero = obs.new_zeros(runs)
            zeros2 = obs.new_zeros(2, *runs)
            critic_loss = qf_losses.sum(0)
            total = (policy_loss + alpha_loss + critic_loss).sum()
            return total, self._metrics(policy_loss, alpha_loss, alpha, log_pi, qf_losses, q_data, target_q,
                                        zeros2, zeros2, zeros2, zeros2, zeros2, zeros2, zero, zero)

        with torch.no_grad():  # sampled actions for the penalty: policy at s and at s' (both scored at s), uniform
            current_actions, current_log_pi = self.actor.sample(mean_s, log_std_s, noise["cql_current"])
            next_state_actions, next_state_log_pi = self.actor.sample(mean_next, log_std_next, noise["cql_next"])

        # All critic evaluations of the critic loss in one batched pass: data, random, current, next;
        # and after the warm-up the actor's objective, min Q(s, a ~ pi(s)), its gradient reaching the actor only.
        n = c.cql_n_actions
        sampled = torch.cat([noise["cql_random"], current_actions, next_state_actions], dim=-2)  # (*runs, B, 3n, A)
        penalty_actions = torch.cat([actions.unsqueeze(-2), sampled], dim=-2)
        if bc:
            q_all = self.critic(obs.unsqueeze(-2), penalty_actions)  # (2, *runs, B, 1 + 3n)
        else:
            q_all, q_policy = self.critic(obs.unsqueeze(-2), penalty_actions, policy_actions=new_actions.unsqueeze(-2))
            policy_objective = q_policy[..., 0].min(0).values
        policy_loss = (alpha_row * log_pi - policy_objective).mean(-1)
        q_data = q_all[..., 0]
        q_rand, q_current, q_next = q_all[..., 1:].split(n, dim=-1)
        qf_losses = ((q_data - td_target) ** 2).mean(-1)  # (2, *runs)

        cql_std = torch.cat([q_rand, q_data[..., None], q_next, q_current], dim=-1).std(-1).mean(-1)
        if c.cql_importance_sample:
            random_density = math.log(0.5 ** self.action_dim)
            cat_q = torch.cat([q_rand - random_density, q_next - next_state_log_pi, q_current - current_log_pi], -1)
        else:
            cat_q = torch.cat([q_rand, q_data[..., None], q_next, q_current], dim=-1)
        ood = torch.logsumexp(cat_q / c.cql_temp, dim=-1) * c.cql_temp
        cql_diff = (ood - q_data).clamp(c.cql_clip_diff_min, c.cql_clip_diff_max).mean(-1)  # (2, *runs)
        cql_alpha = self.cql_alpha_tensor
        if c.cql_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            cql_min_losses = alpha_prime.detach() * cql_alpha * (cql_diff - c.cql_target_action_gap)
            alpha_prime_loss = -0.5 * (alpha_prime * cql_alpha * (cql_diff.detach() - c.cql_target_action_gap)).sum(0)
        else:
            alpha_prime = obs.new_zeros(runs)
            cql_min_losses = cql_alpha * cql_diff
            alpha_prime_loss = obs.new_zeros(runs)
        critic_loss = qf_losses.sum(0) + cql_min_losses.sum(0)

        total = (policy_loss + alpha_loss + critic_loss + alpha_prime_loss).sum()  # runs add up: disjoint parameters
        return total, self._metrics(policy_loss, alpha_loss, alpha, log_pi, qf_losses, q_data, target_q, cql_std,
                                    q_rand.mean((-2, -1)), q_current.mean((-2, -1)), q_next.mean((-2, -1)),
                                    cql_min_losses, cql_diff, alpha_prime_loss, alpha_prime)

    @staticmethod
    def _metrics(policy_loss, alpha_loss, alpha, log_pi, qf_losses, q_data, target_q, cql_std, q_rand, q_current,
                 q_next, cql_min_losses, cql_diff, alpha_prime_loss, alpha_prime) -> Dict[str, torch.Tensor]:
        """CORL's metric names, each of shape run_shape; the per-critic arguments have shape (2, *runs)."""
        metrics = {
            "policy_loss": policy_loss, "alpha_loss": alpha_loss, "alpha": alpha, "log_pi": log_pi.mean(-1),
            "qf1_loss": qf_losses[0], "qf2_loss": qf_losses[1],
            "average_qf1": q_data[0].mean(-1), "average_qf2": q_data[1].mean(-1),
            "average_target_q": target_q.mean(-1),
            "cql_std_q1": cql_std[0], "cql_std_q2": cql_std[1],
            "cql_q1_rand": q_rand[0], "cql_q2_rand": q_rand[1],
            "cql_q1_current_actions": q_current[0], "cql_q2_current_actions": q_current[1],
            "cql_q1_next_actions": q_next[0], "cql_q2_next_actions": q_next[1],
            "cql_min_qf1_loss": cql_min_losses[0], "cql_min_qf2_loss": cql_min_losses[1],
            "cql_qf1_diff": cql_diff[0], "cql_qf2_diff": cql_diff[1],
            "alpha_prime_loss": alpha_prime_loss, "alpha_prime": alpha_prime,
        }
        return {k: v.detach() for k, v in metrics.items()}

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        """One update of actor, critics, alpha and alpha'; metrics stay on the device."""
        self.total_it += 1
        phase = self.phase(self.total_it)
        return self.apply_update(batch, self.draw_noise(batch[0].shape[0]), *phase)

    def phase(self, update: int) -> Tuple[bool, bool, bool]:
        """(behaviour-cloning update?, target update after it?, penalty computed?) for the update-th update."""
        penalty = not (self.cql_alpha == 0.0 and not self.config.cql_lagrange)
        return update <= self.config.bc_steps, update % self.config.target_update_period == 0, penalty

    def apply_update(self, batch: Tuple[torch.Tensor, ...], noise: Dict[str, torch.Tensor], bc: bool,
                     update_target: bool, penalty: bool) -> Dict[str, torch.Tensor]:
        total, metrics = self.losses(batch, noise, bc, penalty)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.skip_nonfinite:  # found_inf = 1 if the loss or any gradient is non-finite, on the device
            self.found_inf.zero_()
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.unit_scale)
            self.found_inf.copy_(torch.maximum(self.found_inf, (~total.isfinite()).float()))
        self.step_optimizer()  # with found_inf 1: no change to weights, moments or step counts
        if update_target:
            self.update_target()
        return metrics

    def fuse_critic_layers(self) -> None:
        """The critics' forms for torch.compile (the same math). H200: one_pass, one run +2-5% updates/s; a
        16-seed stack +1% for 7 MiB more GPU memory per seed, so not. sum_output: +4% for both, the same memory."""
        self.critic.one_pass = self.seeds is None
        self.critic.sum_output = True

    def compile_optimizer_step(self) -> None:
        """Adam's step as foreach Adam under torch.compile, which fuses it into a few kernels: one run's
        step takes 12 us instead of fused Adam's 68 (H200), 8% more updates/s. A stack keeps fused Adam (at 16
        seeds 59 us against 101, but 1% faster for 12 MiB more GPU memory per seed); so does on_nonfinite
        "skip", whose fused step reads found_inf."""
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = False, True
        self.step_optimizer = torch.compile(self.optimizer.step)
        # Dynamo says once that it leaves Optimizer.step's profiler range out: nothing a user can act on
        logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)

    @torch.no_grad()
    def update_target(self) -> None:
        """Polyak update of the target critics; with on_nonfinite "skip", none after a skipped update."""
        targets, params = list(self.target_critic.parameters()), list(self.critic.parameters())
        tau = self.config.soft_target_update_rate
        if not self.skip_nonfinite:
            torch._foreach_lerp_(targets, params, tau)
            return
        skipped = self.found_inf.bool()
        for target, moved in zip(targets, torch._foreach_lerp(targets, params, tau)):  # the same lerp, then kept
            target.copy_(torch.where(skipped, target, moved))  # or not: no host sync

    def parameters_finite(self) -> bool:
        """Whether every weight is finite (one host sync)."""
        params = [*self.actor.parameters(), *self.critic.parameters(), self.log_alpha, self.log_alpha_prime]
        return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())

    def state_dict(self) -> Dict[str, Any]:
        return {
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(), "log_alpha_prime": self.log_alpha_prime.detach().clone(),
            "optimizer": self.optimizer.state_dict(), "total_it": self.total_it, "cql_alpha": float(self.cql_alpha),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
            self.log_alpha_prime.copy_(state["log_alpha_prime"])
        flavour = [(group["capturable"], group["fused"], group["foreach"]) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        # Adam takes the saved run's capturable/fused/foreach flags with its state; keep this run's (a CPU
        # checkpoint may go on under CUDA graphs, a "stop" run's with on_nonfinite "skip", a compiled step's
        # without, and back), step counts where this flavour keeps them.
        for group, (capturable, fused, foreach) in zip(self.optimizer.param_groups, flavour):
            group["capturable"], group["fused"], group["foreach"] = capturable, fused, foreach
            for param in group["params"]:
                param_state = self.optimizer.state.get(param, {})
                if "step" in param_state:
                    param_state["step"] = param_state["step"].to(param.device if capturable or fused else "cpu")
        self.total_it = int(state["total_it"])

    # ---- a stack of runs: each run's state in the one-run layout, so that its checkpoint is an ordinary one
    def _run_layout(self) -> List[Tuple[str, str, torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]]:
        """(part, one-run name, stacked tensor, view of run i) in the one-run trainer's parameter order."""
        def seed_major(t: torch.Tensor, i: int) -> torch.Tensor:
            return t[i]

        def critic_major(t: torch.Tensor, i: int) -> torch.Tensor:
            return t.unflatten(0, (-1, len(self.seeds)))[:, i]

        layout = [("actor", "log_std_multiplier", self.actor.log_std_multiplier, seed_major),  # a module's own
                  ("actor", "log_std_offset", self.actor.log_std_offset, seed_major)]  # parameters come first
        for layer, (weight, bias) in enumerate(zip(self.actor.weights, self.actor.biases)):
            layout.append(("actor", f"net.{2 * layer}.weight", weight, lambda t, i: t[i].T))
            layout.append(("actor", f"net.{2 * layer}.bias", bias, lambda t, i: t[i, 0]))
        for part, module in (("critic", self.critic), ("target_critic", self.target_critic)):
            for name, param in module.named_parameters():
                layout.append((part, name, param, critic_major))
        layout.append(("log_alpha", "", self.log_alpha, seed_major))
        layout.append(("log_alpha_prime", "", self.log_alpha_prime, seed_major))
        return layout

    def _adam_indices(self) -> List[Tuple[int, int, torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]]:
        """(index in a one-run optimizer state, index in this stack's, stacked parameter, view of run i)."""
        stacked_index = {id(p): k for k, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        trained = [entry for entry in self._run_layout() if entry[0] != "target_critic"]  # the one-run order
        return [(j, stacked_index[id(tensor)], tensor, view) for j, (_, _, tensor, view) in enumerate(trained)]

    def run_state_dict(self, run: int) -> Dict[str, Any]:
        """Run `run` of a stack as a one-run trainer's state_dict (copies): what CQL.load_state_dict takes."""
        state: Dict[str, Any] = {"actor": {}, "critic": {}, "target_critic": {}}
        adam = self.optimizer.state_dict()
        for part, name, tensor, view in self._run_layout():
            if part in ("log_alpha", "log_alpha_prime"):
                state[part] = view(tensor.detach(), run).clone()
            else:
                state[part][name] = view(tensor.detach(), run).clone()
        adam_state = adam["state"]
        run_adam = {j: {key: v.clone() if key == "step" else view(v, run).clone() for key, v in adam_state[k].items()}
                    for j, k, _, view in self._adam_indices() if k in adam_state}
        state["optimizer"] = {"state": run_adam, "param_groups": adam["param_groups"]}
        state["total_it"], state["cql_alpha"] = self.total_it, float(self.cql_alpha)
        return state

    def load_run_state_dicts(self, states: List[Dict[str, Any]]) -> None:
        """Loads one one-run state_dict per run of the stack (checkpoints of one-seed runs fit too)."""
        if len(states) != len(self.seeds):
            raise ValueError(f"{len(states)} run states for a stack of {len(self.seeds)} runs")

        def gather(tensor: torch.Tensor, view: Callable, values: List[torch.Tensor]) -> torch.Tensor:
            stacked = torch.empty_like(tensor)
            for i, value in enumerate(values):
                target = view(stacked, i)
                if target.shape != value.shape:
                    raise RuntimeError(f"size mismatch: {tuple(value.shape)} in a checkpoint, "
                                       f"{tuple(target.shape)} here")
                target.copy_(value)
            return stacked

        with torch.no_grad():
            for part, name, tensor, view in self._run_layout():
                values = [s[part] if part in ("log_alpha", "log_alpha_prime") else s[part][name] for s in states]
                tensor.copy_(gather(tensor, view, [torch.as_tensor(v).to(tensor.device) for v in values]))
        adam = self.optimizer.state_dict()
        adam["state"] = {}
        for j, k, tensor, view in self._adam_indices():
            runs = [s["optimizer"]["state"].get(j) for s in states]
            if any(r is None for r in runs):
                if any(r is not None for r in runs):
                    raise RuntimeError(f"optimizer state of parameter {j} is in some run states only")
                continue
            adam["state"][k] = {key: runs[0][key].clone() if key == "step" else
                                gather(tensor, view, [r[key].to(tensor.device) for r in runs])
                                for key in runs[0]}
        self.optimizer.load_state_dict(adam)
        totals = {int(s["total_it"]) for s in states}
        if len(totals) != 1:
            raise RuntimeError(f"run states of different updates {sorted(totals)}")
        self.total_it = totals.pop()


class UpdateStep:
    """Draws a batch, updates, and adds the metrics to a device-side running sum.

    With every speed flag off this is `trainer.train(buffer.sample(batch_size))`. `compile` wraps the losses
    (and one run's Adam step) in torch.compile and switches the critics to their fused forms
    (EnsembleCritic.one_pass for one run, sum_output); `cudagraphs` (cuda only) records the whole update, sampling
    to Adam step and metric sum, once per phase (bc, target update, penalty) after a few eager updates, then
    replays it: one launch instead of hundreds, reading the ring's size and cql_alpha from device tensors
    written in place.

    With on_nonfinite "skip", a skipped update (trainer.found_inf 1) adds nothing to the sums and one to
    `skipped_updates`; the means are over the updates kept.
    """

    WARMUP = 3  # eager updates before capture: lazy init of Adam state, cuBLAS and compilation

    def __init__(self, trainer: CQL, buffer: ReplayBuffer, batch_size: int, compile: bool = False,
                 cudagraphs: bool = False):
        self.trainer, self.buffer, self.batch_size = trainer, buffer, batch_size
        self.cudagraphs = cudagraphs and trainer.device.type == "cuda"
        if compile:
            trainer.losses = torch.compile(trainer.losses)  # shadows the method on this instance
            trainer.fuse_critic_layers()
            if trainer.seeds is None and not trainer.skip_nonfinite:
                trainer.compile_optimizer_step()
        self.metric_names: List[str] = list(METRIC_NAMES)
        self.metric_sum = torch.zeros(len(self.metric_names), *trainer.run_shape, device=trainer.device)
        self.skipped_updates = torch.zeros((), device=trainer.device)  # skipped updates in the window (all runs')
        self.graphs: Dict[Tuple[bool, bool, bool], Any] = {}
        self.eager_updates: Dict[Tuple[bool, bool, bool], int] = {}

    def _update(self, phase: Tuple[bool, bool, bool]) -> None:
        batch = self.buffer.sample(self.batch_size, self.trainer.run_shape)
        metrics = self.trainer.apply_update(batch, self.trainer.draw_noise(self.batch_size), *phase)
        values = torch.stack([metrics[name] for name in self.metric_names])
        if not self.trainer.skip_nonfinite:
            self.metric_sum += values
            return
        skipped = self.trainer.found_inf
        self.metric_sum += torch.where(skipped.bool(), 0.0, values)  # not a product: NaN * 0 is NaN
        self.skipped_updates += skipped

    def __call__(self) -> None:
        trainer = self.trainer
        trainer.total_it += 1
        phase = trainer.phase(trainer.total_it)
        if not self.cudagraphs:
            return self._update(phase)
        graph = self.graphs.get(phase)
        if graph is not None:
            return graph.replay()
        if self.eager_updates.get(phase, 0) < self.WARMUP:  # on a side stream, as CUDA graphs want
            self.eager_updates[phase] = self.eager_updates.get(phase, 0) + 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._update(phase)
            torch.cuda.current_stream().wait_stream(stream)
            return None
        trainer.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._update(phase)
        self.graphs[phase] = graph
        graph.replay()  # capture records without running: this replay is the update itself
        return None

    def take_means(self, updates: int) -> Dict[str, float]:
        """Mean of each metric over the last `updates` updates; the one host sync per log interval."""
        return self.take_run_means(updates)[0]

    def run_metric_sum(self, run: int) -> torch.Tensor:
        """Run `run`'s metric sums (a view): the whole sum for a one-run trainer."""
        return self.metric_sum if self.metric_sum.dim() == 1 else self.metric_sum[:, run]

    def take_run_means(self, updates: int) -> List[Dict[str, float]]:
        """take_means for each run: one dict for a one-run trainer, one per seed for a stack. With
        on_nonfinite "skip": means over the updates not skipped, and skipped_updates, their count."""
        sums = self.metric_sum.reshape(len(self.metric_names), -1)
        if not self.trainer.skip_nonfinite:
            means = (sums / updates).T.tolist()
            self.metric_sum.zero_()
            return [dict(zip(self.metric_names, run)) for run in means]
        kept = (updates - self.skipped_updates).clamp(min=1)  # none kept: the sums are 0 and train() stops
        rows = torch.cat([sums / kept, self.skipped_updates.expand(1, sums.shape[1])]).T.tolist()
        self.metric_sum.zero_()
        self.skipped_updates.zero_()
        return [{**dict(zip(self.metric_names, run)), "skipped_updates": int(run[-1])} for run in rows]


# ======================================================================================
# Evaluation, logging, checkpoints
# ======================================================================================
@torch.no_grad()
def evaluate(envs: Union[gym.vector.VectorEnv, List[gym.Env]], actor: TanhGaussianActor, seed: int,
             state_mean: np.ndarray, state_std: np.ndarray, device: Optional[torch.device] = None,
             sparse_reward: bool = False) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Deterministic episodes run side by side in envs, episode i seeded seed + i.

    Returns the episode returns, whether each episode reached the goal at some step (see
    step_success), and whether the env told success at all. The actor runs on `device` as it is,
    or, by default, as a CPU copy: for a handful of states a step on the CPU beats a round trip to
    the GPU. A list of envs is stepped as one vector env. An env whose episode ended keeps being
    stepped (and reset by the vector env) until all have ended; its extra steps are not counted.
    """
    if not isinstance(envs, gym.vector.VectorEnv):
        envs = gym.vector.SyncVectorEnv([lambda env=env: env for env in envs])
    policy = copy.deepcopy(actor).cpu() if device is None else actor
    threads = torch.get_num_threads()
    if device is None:
        torch.set_num_threads(1)  # a few rows: worker threads would only spin and steal the envs' cores
    try:
        obs, _ = envs.reset(seed=[seed + i for i in range(envs.num_envs)])
        returns = np.zeros(envs.num_envs)
        successes = np.zeros(envs.num_envs, dtype=bool)
        reported = False
        running = np.ones(envs.num_envs, dtype=bool)
        while running.any():
            state = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
            obs, reward, terminated, truncated, info = envs.step(policy.act(state).cpu().numpy())
            for i in np.flatnonzero(running):
                env_info = {key: info[key][i] for key in SUCCESS_KEYS if key in info and info[f"_{key}"][i]}
                success = step_success(float(reward[i]), env_info, sparse_reward)
                if success is not None:
                    reported = True
                    successes[i] |= success
            returns += np.where(running, reward, 0.0)
            running &= ~(terminated | truncated)
    finally:
        torch.set_num_threads(threads)
    return returns, successes, reported


def _evaluation_worker(env_spec: Any, n_episodes: int, actor_shape: Tuple[int, int, float], sparse_reward: bool,
                       jobs: Any, results: Any) -> None:
    """Background evaluator process: evaluates each (step, weights) job, answers (step, returns,
    successes, reported) as evaluate() returns them."""
    warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")
    try:
        envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_spec)] * n_episodes)
        actor = TanhGaussianActor(*actor_shape)
        while (job := jobs.get()) is not None:
            step, weights, seed, state_mean, state_std = job
            actor.load_state_dict(weights)
            results.send((step, *evaluate(envs, actor, seed, state_mean, state_std, sparse_reward=sparse_reward)))
        envs.close()
    except Exception as e:  # reported to the trainer, which stops with it
        results.send((None, f"{type(e).__name__}: {' '.join(str(e).split())}"))  # one line


def actor_weights(actor: Union[TanhGaussianActor, ActorStack], run: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """A CPU copy of the actor's weights (of run `run` of a stack): what an evaluation needs, frozen
    at the time of the call."""
    if run is not None:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in actor.member(run).items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in actor.state_dict().items()}


class Evaluator:
    """Evaluates actor snapshots: here and now, or in a worker process while training goes on.

    In the background the loop only copies the actor's weights (~0.3 MB); results are logged at their own
    step, and the weights of evaluations still running (`pending`) go into checkpoints. A worker that dies is
    replaced with a one-line warning and its pending evaluations run again; if the new one dies too first,
    the run stops (EvaluationWorkerError) naming the last good checkpoint. Nothing waits on a dead worker:
    it holds the only writing end of its answer pipe, so its death reads as the pipe's end.
    """

    def __init__(self, env: gym.Env, make_env: Callable[[], gym.Env], n_episodes: int, seed: int,
                 state_mean: np.ndarray, state_std: np.ndarray, actor: TanhGaussianActor, background: bool,
                 sparse_reward: bool, label: str = "", last_good_checkpoint: Callable[[], str] = lambda: ""):
        self.seed, self.state_mean, self.state_std, self.sparse_reward = seed, state_mean, state_std, sparse_reward
        self.label, self.last_good_checkpoint = label, last_good_checkpoint  # for messages: the run's name
        self.pending: Dict[int, Dict[str, torch.Tensor]] = {}
        self.resubmitted: Set[int] = set()  # steps whose evaluation a replaced worker's successor runs again
        self.finished: List[Tuple[int, np.ndarray, np.ndarray, bool]] = []
        self.worker = None
        shape = (actor.net[0].in_features, actor.action_dim, actor.max_action)
        if background:
            if env.spec is None:
                raise ConfigError("field 'background_eval': the eval env has no Gymnasium spec to rebuild it from "
                                  "in a worker process; set background_eval false")
            self.worker_args = (env.spec, n_episodes, shape, sparse_reward)
            self.start_worker()
        else:
            self.envs = gym.vector.SyncVectorEnv([make_env] * n_episodes)
            self.actor = copy.deepcopy(actor).cpu()  # a copy, not a new actor: no draw from the random stream

    def submit(self, step: int, weights: Dict[str, torch.Tensor]) -> None:
        """Evaluates the actor weights (see actor_weights) of update `step`."""
        if self.worker is None:
            self.actor.load_state_dict(weights)
            self.finished.append((step, *evaluate(self.envs, self.actor, self.seed, self.state_mean, self.state_std,
                                                  sparse_reward=self.sparse_reward)))
            return
        self.jobs.put((step, weights, self.seed, self.state_mean, self.state_std))
        self.pending[step] = weights

    def start_worker(self) -> None:
        """A worker process with a job queue and an answer pipe of its own: a dead worker's are never reused,
        as it may have died holding the queue's lock or half-way through a message."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process holding a CUDA context
        self.jobs = context.Queue()
        self.jobs.cancel_join_thread()  # at exit, never wait to feed jobs to a worker that is gone
        self.results, answers = context.Pipe(duplex=False)
        self.worker = context.Process(target=_evaluation_worker, daemon=True,
                                      args=(*self.worker_args, self.jobs, answers))
        self.worker.start()
        answers.close()  # the worker holds the only writing end: its death reads as the pipe's end

    def replace_dead_worker(self) -> None:
        """Called once every answer of a dead worker is read: one line, and a new worker that runs the pending
        evaluations again; an EvaluationWorkerError if some of them were already run again once."""
        import signal

        self.worker.join()
        code = self.worker.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        worker = f"the evaluation worker{f' of {self.label}' if self.label else ''} (pid {self.worker.pid})"
        again = sorted(self.resubmitted & set(self.pending))
        if again:
            raise EvaluationWorkerError(f"{worker}, restarted to run the evaluation of update {again[0]} again, died "
                                        f"too ({how}); stopping" + self.last_good_checkpoint())
        steps = sorted(self.pending)
        tqdm.write(f"warning: {worker} died ({how}); restarted it" + (  # tqdm's: a line of its own, not after the bar
            f", evaluating update(s) {', '.join(map(str, steps))} again" if steps else ""), file=sys.stderr)
        self.results.close()  # the dead worker's pipe, queue and process handles: no file descriptors left open
        self.jobs.close()
        self.worker.close()
        self.start_worker()
        for step in steps:
            self.jobs.put((step, self.pending[step], self.seed, self.state_mean, self.state_std))
        self.resubmitted.update(steps)

    def receive(self, wait: bool) -> Optional[Tuple[Any, ...]]:
        """The worker's next answer; None if there is none yet (with wait: after a second); a dead worker is
        replaced (replace_dead_worker) once its answers are read, and gives None."""
        try:
            if not self.results.poll(1.0 if wait else 0.0):
                if self.worker.is_alive():
                    return None
                if not self.results.poll(1.0):  # dead: its pipe reads as ended at once, or it is taken as such
                    raise EOFError
            answer = self.results.recv()
        except (EOFError, OSError):  # its pipe's end (or a message cut off by its death): all it sent was read
            self.replace_dead_worker()
            return None
        if answer[0] is None:
            raise EvaluationWorkerError(f"evaluation failed in the worker: {answer[1]}" + self.last_good_checkpoint())
        return answer

    def collect(self, wait: bool = False) -> List[Tuple[int, np.ndarray, np.ndarray, bool]]:
        """(step, returns, successes, reported) of the evaluations finished since the last call,
        oldest first; with wait, of all submitted ones."""
        while self.pending:
            answer = self.receive(wait)
            if answer is None and not wait:
                break
            if answer is not None:
                self.finished.append(answer)
                del self.pending[answer[0]]
        finished, self.finished = self.finished, []
        return finished

    def close(self) -> None:
        if self.worker is not None:
            self.jobs.put(None)
            self.worker.join(timeout=30)
            if self.worker.is_alive():  # stuck past its last job: not worth a hang
                self.worker.kill()
                self.worker.join()
            self.results.close()
        else:
            self.envs.close()


def normalized_score(returns: Union[np.ndarray, float], ref_min: Optional[float],
                     ref_max: Optional[float]) -> Optional[float]:
    """D4RL's score: 0 at the reference min return, 100 at the reference max return."""
    if ref_min is None or ref_max is None:
        return None
    return float(100.0 * (np.mean(returns) - ref_min) / (ref_max - ref_min))


def run_dir_field(config: Any) -> str:
    """The config field a run's directory comes from, for messages about it."""
    return "resume" if config.resume else "checkpoints_path" if config.checkpoints_path else "log_dir"


def make_run_dir(path: Path, config: Any) -> None:
    """Creates a run directory, or a ConfigError naming the field it lies under."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"field '{run_dir_field(config)}': cannot create the run directory {path} "
                          f"({e.strerror})") from None


class WriteError(RunFault):
    """A file of the run could not be written (disk full, over quota, I/O error, read-only disk): the run
    stops (exit code 3); the message is one line naming the file and the last good checkpoint."""

    def __init__(self, message: str, path: Path, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


def last_checkpoint_note(run_dir: Path, none: str = "; no checkpoint written") -> str:
    """The end of a message that stops a run: its newest checkpoint file, or `none` if it has none yet."""
    files = checkpoint_files(run_dir)
    return f"; last good checkpoint: {files[-1]}" if files else none


def write_error(path: Path, error: OSError) -> WriteError:
    """The WriteError of a failed write of `path`, a file of a run directory."""
    what = "disk full writing" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
    reason = error.strerror or str(error)
    return WriteError(f"{what} {path} ({reason}){last_checkpoint_note(path.parent)}", path, reason)


def write_run_records(run_dir: Path, config: Any, seed: int, stack: Optional[List[str]] = None) -> None:
    """A run's config.yaml (its own config, run_config) and, for a run of a stack (stack: its run directory
    names), stack.yaml (StackRecord) first: a run directory with the new config.yaml always has its record.
    A directory that takes no file (a read-only file system, a full disk) is a ConfigError naming the field it
    comes from: nothing has run yet."""
    own = asdict(run_config(config, seed))
    try:
        if stack is not None:
            record = asdict(StackRecord(seeds=config.seeds, seed=config.seed, runs=stack))
            write_atomic(run_dir / STACK_RECORD, lambda f: yaml.safe_dump(record, f, sort_keys=False), mode="w")
        write_atomic(run_dir / "config.yaml", lambda f: yaml.safe_dump(own, f, sort_keys=False), mode="w")
    except WriteError as e:
        raise ConfigError(f"field '{run_dir_field(config)}': cannot write {e.path} ({e.reason})") from None


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes through a temporary file in the same folder and renames: a reader sees old or new. A write that
    fails (any OSError: a full disk as much as a failing one) removes the temporary file: a WriteError."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = e if isinstance(e, Exception) else None  # a kill-like BaseException goes on as it is
        while cause is not None and not isinstance(cause, OSError):  # torch.save: a RuntimeError over the OSError
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise write_error(path, cause) from None


_RUN_DIR_LOCKS: Dict[Path, int] = {}  # run directory -> its open .lock file, held until train() ends


def lock_run_dir(run_dir: Path, config: Any) -> None:
    """Takes the run directory's advisory lock (flock of <run_dir>/.lock, which records the holder's pid) until
    train() ends: a second process that would train in the directory stops with a ConfigError. The kernel drops
    the lock of a process that dies, so a killed run's lock never blocks its --resume."""
    if run_dir in _RUN_DIR_LOCKS:
        return
    field = run_dir_field(config)
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"field '{field}': cannot open the lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise ConfigError(f"field '{field}': run directory {run_dir} is in use by another process"
                          f"{f' (pid {holder})' if holder else ''}, which holds {path}; two processes must not "
                          f"train in one run directory") from None
    except OSError as e:  # a file system without flock: train unguarded rather than not at all
        os.close(fd)
        print(f"warning: cannot lock {path} ({e.strerror}): nothing stops a second process in {run_dir}",
              file=sys.stderr)
        return
    with contextlib.suppress(OSError):  # the pid only makes the message above more helpful
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _RUN_DIR_LOCKS[run_dir] = fd


def releasing_run_dir_locks(train: Callable[..., Any]) -> Callable[..., Any]:
    """train() that releases the run directory locks it took (lock_run_dir) when it returns or raises, so that
    a later train() of the same process (a test, a tool) can take them again."""

    @functools.wraps(train)
    def locked_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        finally:
            while _RUN_DIR_LOCKS:
                os.close(_RUN_DIR_LOCKS.popitem()[1])

    return locked_train


class WandbGuard:
    """The wandb calls of a process's runs: the first one that fails (no server, wandb raising) prints one
    warning line and ends wandb for every run of the process; metrics.jsonl goes on with every row."""

    def __init__(self) -> None:
        self.failed = False

    def call(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args), or None once a wandb call has failed."""
        if self.failed:
            return None
        try:
            return function(*args)
        except Exception as e:  # wandb's errors are many and change; none may stop training
            self.failed = True
            reason = (str(e).splitlines() or [""])[0]
            tqdm.write(f"warning: wandb {what} failed ({type(e).__name__}: {reason}); training goes on without "
                       f"wandb, every row still goes to metrics.jsonl", file=sys.stderr)  # on a line of its own
            return None


class RunLogger:
    """Every logged row goes to <run_dir>/metrics.jsonl and, unless disabled, to wandb."""

    def __init__(self, config: TrainConfig, run_dir: Path, run_name: str, resume: bool = False,
                 seed: Optional[int] = None, guard: Optional[WandbGuard] = None):
        self.path = run_dir / "metrics.jsonl"
        self.rows = sum(1 for _ in open(self.path)) if self.path.exists() else 0  # a checkpoint records the count
        self.file = open(self.path, "a")
        # wandb's own WANDB_MODE counts when the config leaves the mode open (e.g. WANDB_MODE=disabled)
        env_mode = os.environ.get("WANDB_MODE")
        mode = config.wandb_mode or (env_mode if env_mode in ("online", "offline", "disabled") else None) or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = None
        self.guard = guard or WandbGuard()  # one for the runs of a stack: one warning, one timeout at most
        if mode != "disabled":
            import wandb  # imported only when used

            stacked = seed is not None  # one of several runs of this process: each its own wandb run

            def start() -> Any:
                run = wandb.init(project=config.project, group=config.group, name=run_name, mode=mode,
                                 config={**asdict(config), **({"seed": seed} if stacked else {})},
                                 dir=str(run_dir), id=run_name.rsplit("-", 1)[-1],
                                 resume="allow" if resume else None,  # a resumed run goes on in the same run
                                 **({"reinit": "create_new"} if stacked else {}))
                # x-axis "update" instead of wandb's own step: evaluations may arrive after later rows
                run.define_metric("update")
                run.define_metric("*", step_metric="update")
                return run

            self.wandb = self.guard.call("init", start)

    def log(self, row: Dict[str, float], step: int) -> None:
        try:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
            self.file.flush()
        except OSError as e:  # disk full or failing: the run stops, and leaves no torn last row behind
            with contextlib.suppress(OSError):
                self.file.close()
                written = self.path.read_bytes()
                os.truncate(self.path, written.rfind(b"\n") + 1)
            raise write_error(self.path, e) from None
        self.rows += 1
        if self.wandb is not None:
            self.guard.call("log", self.wandb.log, {"update": step, **row})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.guard.call("finish", self.wandb.finish)


def save_checkpoint(run_dir: Path, step: int, trainer: CQL, buffer: ReplayBuffer, state_mean: np.ndarray,
                    state_std: np.ndarray, run_state: "RunState", keep: int = 0,
                    run: Optional[int] = None, prune: bool = True) -> Path:
    """checkpoint_<step>.pt (networks, optimizer, alphas, counters, run_state: what --resume needs) and
    replay_<step>.pt (the online rows: large, so only the newest is kept; older checkpoints load for their
    networks only). Both are written atomically, the replay file first, and old files go (prune_checkpoints)
    only after both are in place: a kill at any moment leaves the newest checkpoint with its replay file.
    With run (a stack), run `run` in the one-run layout; with prune False a stack prunes once every run has
    this step's files.
    """
    replay = run_dir / f"replay_{step}.pt"
    write_atomic(replay, lambda f: torch.save(buffer.online_state(run), f))
    path = run_dir / f"checkpoint_{step}.pt"
    state = {**(trainer.state_dict() if run is None else trainer.run_state_dict(run)),
             "state_mean": state_mean, "state_std": state_std,
             "config": asdict(trainer.config if run is None else run_config(trainer.config, trainer.seeds[run])),
             "progress": dict(run_state.progress, online_transitions=buffer.n_added),
             "replay_file": replay.name, "run": run_state.to_dict()}
    write_atomic(path, lambda f: torch.save(state, f))
    if prune:
        prune_checkpoints(run_dir, replay, keep)
    return path


def prune_checkpoints(run_dir: Path, replay: Path, keep: int) -> None:
    """Removes the replay files but `replay` and, with keep > 0, all but the newest keep checkpoints."""
    for old in run_dir.glob("replay_*.pt"):
        if old != replay:
            old.unlink()
    for old in checkpoint_files(run_dir)[:-keep] if keep else []:
        old.unlink()


def checkpoint_files(run_dir: Path) -> List[Path]:
    """The run's checkpoint files, oldest first."""
    return sorted(run_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def load_checkpoint(path: str, trainer: CQL, buffer: Optional[ReplayBuffer] = None,
                    field: str = "load_model") -> Dict[str, Any]:
    """Restores trainer (and buffer's online rows) from a one-run checkpoint, refusing one made for other
    shapes; a stack trainer (seeds) starts every one of its runs from it."""
    return load_checkpoints([path], trainer, buffer, field)[0]


def load_checkpoints(paths: List[str], trainer: CQL, buffer: Optional[ReplayBuffer] = None,
                     field: str = "load_model") -> List[Dict[str, Any]]:
    """load_checkpoint for a stack of runs: paths[i] (a one-run checkpoint) into run i; one path into every run."""
    runs = [None] if trainer.seeds is None else list(range(len(trainer.seeds)))
    paths = paths * len(runs) if len(paths) == 1 else paths
    loaded: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"field '{field}': checkpoint file {path} not found")
        try:
            loaded[path] = loaded.get(path) or torch.load(path, map_location=trainer.device, weights_only=False)
            if "progress" not in loaded[path]:  # a checkpoint of the offline script, say
                raise KeyError("no 'progress' entry")
        except (RuntimeError, KeyError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
            raise ConfigError(f"field '{field}': {path} does not fit this config ({str(e).splitlines()[0]})") from None
    states = [loaded[path] for path in paths]
    try:
        if trainer.seeds is None:
            trainer.load_state_dict(states[0])
        else:
            trainer.load_run_state_dicts(states)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"field '{field}': {paths[0]} does not fit this config ({str(e).splitlines()[0]})") from None
    if buffer is not None:
        for run, path, state in zip(runs, paths, states):
            load_replay(path, state, buffer, field, run)
    return states


def pending_evaluations(state: Dict[str, Any]) -> Dict[int, Dict[str, torch.Tensor]]:
    """The actor weights of a checkpoint's unfinished evaluations, by step: in its run state, or, in
    checkpoints written before 2026-12, at the top level."""
    run_state = state.get("run") or {}
    return run_state.get("pending_evaluations", state.get("pending_evaluations", {}))


def new_progress() -> Dict[str, Any]:
    """A run's counters at its start: the checkpoint's 'progress' entry (with online_transitions added)."""
    return {"iteration": 0, "train_episodes": 0, "train_successes": 0, "eval_success_rates": [], "scores": []}


@dataclass
class RunState:
    """What a run's checkpoint holds beside the networks, optimizer and replay buffer: its 'progress'
    entry and its 'run' entry (what --resume needs to go on as the stopped run would have). The
    defaults are a fresh run's; to_dict/from_dict keep the checkpoints' keys, so older ones load.
    The offline script's RunState has the same shape, less what only an online run has."""

    progress: Dict[str, Any] = field(default_factory=new_progress)
    rng: Optional[Dict[str, Any]] = None  # the global random streams (rng_states()); None: no run state
    metric_sum: Optional[torch.Tensor] = None  # the metric window's sums ...
    window: int = 0  # ... and its count of updates
    skipped_updates: Any = 0.0  # updates skipped in the window (on_nonfinite skip); older checkpoints: none
    metrics_rows: int = 0  # rows in metrics.jsonl at the checkpoint
    pending_evaluations: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)  # actor weights by step
    stack: Optional[List[str]] = None  # a stack's run directory names, to resume with; None: one run
    goal_task: bool = False
    last_score: Optional[float] = None
    eval_returns: List[float] = field(default_factory=list)
    episode: Tuple[Optional[np.ndarray], float, int, bool] = (None, 0.0, 0, False)  # obs, return, length, success
    env: Optional[Dict[str, Any]] = None  # env_state() of the training env mid-episode
    env_errors: Tuple[int, int] = (0, 0)  # failed training-env steps: all, and the latest in a row

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint's 'run' entry (progress is an entry of its own)."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}
        if self.stack is None:
            del state["stack"]
        if not any(self.env_errors):  # written once a step failed: other checkpoints keep their keys
            del state["env_errors"]
        return state

    @classmethod
    def from_dict(cls, run: Dict[str, Any], progress: Optional[Dict[str, Any]] = None) -> "RunState":
        names = {f.name for f in fields(cls)} - {"progress"}
        state = cls(**{k: v for k, v in run.items() if k in names})
        state.episode, state.env_errors = tuple(state.episode), tuple(state.env_errors)
        state.progress.update({k: copy.deepcopy(v) for k, v in (progress or {}).items() if k in state.progress})
        return state

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "RunState":
        """A checkpoint's run state; one without a 'run' entry (rng None) gives its progress and pending evaluations."""
        state = cls.from_dict(checkpoint.get("run") or {}, checkpoint.get("progress"))
        state.pending_evaluations = pending_evaluations(checkpoint)
        return state


def load_replay(path: str, state: Dict[str, Any], buffer: ReplayBuffer, field: str, run: Optional[int] = None
                ) -> None:
    """Puts the online rows of checkpoint `path` (its replay file) into the buffer (into run `run`'s ring)."""
    progress = state["progress"]
    if progress["online_transitions"] > 0:
        replay = Path(path).parent / state["replay_file"]
        if not replay.is_file():
            raise ConfigError(f"field '{field}': {path} needs its replay file {replay}, which is gone "
                              f"(a run keeps only its newest checkpoint's replay buffer)")
        try:
            online = torch.load(replay, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise ConfigError(f"field '{field}': replay file {replay} is unreadable ({str(e).splitlines()[0]})"
                              ) from None
        if online["n_added"] != progress["online_transitions"]:
            raise ConfigError(f"field '{field}': replay file {replay} holds {online['n_added']} online transitions, "
                              f"{path} counts {progress['online_transitions']}")
        buffer.load_online_state(online, str(replay), field, run)


def rng_states() -> Dict[str, Any]:
    """The global random streams: python, numpy, torch (and every CUDA device's)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restores rng_states(); torch wants them as CPU byte tensors, and a checkpoint loaded onto a GPU
    (map_location) holds them there."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


_SIMULATOR_SKIP = ("spec", "_np_random", "action_space", "observation_space")  # restored apart, or fixed


def env_state(env: gym.Env) -> Optional[Dict[str, Any]]:
    """Everything that decides the training env's next steps, mid-episode; None if it cannot be taken.

    Pickling a Gymnasium MuJoCo env does not keep its state (EzPickle rebuilds it from the constructor's
    arguments), so the parts are taken one by one: each wrapper's plain scalars (TimeLimit's elapsed steps,
    ...), the env's and the action space's generators, and MuJoCo's full integration state (mj_getState,
    mjSTATE_INTEGRATION: replays bit for bit) or, for other envs, a pickle of the env's own attributes.
    """
    base = env.unwrapped
    wrappers = []
    layer = env
    while isinstance(layer, gym.Wrapper):
        wrappers.append({k: v for k, v in vars(layer).items() if type(v) in (bool, int, float)})
        layer = layer.env
    space = env.action_space
    state: Dict[str, Any] = {"wrappers": wrappers, "np_random": copy.deepcopy(getattr(base, "_np_random", None)),
                             "action_space": copy.deepcopy(getattr(space, "_np_random", None))}
    mujoco = sys.modules.get("mujoco")
    if mujoco is not None and isinstance(getattr(base, "data", None), mujoco.MjData):
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(base.model, spec))
        mujoco.mj_getState(base.model, base.data, physics, spec)
        state["mujoco"] = physics
    else:
        try:
            state["attributes"] = pickle.dumps({k: v for k, v in vars(base).items() if k not in _SIMULATOR_SKIP})
        except Exception:  # any object may refuse to pickle, in any way
            return None
    return state


def set_env_state(env: gym.Env, state: Dict[str, Any]) -> None:
    """Puts an env made as the saved one was made into the state env_state took."""
    base = env.unwrapped
    layer = env
    for attributes in state["wrappers"]:
        if not isinstance(layer, gym.Wrapper):
            raise ConfigError("field 'resume': the training env's wrappers differ from the checkpoint's")
        for key, value in attributes.items():
            setattr(layer, key, value)
        layer = layer.env
    if "mujoco" in state:
        import mujoco

        mujoco.mj_setState(base.model, base.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
    else:
        vars(base).update(pickle.loads(state["attributes"]))
    base._np_random = state["np_random"]
    env.action_space._np_random = state["action_space"]


# MuJoCo at an unstable state ("Nan, Inf or huge value in QACC ...") prints a warning, resets the simulation
# and goes on: the step returns a finite observation of a fresh simulation. Only these counters tell it.
_MUJOCO_INSTABILITY = ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC")


@dataclass
class EnvStep:
    """One step of a training env (step_env). A failed step has `error` (its one-line reason), no
    next_obs, and ends its episode as truncated; an ended episode's reset observation is reset_obs."""

    next_obs: Optional[np.ndarray]
    reward: Any
    terminated: bool
    truncated: bool
    success: Optional[bool] = None  # step_success: None if the env tells none
    reset_obs: Optional[np.ndarray] = None
    error: Optional[str] = None


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def reset_env(env: gym.Env, seed: Optional[int] = None) -> np.ndarray:
    """The first observation of a new episode (seeded: the action space too); a non-finite one raises."""
    obs = env.reset(seed=seed)[0] if seed is not None else env.reset()[0]
    if seed is not None:
        env.action_space.seed(seed)
    if not np.isfinite(obs).all():
        raise ValueError(f"reset gave a non-finite observation ({obs})")
    return obs


def step_env(env: gym.Env, action: np.ndarray, sparse_reward: bool) -> EnvStep:
    """One step of a training env and, at an episode's end, its reset; the same in the trainer and in an
    env worker. A step that raises, gives a non-finite observation or reward, or makes MuJoCo find its
    simulation unstable is a failed step: the episode ends there, as truncated (not terminal). A failed
    reset raises: there is no observation to go on from."""
    mujoco = sys.modules.get("mujoco")
    data = getattr(env.unwrapped, "data", None)
    counters = []
    if mujoco is not None and isinstance(data, mujoco.MjData):
        counters = [(name, data.warning[getattr(mujoco.mjtWarning, name)]) for name in _MUJOCO_INSTABILITY]
        for _, counter in counters:  # counted per step; the counters are no part of the simulation's state
            counter.number = 0
    try:
        next_obs, reward, terminated, truncated, info = env.step(action)
        unstable = [name for name, counter in counters if counter.number]
        if unstable:
            error = f"MuJoCo found the simulation unstable ({unstable[0][7:]}: Nan, Inf or huge value)"
        elif not np.isfinite(next_obs).all():
            error = f"non-finite observation ({' '.join(str(next_obs).split())})"
        elif not np.isfinite(reward):
            error = f"non-finite reward ({reward})"
        else:
            error = None
            result = EnvStep(next_obs, reward, bool(terminated), bool(truncated),
                             step_success(float(reward), info, sparse_reward))
    except Exception as e:  # any env may raise anything in step
        error = one_line(e)
    if error is not None:
        result = EnvStep(None, 0.0, False, True, error=error)
    if result.terminated or result.truncated:
        try:
            result.reset_obs = reset_env(env)
        except Exception as e:
            raise RuntimeError(f"reset failed ({one_line(e)})") from None
    return result


def _env_worker(env_spec: Any, pipe: Any) -> None:
    """Env worker process: owns one run's training env, made from its spec, and answers each command
    from the trainer with (True, answer) or (False, reason); ends at "close" or when the trainer is gone."""
    try:
        env = gym.make(env_spec)
    except Exception as e:
        pipe.send((False, f"cannot be made in the env worker ({one_line(e)})"))
        return
    commands: Dict[str, Callable[[Any], Any]] = {
        "step": lambda argument: step_env(env, *argument), "reset": lambda seed: reset_env(env, seed),
        "sample": lambda _: env.action_space.sample(), "get_state": lambda _: env_state(env),
        "set_state": lambda state: set_env_state(env, state)}
    while True:
        try:
            command, argument = pipe.recv()
        except (EOFError, OSError):  # the trainer is gone
            break
        if command == "close":
            break
        try:
            pipe.send((True, commands[command](argument)))
        except (ConfigError, DatasetError) as e:  # bad input: the trainer raises it as it is
            pipe.send((False, e))
        except Exception as e:
            pipe.send((False, one_line(e)))
    env.close()


class EnvWorker:
    """A run's training env in a worker process (spawned; a daemon: it dies with the trainer), driven
    through a pipe: send() a command, later receive() its answer, so that several envs step at once.
    The worker makes its env from the training env's spec, as the background evaluator does."""

    def __init__(self, env_spec: Any):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process holding a CUDA context
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=_env_worker, args=(env_spec, child), daemon=True)
        self.process.start()
        child.close()

    def send(self, command: str, argument: Any = None) -> None:
        try:
            self.pipe.send((command, argument))
        except OSError:  # a dead worker: receive() tells it
            pass

    def receive(self) -> Any:
        """The answer to the oldest command sent; a RunFault if the worker failed it or is gone."""
        try:
            while not self.pipe.poll(1.0):
                if not self.process.is_alive():
                    raise EOFError
            ok, answer = self.pipe.recv()
        except (EOFError, OSError):
            self.process.join(timeout=1.0)
            raise RunFault(f"worker process exited (code {self.process.exitcode})") from None
        if not ok:
            raise answer if isinstance(answer, Exception) else RunFault(answer)
        return answer

    def call(self, command: str, argument: Any = None) -> Any:
        self.send(command, argument)
        return self.receive()

    def close(self) -> None:
        self.send("close")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def keep_lines(path: Path, n: int) -> None:
    """Keeps the first n lines of a text file (atomically); a torn last line goes too."""
    lines = path.read_text().splitlines(keepends=True)[:n] if path.exists() else []
    write_atomic(path, lambda f: f.writelines(lines), mode="w")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"field 'device': {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"field 'device': {name} requested but there are {torch.cuda.device_count()} CUDA devices")
    return device


# ======================================================================================
# Training
# ======================================================================================
def action_bound(env: gym.Env, what: str) -> float:
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise DatasetError(f"{what}: needs a 1-D Box action space, got {space}")
    if not np.allclose(space.high, space.high[0]) or not np.allclose(space.low, -space.high):
        raise DatasetError(f"{what}: actions must lie in a symmetric box [-m, m], got [{space.low}, {space.high}]")
    return float(space.high[0])


def phase_of(step: int, offline_iterations: int) -> Dict[str, int]:
    """offline_iter or online_iter of the step-th iteration, 0-based within its phase as CORL logs them
    (its loop index t = step - 1, and t - offline_iterations online)."""
    if step > offline_iterations:
        return {"online_iter": step - 1 - offline_iterations}
    return {"offline_iter": step - 1}


@dataclass
class Run:
    """One seed's run in train(): its training env (here, or in an env worker) and episode in progress,
    counters, directory, logger, evaluator and evaluation results. One run is a stack of one."""

    seed: int
    env: Optional[gym.Env]  # None: the env lives in `worker`
    goal_task: bool = False  # success is logged (a goal task, or the env reported a success)
    dir: Optional[Path] = None
    logger: Optional[RunLogger] = None
    evaluator: Optional[Evaluator] = None
    obs: Optional[np.ndarray] = None  # the training env's current raw observation; None: reset first
    episode_return: float = 0.0
    episode_length: int = 0
    episode_success: bool = False
    progress: Dict[str, Any] = field(default_factory=new_progress)
    last_score: Optional[float] = None
    eval_returns: List[float] = field(default_factory=list)
    last_step: Optional[Tuple[np.ndarray, np.ndarray, Any, np.ndarray, bool, bool]] = None  # see finish_step()
    worker: Optional[EnvWorker] = None  # the env worker holding the training env (env_workers)
    env_errors: int = 0  # failed steps of the training env (step_env) ...
    env_errors_in_a_row: int = 0  # ... and the latest of them in a row
    pending: Optional[EnvStep] = None  # a step taken here by send_step, for finish_step

    def new_episode(self, obs: Optional[np.ndarray]) -> None:
        self.obs, self.episode_return, self.episode_length, self.episode_success = obs, 0.0, 0, False

    def fault(self, what: str) -> RunFault:
        return RunFault(f"the training env of seed {self.seed} {what}" + self.last_good_checkpoint())

    def env_call(self, command: Optional[str], argument: Any = None) -> Any:
        """A command to the env worker (None: only the answer to the one sent), answered; its failure a
        RunFault naming the run's last good checkpoint."""
        try:
            return self.worker.receive() if command is None else self.worker.call(command, argument)
        except RunFault as e:
            raise self.fault(f"failed: {e}") from None

    def reset_env(self, seed: int) -> None:
        """A new episode, the env and its action space seeded with `seed`."""
        if self.worker is not None:
            self.new_episode(self.env_call("reset", seed))
            return
        try:
            obs = reset_env(self.env, seed)
        except Exception as e:  # any env may raise anything
            raise self.fault(f"failed: {one_line(e)}") from None
        self.new_episode(obs)

    def sample_action(self) -> np.ndarray:
        return self.env.action_space.sample() if self.worker is None else self.env_call("sample")

    def take_env_state(self) -> Optional[Dict[str, Any]]:
        return env_state(self.env) if self.worker is None else self.env_call("get_state")

    def put_env_state(self, state: Dict[str, Any]) -> None:
        set_env_state(self.env, state) if self.worker is None else self.env_call("set_state", state)

    def close_env(self) -> None:
        self.env.close() if self.worker is None else self.worker.close()

    def send_step(self, action: np.ndarray, sparse_reward: bool) -> None:
        """Starts a step of the training env (step_env): in the env worker, or here (done at once)."""
        if self.worker is not None:
            self.worker.send("step", (action, sparse_reward))
            return
        try:
            self.pending = step_env(self.env, action, sparse_reward)
        except RuntimeError as e:  # the reset after an episode's end
            raise self.fault(f"failed: {e}") from None

    def finish_step(self, action: np.ndarray, ref_min: Optional[float], ref_max: Optional[float], step: int,
                    errors_in_a_row: int) -> Tuple[EnvStep, Dict[str, float]]:
        """The step that send_step started, and the ended episode's row (empty while the episode goes on).
        last_step keeps the step as (obs, action, reward, next obs, terminated, truncated), unnormalized;
        None for a failed step, which is counted (the run stops at errors_in_a_row of them in a row)."""
        if self.worker is None:
            result, self.pending = self.pending, None
        else:
            result = self.env_call(None)
        if result.error is not None:
            self.env_errors += 1
            self.env_errors_in_a_row += 1
            if self.env_errors_in_a_row >= errors_in_a_row:
                raise self.fault(f"failed {self.env_errors_in_a_row} steps in a row (the last in iteration "
                                 f"{step}: {result.error}; env_errors_in_a_row {errors_in_a_row})")
            if self.env_errors == 1:
                tqdm.write(f"warning: the training env of seed {self.seed} failed in iteration {step} "
                           f"({result.error}): the episode ends there as truncated, the step is not stored; "
                           f"later failures are counted in train/env_errors", file=sys.stderr)
            self.last_step = None
        else:
            self.env_errors_in_a_row = 0
            self.last_step = (self.obs, action, result.reward, result.next_obs, result.terminated, result.truncated)
            if result.success is not None:
                self.goal_task = True
                self.episode_success = self.episode_success or result.success
            self.episode_return += float(result.reward)
            self.episode_length += 1
            self.obs = result.next_obs
        row: Dict[str, float] = {}
        if result.terminated or result.truncated:
            progress = self.progress
            progress["train_episodes"] += 1
            row["train/episode_return"], row["train/episode_length"] = self.episode_return, self.episode_length
            score = normalized_score(self.episode_return, ref_min, ref_max)
            if score is not None:
                row["train/d4rl_normalized_episode_return"] = score
            if self.goal_task:
                progress["train_successes"] += int(self.episode_success)
                row["train/is_success"] = float(self.episode_success)
                row["train/regret"] = 1.0 - progress["train_successes"] / progress["train_episodes"]
            if result.error is not None:
                row["train/env_errors"] = self.env_errors
            self.new_episode(result.reset_obs)
        return result, row

    def log_evaluations(self, finished: List[Tuple[int, np.ndarray, np.ndarray, bool]], ref_min: Optional[float],
                        ref_max: Optional[float], offline_iterations: int) -> None:
        for eval_step, returns, successes, reported in finished:  # in the background these may come after later rows
            self.goal_task = self.goal_task or reported
            self.last_score = normalized_score(returns, ref_min, ref_max)
            self.eval_returns.append(float(returns.mean()))
            row = {"eval_return_mean": float(returns.mean()), "eval_return_std": float(returns.std())}
            if self.last_score is not None:
                row["eval/d4rl_normalized_score"] = row["d4rl_normalized_score"] = self.last_score
                self.progress["scores"].append(self.last_score)
            if self.goal_task and eval_step > offline_iterations:  # as CORL: online evaluations only
                rates = self.progress["eval_success_rates"]
                rates.append(float(successes.mean()))
                row["eval/success_rate"] = float(successes.mean())
                row["eval/regret"] = float(np.mean([1.0 - r for r in rates]))
            self.logger.log({**row, **phase_of(eval_step, offline_iterations)}, eval_step)

    def last_good_checkpoint(self) -> str:
        return last_checkpoint_note(self.dir)

    def run_state(self, rng: Dict[str, Any], metric_sum: torch.Tensor, window: int, skipped_updates: torch.Tensor,
                  stack: Optional[List[str]]) -> RunState:
        """This run's state for its checkpoint, with the stack's random streams and metric window."""
        return RunState(progress=self.progress, rng=rng, metric_sum=metric_sum, window=window,
                        skipped_updates=skipped_updates, metrics_rows=self.logger.rows,
                        pending_evaluations=dict(self.evaluator.pending), stack=stack, goal_task=self.goal_task,
                        last_score=self.last_score, eval_returns=list(self.eval_returns),
                        episode=(None if self.obs is None else self.obs.copy(), self.episode_return,
                                 self.episode_length, self.episode_success),
                        env=None if self.obs is None else self.take_env_state(),
                        env_errors=(self.env_errors, self.env_errors_in_a_row))

    def restore(self, state: RunState, resume: bool) -> None:
        """Takes a checkpoint's progress and unfinished evaluations (which run again); with resume also its
        evaluation results and episode in progress, with the training env's state."""
        self.progress = state.progress
        for eval_step, weights in sorted(state.pending_evaluations.items()):  # CPU copies, as when submitted
            self.evaluator.submit(eval_step, {k: v.cpu() for k, v in weights.items()})
        if not resume:  # load_model: fresh episodes, the random streams not restored
            return
        self.goal_task, self.last_score, self.eval_returns = state.goal_task, state.last_score, state.eval_returns
        self.obs, self.episode_return, self.episode_length, self.episode_success = state.episode
        self.env_errors, self.env_errors_in_a_row = state.env_errors
        if state.env is not None:
            self.put_env_state(state.env)
        elif self.obs is not None:  # the env's state could not be saved: a fresh episode, as after load_model
            print(f"the training env of seed {self.seed} was not saved (it does not pickle): the episode of "
                  f"{self.episode_length} steps in progress at iteration {self.progress['iteration']} is dropped, "
                  f"a new one starts")
            self.new_episode(None)


def prepare_data(config: TrainConfig, data: Optional[OfflineData], reward_transform: Callable[[Any], np.ndarray],
                 state_dim: int) -> Tuple[int, np.ndarray, np.ndarray]:
    """Transforms the dataset's rewards and normalises its states in place (no dataset: pure online);
    returns its size and the state normalisation (mean, std), which the online states get too."""
    state_mean, state_std = np.zeros(state_dim), np.ones(state_dim)
    if data is None:
        return 0, state_mean, state_std
    if len(data.rewards) > config.buffer_size:
        raise ConfigError(f"field 'buffer_size' ({config.buffer_size}) is smaller than the dataset "
                          f"({len(data.rewards)} transitions)")
    data.rewards = reward_transform(data.rewards)
    if not np.isfinite(data.rewards).all():
        raise ConfigError(f"fields 'reward_scale' ({config.reward_scale:g}) and 'reward_bias' "
                          f"({config.reward_bias:g}): {data.source}'s rewards overflow float32 once scaled by them")
    if config.normalize:
        state_mean = data.observations.mean(0)
        state_std = data.observations.std(0) + 1e-3
    data.observations = ((data.observations - state_mean) / state_std).astype(np.float32)
    data.next_observations = ((data.next_observations - state_mean) / state_std).astype(np.float32)
    return len(data.rewards), state_mean, state_std


def make_runs(config: TrainConfig, seeds: List[int], env: gym.Env, make_train_env: Callable[[], gym.Env],
              goal_task: bool) -> List[Run]:
    """A run per seed, each with its training env: `env` and more made like it, or, with env_workers and
    several runs, each in an env worker (started now, to load while the trainer is built), `env` then closed.
    env_workers is off by default: a pipe round trip per step costs more than a MuJoCo locomotion step saves
    (benchmarks/env_step.py on an H200 host, 16 cores: 4 Hopper-v4 runs 0.68x, 4 Humanoid-v4 runs 1.21x)."""
    if config.env_workers and env.spec is None:
        raise ConfigError("field 'env_workers': the training env has no Gymnasium spec to rebuild it from in a "
                          "worker process; set env_workers false")
    if config.env_workers and len(seeds) > 1:
        runs = [Run(seed, None, goal_task=goal_task, worker=EnvWorker(env.spec)) for seed in seeds]
        env.close()
        return runs
    return [Run(seed, env if i == 0 else make_train_env(), goal_task=goal_task) for i, seed in enumerate(seeds)]


def open_runs(config: TrainConfig, runs: List[Run], trainer: CQL, buffer: ReplayBuffer
              ) -> Tuple[Optional[List[Dict[str, Any]]], bool]:
    """Gives each run its directory (with the config) and logger, and loads the checkpoints they start from:
    with resume each run's newest (a stack: of the newest iteration that every run has one of), with
    load_model the one that every run starts from. Returns those checkpoints, one per run (None: a fresh
    start), and whether they resume."""
    if config.resume:
        files = resume_checkpoints(Path(config.resume), len(runs))
        for run, path in zip(runs, files):
            run.dir = path.parent
            lock_run_dir(run.dir, config)  # before anything in it changes: a second process stops here
            for stale in run.dir.glob(".*.tmp"):  # temporary files of writes that a kill interrupted
                stale.unlink()
        states = load_checkpoints([str(f) for f in files], trainer, buffer, field="resume")
        for run, path, state in zip(runs, files, states):
            if (state.get("run") or {}).get("rng") is None:
                raise ConfigError(f"field 'resume': {path} holds no run state (made before --resume existed)")
            for later in checkpoint_files(run.dir):  # written by a kill before every run had its step's files
                if int(later.stem.split("_")[1]) > int(path.stem.split("_")[1]):
                    later.unlink()
            for orphan in run.dir.glob("replay_*.pt"):  # written by a kill between the replay and checkpoint writes
                if orphan.name != state["replay_file"]:
                    orphan.unlink()
            keep_lines(run.dir / "metrics.jsonl", state["run"]["metrics_rows"])  # rows after the checkpoint come again
    else:
        states = load_checkpoints([config.load_model], trainer, buffer) if config.load_model else None
        for run in runs:
            run_name = f"{config.name}-{dataset_label(config.env)}-{run.seed}-{uuid.uuid4().hex[:8]}"
            run.dir = Path(config.checkpoints_path or config.log_dir) / run_name
    wandb_guard = WandbGuard()
    for run in runs:
        make_run_dir(run.dir, config)  # each run's own config, and a stack's record: --resume any of them
        lock_run_dir(run.dir, config)  # a fresh run's (a resumed run took its lock above)
        write_run_records(run.dir, config, run.seed, None if trainer.seeds is None else [r.dir.name for r in runs])
        run.logger = RunLogger(config, run.dir, run.dir.name, resume=bool(config.resume),
                               seed=None if trainer.seeds is None else run.seed, guard=wandb_guard)
    return states, bool(config.resume)


def restore_runs(runs: List[Run], states: Optional[List[Dict[str, Any]]], resumed: bool, update: UpdateStep) -> int:
    """Puts the checkpoints' run states into the runs (and, resumed, their metric window into the update
    step, and the random streams last: from here on the runs draw what the stopped ones would have);
    returns the window's count of updates."""
    window = 0
    run_states = [RunState.from_checkpoint(state) for state in states or []]
    for i, (run, run_state) in enumerate(zip(runs, run_states)):
        run.restore(run_state, resumed)
        if resumed:  # the loop goes on as it would have
            update.run_metric_sum(i).copy_(run_state.metric_sum)
            update.skipped_updates.copy_(torch.as_tensor(run_state.skipped_updates))
            window = run_state.window
    if resumed:
        set_rng_states(run_states[0].rng)
    return window


def act(trainer: CQL, runs: List[Run], normalize_state: Callable[[np.ndarray], np.ndarray], warmup: bool,
        it: int) -> np.ndarray:
    """One action per run (rows): uniformly random in warmup, else all actors in one call, one host sync."""
    if warmup:
        return np.stack([run.sample_action() for run in runs])
    with torch.no_grad():
        states = torch.as_tensor(np.stack([normalize_state(run.obs) for run in runs]), device=trainer.device)
        if trainer.seeds is not None:
            states = states[:, None]  # each run's actor takes a batch of one
        noise = torch.randn(*states.shape[:-1], trainer.action_dim, device=trainer.device)
        actions = trainer.actor(states, noise)[0].reshape(len(runs), -1).cpu().numpy()
    if not np.isfinite(actions).all():  # broken weights: stop before the env or the buffer sees it
        bad = int(np.argwhere(~np.isfinite(actions))[0][0])
        raise FloatingPointError(f"non-finite action ({actions[bad]}) from the actor"
                                 + (f" of seed {runs[bad].seed}" if trainer.seeds is not None else "")
                                 + f" in iteration {it + 1}" + runs[bad].last_good_checkpoint())
    return actions


def step_envs(runs: List[Run], actions: np.ndarray, buffer: ReplayBuffer,
              normalize_state: Callable[[np.ndarray], np.ndarray], reward_transform: Callable[[Any], np.ndarray],
              sparse_reward: bool, ref_min: Optional[float], ref_max: Optional[float], step: int = 0,
              errors_in_a_row: int = 5) -> List[Dict[str, float]]:
    """Steps every run's env with its action (env workers side by side: every action is sent before any result
    is read) and adds the transitions to the buffer (a stack: one to each run's ring); returns each run's row
    of the ended episode (empty if none ended). A failed step (step_env) stores nothing of its own: a one-run
    ring adds no row; a stack's rings move together, so the failed run's row repeats its newest transition,
    unless the rings are still empty (the stack's first online step, with no dataset): then none adds one."""
    for run, action in zip(runs, actions):
        run.send_step(action, sparse_reward)
    transitions: List[Optional[Tuple[Any, ...]]] = []
    rows = []
    for run, action in zip(runs, actions):
        obs = run.obs
        result, row = run.finish_step(action, ref_min, ref_max, step, errors_in_a_row)
        rows.append(row)
        # A time-limit truncation is not a terminal: the target bootstraps through it.
        transitions.append(None if result.error is not None else (
            normalize_state(obs), action, reward_transform(result.reward), normalize_state(result.next_obs),
            float(result.terminated)))
    if any(t is None for t in transitions):
        if not buffer.runs or not buffer.size:
            return rows
        transitions = [buffer.newest(i) if t is None else t for i, t in enumerate(transitions)]
    buffer.add(*(np.stack(column) for column in zip(*transitions)))
    return rows


def window_means(update: UpdateStep, runs: List[Run], window: int, step: int) -> List[Dict[str, float]]:
    """Each run's metric means over the window of `window` updates that ends at iteration `step`; a window
    with no kept update or a non-finite mean stops training, naming the last good checkpoint."""
    stacked = update.trainer.seeds is not None
    run_means = update.take_run_means(window)
    span = f"{step - window + 1}..{step}"
    if run_means[0].get("skipped_updates") == window:  # on_nonfinite "skip", and nothing was kept
        raise FloatingPointError(f"every update in iterations {span} had a non-finite loss or gradient"
                                 + (" in some run of the stack" if stacked else "") + " (on_nonfinite=skip)"
                                 + runs[0].last_good_checkpoint())
    for run, means in zip(runs, run_means):
        for name, value in means.items():
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite {name} ({value})" + (f" of seed {run.seed}" if stacked else "")
                                         + f" in iterations {span}" + run.last_good_checkpoint())
    return run_means


def log_evaluations(runs: List[Run], wait: bool, ref_min: Optional[float], ref_max: Optional[float],
                    offline_iterations: int, bar: Any) -> None:
    """Logs the evaluations finished since the last call (with wait, all submitted ones) of every run."""
    finished = [run.evaluator.collect(wait=wait) for run in runs]
    for run, results in zip(runs, finished):
        run.log_evaluations(results, ref_min, ref_max, offline_iterations)
    latest = [run.last_score if run.last_score is not None else run.eval_returns[-1] if run.eval_returns else None
              for run in runs]
    if any(finished) and None not in latest:  # a stack shows the mean over its runs
        bar.set_postfix(score=f"{np.mean(latest):.1f}", refresh=False)  # shown at the next refresh, with a fresh count


def save_checkpoints(runs: List[Run], step: int, trainer: CQL, buffer: ReplayBuffer, update: UpdateStep,
                     window: int, state_mean: np.ndarray, state_std: np.ndarray, keep: int) -> None:
    """Every run's checkpoint of iteration `step` (a stack: one ordinary checkpoint per run); the old files
    go only once every run has this iteration's."""
    if not trainer.parameters_finite():  # never replace good weights with broken ones
        raise FloatingPointError(f"non-finite network weights after iteration {step}" + runs[0].last_good_checkpoint())
    stacked = trainer.seeds is not None
    rng = rng_states()
    for i, run in enumerate(runs):
        run.progress["iteration"] = step
        state = run.run_state(rng, update.run_metric_sum(i).clone(), window, update.skipped_updates.clone(),
                              [r.dir.name for r in runs] if stacked else None)  # the sibling runs to resume with
        save_checkpoint(run.dir, step, trainer, buffer, state_mean, state_std, state, run=i if stacked else None,
                        prune=False)
    for run in runs:
        prune_checkpoints(run.dir, run.dir / f"replay_{step}.pt", keep)


def summarize(runs: List[Run], trainer: CQL, buffer: ReplayBuffer, total: int, elapsed: float, load_seconds: float,
              eval_seconds: float) -> Dict[str, Any]:
    """train()'s summary, printed in one line with every run's normalized score."""
    stacked = trainer.seeds is not None
    summaries = [{"seed": run.seed, "run_dir": str(run.dir), "last_score": run.last_score,
                  "best_score": max(run.progress["scores"]) if run.progress["scores"] else None,
                  "eval_returns": run.eval_returns, "train_episodes": run.progress["train_episodes"],
                  "env_errors": run.env_errors} for run in runs]
    summary = {"iterations": total, "updates": trainer.total_it, "seconds": elapsed, "load_seconds": load_seconds,
               "eval_seconds": eval_seconds, "cql_alpha": float(trainer.cql_alpha),
               "online_transitions": buffer.n_added}
    if stacked:
        summary = {"runs": summaries, "run_dirs": [s["run_dir"] for s in summaries], **summary}
    else:
        summary = {"run_dir": summaries[0]["run_dir"], **summary,
                   **{k: v for k, v in summaries[0].items() if k not in ("seed", "run_dir")}}
    last = [run.last_score for run in runs]
    if None not in last and not stacked:
        score_text = f"normalized score last {last[0]:.1f}, best {summaries[0]['best_score']:.1f}"
    elif None not in last:
        score_text = (f"normalized score last {np.mean(last):.1f} +- {np.std(last):.1f} over {len(runs)} seeds "
                      f"({', '.join(f'{v:.1f}' for v in last)})")
    elif all(run.eval_returns for run in runs):
        score_text = "eval return last " + ", ".join(f"{run.eval_returns[-1]:.1f}" for run in runs)
    else:
        score_text = "no evaluation"
    metrics = runs[0].logger.path if not stacked else f"metrics.jsonl of each run dir in {runs[0].dir.parent}"
    each = f" each, {len(runs)} runs" if stacked else ""
    eval_share = 100 * eval_seconds / max(elapsed + load_seconds, 1e-9)
    env_errors = [s["env_errors"] for s in summaries]
    failed = (f"; the training env failed {' + '.join(map(str, env_errors))} steps (their episodes ended as "
              f"truncated, see train/env_errors)" if any(env_errors) else "")
    print(f"done: {total} iterations ({trainer.total_it} updates{each}) in {elapsed:.0f} s (evaluation held training "
          f"up {eval_seconds:.1f} s, {eval_share:.1f}% of the run; set-up {load_seconds:.0f} s), {score_text}{failed}; "
          f"metrics in {metrics}")
    return summary


@releasing_run_dir_locks
def train(config: TrainConfig, on_iteration: Optional[Callable[[int, List[Run], CQL], None]] = None
          ) -> Dict[str, Any]:
    """Pre-trains offline, then trains online; returns a summary (scores, returns, counts, timings, paths).

    on_iteration(step, runs, trainer), if given, is called before the first iteration (step: the
    iterations done) and after each, before its checkpoint: tools/make_dataset.py keeps every
    transition (Run.last_step) and snapshots of the actor with it."""
    begin = time.time()
    device = resolve_device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    set_seed(config.seed)
    pure_online = is_pure_online(config)
    if pure_online:
        data = None
        goal_in_state = resolve_goal_in_state(config, hdf5=False)
        make_train_env = _make_gym_env(config.env, {}, config.max_episode_steps, goal_in_state)
        make_eval_env = _make_gym_env(config.eval_env or config.env, {}, config.max_episode_steps, goal_in_state)
        ref_min, ref_max = config.ref_min_score, config.ref_max_score
        source = f"Gymnasium env {config.env} (no dataset)"
    else:
        data = load_dataset(config)
        make_train_env = make_eval_env = data.make_env
        ref_min, ref_max, source = data.ref_min_score, data.ref_max_score, data.source
    print(reference_scores_line(config, source, ref_min, ref_max, "" if data is None else data.ref_origin))
    env = make_train_env()
    probe_env = make_eval_env()
    if data is not None:
        check_dataset_matches_env(data, probe_env)
    max_action = action_bound(env, "training env")
    if action_bound(probe_env, "eval env") != max_action:
        raise DatasetError(f"eval env: action bound {action_bound(probe_env, 'eval env')} differs from the "
                           f"training env's {max_action}")
    outside_line = None if data is None else actions_outside_line(data, max_action)
    if outside_line:
        print(outside_line)
    state_dim = env.observation_space.shape[0]  # the training env gives flat rows (flat_observation_env)
    action_dim = env.action_space.shape[0]
    env_names = (config.env, config.eval_env, env.spec.id if env.spec else None)
    goal_task = is_goal_task(*env_names)
    sparse_reward = any(name and "antmaze" in name.lower() for name in env_names)

    reward_transform = make_reward_transform(config, data)
    n_data, state_mean, state_std = prepare_data(config, data, reward_transform, state_dim)
    # The ring never holds more than the dataset plus every online transition: no larger allocation.
    capacity = max(1, min(config.buffer_size, n_data + config.online_iterations))
    seeds = run_seeds(config)
    stacked = seeds is not None  # a stack of runs: its batches and noise come from the one stream of config.seed
    runs = make_runs(config, seeds or [config.seed], env, make_train_env, goal_task)
    buffer = ReplayBuffer(capacity, state_dim, action_dim, device, runs=(len(runs),) if stacked else ())
    if data is not None:
        buffer.load_dataset({key: getattr(data, key) for key in BUFFER_FIELDS})
    trainer = CQL(config, state_dim, action_dim, max_action, device,
                  capturable=config.cudagraphs and device.type == "cuda", seeds=seeds)
    states, resumed = open_runs(config, runs, trainer, buffer)
    if states is not None:
        state_mean, state_std = states[0]["state_mean"], states[0]["state_std"]
    where = (f"run dir {runs[0].dir}" if not stacked else f"{len(runs)} runs (seeds "
             f"{', '.join(str(r.seed) for r in runs)}), run dirs {', '.join(str(r.dir) for r in runs)}")
    print(f"CQL on {source}: {buffer.size} transitions in a ring of {capacity}{' each' if stacked else ''}, "
          f"state {state_dim}, action {action_dim}, device {device}, {where}"
          + (f", resumed at iteration {states[0]['progress']['iteration']}" if resumed else ""))

    use_compile = device.type == "cuda" if config.compile is None else config.compile
    update = UpdateStep(trainer, buffer, config.batch_size, use_compile, config.cudagraphs)
    background = device.type == "cuda" if config.background_eval is None else config.background_eval
    with torch.random.fork_rng(devices=[]):  # a stack's one-run actor for the evaluators, aside from the stream
        template = TanhGaussianActor(state_dim, action_dim, max_action) if stacked else trainer.actor
    for run in runs:  # episode j of every evaluation is seeded the run's seed + j (as CORL reseeds), or eval_seed + j
        eval_seed = run.seed if config.eval_seed is None else config.eval_seed
        run.evaluator = Evaluator(probe_env, make_eval_env, config.n_episodes, eval_seed,
                                  state_mean, state_std, template, background, sparse_reward, run.dir.name,
                                  run.last_good_checkpoint)
    probe_env.close()
    window = restore_runs(runs, states, resumed, update)
    total = config.offline_iterations + config.online_iterations
    start_it = runs[0].progress["iteration"]
    trainer.cql_alpha = config.cql_alpha if start_it < config.offline_iterations else config.cql_alpha_online
    checkpoint_freq = config.checkpoint_freq or config.eval_freq
    start = time.time()
    load_seconds, eval_seconds = start - begin, 0.0
    bar = tqdm(range(start_it, total), desc="CQL" + (f" x{len(runs)}" if stacked else ""), unit="it",
               dynamic_ncols=True, initial=start_it, total=total,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs stay short when not a terminal

    def normalize_state(obs: np.ndarray) -> np.ndarray:
        return ((obs - state_mean) / state_std).astype(np.float32)

    if on_iteration is not None:
        on_iteration(start_it, runs, trainer)
    for it in bar:  # `it` iterations are done before this one
        if it == config.offline_iterations:
            trainer.cql_alpha = config.cql_alpha_online
            bar.write(f"online tuning from iteration {it}: cql_alpha {config.cql_alpha_online}")
        rows: List[Dict[str, float]] = [{} for _ in runs]
        warmup = False  # pure online mode's first warmup_steps iterations: random actions, no update
        if it >= config.offline_iterations:
            online_it = it - config.offline_iterations
            for run in runs:
                if run.obs is None:  # the first online iteration, or the first after a resume
                    run.reset_env(run.seed + online_it)
            warmup = pure_online and online_it < config.warmup_steps
            actions = act(trainer, runs, normalize_state, warmup, it)
            rows = step_envs(runs, actions, buffer, normalize_state, reward_transform, sparse_reward, ref_min, ref_max,
                             it + 1, config.env_errors_in_a_row)
        if not warmup:
            update()
            window += 1
        step = it + 1
        if (step % config.log_freq == 0 or step == total) and window:
            for row, means in zip(rows, window_means(update, runs, window, step)):
                row.update(means)
                row["cql_alpha"] = float(trainer.cql_alpha)
            window = 0
        for run, row in zip(runs, rows):
            if row:
                run.logger.log({**row, **phase_of(step, config.offline_iterations)}, step)
        if step % config.eval_freq == 0 or step == total:
            eval_start = time.time()
            for i, run in enumerate(runs):
                run.evaluator.submit(step, actor_weights(trainer.actor, i if stacked else None))
            eval_seconds += time.time() - eval_start
        if step % config.eval_freq == 0 or step % config.log_freq == 0 or step == total:
            log_evaluations(runs, False, ref_min, ref_max, config.offline_iterations, bar)
        if on_iteration is not None:
            on_iteration(step, runs, trainer)
        if config.checkpoints_path and (step % checkpoint_freq == 0 or step == total):
            save_checkpoints(runs, step, trainer, buffer, update, window, state_mean, state_std,
                             config.keep_checkpoints)
    eval_start = time.time()
    log_evaluations(runs, True, ref_min, ref_max, config.offline_iterations, bar)
    eval_seconds += time.time() - eval_start
    for run in runs:
        run.evaluator.close()
        run.close_env()
    bar.close()
    for run in runs:
        run.logger.close()
    return summarize(runs, trainer, buffer, total, time.time() - start, load_seconds, eval_seconds)


def resume_checkpoints(run_dir: Path, n_runs: int) -> List[Path]:
    """The newest checkpoint of a stopped run, or for a stack of runs (run_dir: any of its run
    directories) of each of its runs: the newest iteration that every run has a checkpoint of."""
    files = checkpoint_files(run_dir)
    if not files:
        raise ConfigError(f"field 'resume': {run_dir} has no checkpoint to continue from")
    if n_runs == 1:
        return [files[-1]]
    run = torch.load(files[-1], map_location="cpu", weights_only=False).get("run") or {}
    names = run.get("stack", [])
    if len(names) != n_runs:
        raise ConfigError(f"field 'resume': {files[-1]} is a checkpoint of {len(names) or 1} run(s), "
                          f"the config's seeds name {n_runs}")
    dirs = [run_dir.parent / name for name in names]
    common = set.intersection(*({int(p.stem.split("_")[1]) for p in checkpoint_files(d)} for d in dirs))
    if not common:
        raise ConfigError(f"field 'resume': the runs {', '.join(map(str, dirs))} have no checkpoint of one iteration")
    return [d / f"checkpoint_{max(common)}.pt" for d in dirs]


def main(argv: Optional[List[str]] = None) -> None:
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
        train(config)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, RunFault) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
