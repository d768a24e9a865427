"""Conservative Q-Learning (CQL), offline-to-online: pre-train on a dataset, then keep training while acting.

Kumar et al., 2020 (https://arxiv.org/abs/2006.04779), with the options, defaults, initialisation and
evaluation of CORL's finetune CQL, on Gymnasium + MuJoCo, h5py and Minari instead of gym, d4rl and mujoco-py.

    python algorithms/finetune/cql.py --config_path configs/finetune/cql/antmaze/umaze_v2_minari.yaml
    python algorithms/finetune/cql.py --config_path configs/finetune/cql/antmaze/umaze_v2_minari.yaml --seeds=4
    python algorithms/finetune/cql.py --stack_configs=a.yaml,b.yaml --seeds=0,1  # 2 configs x 2 seeds, one process
    python algorithms/finetune/cql.py --env Pendulum-v1 --offline_iterations 0 --cql_alpha_online 0  # plain SAC
    python algorithms/finetune/cql.py --help  # every option, with its meaning and default

offline_iterations updates on the data, then online_iterations iterations of one step in the training
env with the stochastic policy (into the same replay ring) and one update; at the switch cql_alpha
becomes cql_alpha_online. This file holds everything that is CQL, top to bottom; what is not (strict config
parsing, datasets, run directories and checkpoints, the background evaluator, the speed mechanics, the
training env's steps and state, the online runs' bookkeeping) is in algorithms/common/. The networks and the
loss are those of algorithms/offline/cql.py, copied on purpose; tests/test_layout.py keeps the copies identical.
The manual is docs/finetune.md.
"""
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

if __package__ in (None, ""):  # run as a file (python algorithms/finetune/cql.py): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from algorithms.common.help import exit_with_help_if_asked  # noqa: E402
exit_with_help_if_asked(__name__, __file__)  # --help answers here, before the seconds of importing torch
import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from algorithms.common import config as strict  # noqa: E402
from algorithms.common import fast  # noqa: E402
from algorithms.common.config import (  # noqa: E402
    MAX_HIDDEN_LAYERS, MAX_SAMPLED_ACTIONS, MAX_SEED, MAX_STEPS, NON_NEGATIVE, POSITIVE, RUN_BOUNDS, RUN_LIMITS,
    ConfigError, DatasetError, run_config)
from algorithms.common.data import (  # noqa: E402
    OfflineData, action_bound, actions_outside_line, check_dataset_matches_env, is_gym_id, load_dataset,
    make_gym_env, reference_scores_line, resolve_goal_in_state, return_range)
from algorithms.common.envs import SUCCESS_KEYS, TrainingEnv, is_goal_task, step_success  # noqa: E402
from algorithms.common.evaluation import Evaluator, actor_weights  # noqa: E402
from algorithms.common.fast import EnsembleLinear  # noqa: E402
from algorithms.common import runs as runs_lib  # noqa: E402
from algorithms.common.online import (  # noqa: E402
    Run, RunState, act, load_replay, log_evaluations, open_runs, phase_of, restore_runs,
    save_checkpoints, step_envs, summarize, window_means)
from algorithms.common.process import (  # noqa: E402
    StopSignals, check_stack_resources, run_main, stopping_on_signals, zero_tensors)
from algorithms.common.runs import (  # noqa: E402
    releasing_run_dir_locks, resolve_device, set_seed, write_state_file)
from algorithms.common.stacks import data_key, prepare_members, stack_members  # noqa: E402


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
    stack_configs: Optional[str] = None  # config files trained in this process, "a.yaml,b.yaml" (each x seeds)
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
    env_errors_in_a_row: int = 5  # failed training-env steps in a row that stop the run; a rarer one ends its episode


# CQL's and the online phase's fields and their ranges, beside the run fields every script has (RUN_BOUNDS, ...).
BOUNDS: Dict[str, Tuple[float, Optional[float], bool]] = {
    **RUN_BOUNDS, "eval_seed": (0, MAX_SEED, True), "target_update_period": POSITIVE, "cql_n_actions": POSITIVE,
    "q_n_hidden_layers": POSITIVE, "policy_lr": POSITIVE, "qf_lr": POSITIVE, "cql_temp": POSITIVE,
    "offline_iterations": NON_NEGATIVE, "online_iterations": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE,
    "bc_steps": NON_NEGATIVE, "cql_alpha": NON_NEGATIVE, "cql_alpha_online": NON_NEGATIVE,
    "alpha_multiplier": NON_NEGATIVE, "discount": (0, 1, True), "soft_target_update_rate": (0, 1, False),
    "env_errors_in_a_row": POSITIVE,
}
LIMITS: Dict[str, float] = {
    **RUN_LIMITS, "target_update_period": MAX_STEPS, "cql_n_actions": MAX_SAMPLED_ACTIONS,
    "q_n_hidden_layers": MAX_HIDDEN_LAYERS, "offline_iterations": MAX_STEPS, "online_iterations": MAX_STEPS,
    "warmup_steps": MAX_STEPS, "bc_steps": MAX_STEPS,
    "policy_lr": 1, "qf_lr": 1,  # Adam moves each weight by about lr per update: past 1 it only wrecks them
}


def check_config(config: TrainConfig) -> None:
    """Rejects impossible values with a one-line ConfigError naming the field."""
    strict.check_run_config(config, BOUNDS, LIMITS)
    if config.cql_clip_diff_min > config.cql_clip_diff_max:
        raise ConfigError(f"fields 'cql_clip_diff_min' ({config.cql_clip_diff_min}) > "
                          f"'cql_clip_diff_max' ({config.cql_clip_diff_max})")
    if is_pure_online(config) and config.online_iterations == 0:
        raise ConfigError(f"field 'online_iterations': pure online mode on {config.env} (no dataset, "
                          f"offline_iterations 0) needs online_iterations > 0")


# Fields that run directories written before their removal hold in config.yaml: (their value, why they went).
REMOVED = {"env_workers": (False, "stepping a stack's envs in processes was slower; docs/speed.md")}


def parse_config(argv: List[str]) -> TrainConfig:
    """`--config_path file.yaml` and `--key=value` overrides, strictly (algorithms/common/config.py)."""
    return strict.parse_config(argv, TrainConfig, check_config, REMOVED)


# ======================================================================================
# Data
# ======================================================================================


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


# ======================================================================================
# Replay buffer
# ======================================================================================
BUFFER_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


class ReplayBuffer:
    """A ring of device tensors: the dataset in rows [0, n_data), then online transitions at `pointer`,
    which wraps at capacity (the oldest row, dataset rows first, goes). The filled count is also the device
    tensor `size_tensor`, written in place, so that an update captured once as a CUDA graph samples the whole,
    growing ring with no host sync. A checkpoint keeps online_state(): the online rows, pointer, size, counts.

    With runs = (n_runs,), one ring per run of a stack (storage (n_runs, capacity, ...)), each with its own
    dataset, n_data, pointer, size and capacity (lists n_datas, pointers, sizes, capacities; size_tensor
    (n_runs,)): members of a stack of configs have datasets of different sizes. Every run adds one transition
    per online iteration, so n_added is shared.
    """

    def __init__(self, capacity: Union[int, List[int]], state_dim: int, action_dim: int, device: torch.device,
                 runs: Tuple[int, ...] = ()):
        self.capacities = list(capacity) if isinstance(capacity, list) else [capacity] * (runs[0] if runs else 1)
        self.capacity = max(self.capacities)  # rows of each ring's storage; a ring wraps at its own capacity
        self.device = device
        self.runs = runs
        self.shapes = {"observations": (state_dim,), "actions": (action_dim,), "rewards": (),
                       "next_observations": (state_dim,), "terminals": ()}
        self.storage = zero_tensors({k: (*runs, self.capacity, *shape) for k, shape in self.shapes.items()}, device,
                                    f"field 'buffer_size': a replay ring of {self.capacity} transitions")
        self.size_tensor = torch.zeros(runs, dtype=torch.int64, device=device)
        self.sizes = [0] * len(self.capacities)  # rows holding a transition, ...
        self.n_datas = [0] * len(self.capacities)  # ... dataset rows loaded at the start ...
        self.pointers = [0] * len(self.capacities)  # ... and the row the next transition goes to, in each ring
        self.n_added = 0  # transitions added online so far (some may be overwritten)

    def _shared(self, values: List[int], name: str) -> int:
        if len(set(values)) > 1:
            raise ValueError(f"the runs' rings differ in {name} ({values})")
        return values[0]

    size = property(lambda self: self._shared(self.sizes, "size"), doc="Rows holding a transition (every ring's).")
    pointer = property(lambda self: self._shared(self.pointers, "pointer"))
    n_data = property(lambda self: self._shared(self.n_datas, "n_data"))

    @size.setter
    def size(self, value: int) -> None:
        self._set_sizes([value] * len(self.sizes))

    def _set_sizes(self, sizes: List[int]) -> None:
        self.sizes = sizes  # and in place on the device: a captured graph reads the new sizes
        if len(set(sizes)) == 1:
            self.size_tensor.fill_(sizes[0])
        else:
            self.size_tensor.copy_(torch.as_tensor(sizes))

    def load_dataset(self, arrays: Dict[str, np.ndarray], run: Optional[int] = None) -> None:
        """The dataset into every ring (into run `run`'s only)."""
        n = len(arrays["rewards"])
        which = range(len(self.sizes)) if run is None else [run]
        if any(self.sizes[r] for r in which):
            raise ValueError("the dataset goes into an empty buffer")
        if n > min(self.capacities[r] for r in which):
            raise ConfigError(f"field 'buffer_size' ({min(self.capacities[r] for r in which)}) is smaller than the "
                              f"dataset ({n} transitions)")
        ring = () if not self.runs else (slice(None),) if run is None else (run,)
        for key in BUFFER_FIELDS:
            self.storage[key][(*ring, slice(0, n))] = torch.as_tensor(arrays[key], dtype=torch.float32,
                                                                      device=self.device)
        for r in which:
            self.n_datas[r], self.pointers[r] = n, n % self.capacities[r]
        self._set_sizes([n if r in which else size for r, size in enumerate(self.sizes)])

    def add(self, obs: np.ndarray, action: np.ndarray, reward: Any, next_obs: np.ndarray, terminal: Any) -> None:
        """One transition, or for a stack one per run (each value with a leading n_runs dim)."""
        values = (obs, action, reward, next_obs, terminal)  # one copy to the device, then split there
        row = np.concatenate([np.reshape(v, (*self.runs, -1)) for v in values], axis=-1).astype(np.float32)
        parts = torch.as_tensor(row, device=self.device).split([math.prod(self.shapes[k]) for k in BUFFER_FIELDS], -1)
        if not self.runs:
            at: Tuple[Any, ...] = (self.pointers[0],)
        elif len(set(self.pointers)) == 1:  # the rings move together: one slice
            at = (slice(None), self.pointers[0])
        else:
            at = (torch.arange(self.runs[0], device=self.device), torch.as_tensor(self.pointers, device=self.device))
        for key, part in zip(BUFFER_FIELDS, parts):
            self.storage[key][at] = part.view((*self.runs, *self.shapes[key]))
        self.pointers = [(p + 1) % c for p, c in zip(self.pointers, self.capacities)]
        self._set_sizes([min(s + 1, c) for s, c in zip(self.sizes, self.capacities)])
        self.n_added += 1

    def sample(self, batch_size: int, runs: Tuple[int, ...] = (), streams: Optional[fast.RunStreams] = None
               ) -> Tuple[torch.Tensor, ...]:
        """A batch of rows; for a stack (runs = (n_runs,)) one batch from each run's own ring, drawn from each
        run's stream (or, without streams, the global one)."""
        # Uniform over [0, 2^62), modulo the filled size read on the device: the first (2^62 mod
        # size) rows are drawn more often by a relative 1 / floor(2^62 / size), under 1e-12 for a
        # ring of up to 4 million rows.
        index = (streams.randint(2**62, batch_size) if streams is not None
                 else torch.randint(0, 2**62, (*runs, batch_size), device=self.device))
        if not runs:
            index = index % self.size_tensor
            return tuple(self.storage[key][index] for key in BUFFER_FIELDS)
        index = index % self.size_tensor[:, None]  # each run's own filled size
        run = torch.arange(runs[0], device=self.device)[:, None]
        return tuple(self.storage[key][run, index] for key in BUFFER_FIELDS)

    def newest(self, run: int) -> Tuple[np.ndarray, ...]:
        """The newest row of run `run`'s ring, as add() takes it (normalized, transformed)."""
        i = (self.pointers[run] - 1) % self.capacities[run]
        return tuple(self.storage[key][run, i].cpu().numpy() for key in BUFFER_FIELDS)

    def online_rows(self, run: Optional[int] = None) -> np.ndarray:
        """Row indices holding online transitions (of run `run`'s ring), oldest first."""
        capacity, pointer = self.capacities[run or 0], self.pointers[run or 0]
        m = min(self.n_added, capacity)
        return (pointer - m + np.arange(m)) % capacity

    def _ring(self, key: str, run: Optional[int]) -> torch.Tensor:
        return self.storage[key] if run is None else self.storage[key][run]

    def online_state(self, run: Optional[int] = None) -> Dict[str, Any]:
        """The online rows (of run `run` of a stack: a one-run buffer's state)."""
        r = run or 0
        rows = self.online_rows(run)
        index = torch.as_tensor(rows, device=self.device)
        return {"capacity": self.capacities[r], "n_data": self.n_datas[r], "n_added": self.n_added,
                "pointer": self.pointers[r], "size": self.sizes[r], "rows": rows,
                **{k: self._ring(k, run)[index].cpu() for k in BUFFER_FIELDS}}

    def load_online_state(self, state: Dict[str, Any], where: str, field: str = "load_model",
                          run: Optional[int] = None) -> None:
        """Puts a checkpoint's online rows back; the ring must be the same, unless it never wrapped."""
        r = run or 0
        capacity = self.capacities[r]
        if state["n_data"] != self.n_datas[r]:
            raise ConfigError(f"field '{field}': {where} was made with a dataset of {state['n_data']} "
                              f"transitions, this one has {self.n_datas[r]}")
        end = state["n_data"] + state["n_added"]
        if state["capacity"] != capacity and not end <= min(state["capacity"], capacity):
            raise ConfigError(f"field '{field}': {where} holds a full replay ring of {state['capacity']} "
                              f"rows, this run's has {capacity} (keep buffer_size and online_iterations)")
        index = torch.as_tensor(state["rows"], device=self.device)
        for key in BUFFER_FIELDS:
            self._ring(key, run)[index] = state[key].to(self.device)
        self.n_added = state["n_added"]
        if state["capacity"] == capacity:  # else it never wrapped: rows [0, end) are filled
            self.pointers[r], size = state["pointer"], state["size"]
        else:
            self.pointers[r], size = end % capacity, end
        self._set_sizes([size if i == r else s for i, s in enumerate(self.sizes)])


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


# (a module constant: torch.compile cannot trace a class attribute read in backward, and breaks the graph)


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
            starts = [torch.get_rng_state()]  # where its batches and noise draw on from (RunStreams)
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
            starts = [r.streams.states()[0] for r in runs]
        self.streams = fast.RunStreams(device, seeds or [config.seed], starts, stacked=seeds is not None)
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
        self.step_optimizer = self.optimizer.step  # update_step(compile=True) compiles one run's
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
        """Every random draw of one update, so that a test can replay the same update by hand: (*runs, batch,
        ...), each run's from its own stream (RunStreams: a run of a stack draws what it draws alone)."""
        n, a, b, draw = self.config.cql_n_actions, self.action_dim, batch_size, self.streams
        next_shape = (b, n, a) if self.config.cql_max_target_backup else (b, a)
        return {
            "policy": draw.randn(b, a),
            "next": draw.randn(*next_shape),
            "cql_current": draw.randn(b, n, a),
            "cql_next": draw.randn(b, n, a),
            "cql_random": draw.rand(b, n, a) * 2.0 - 1.0,
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

    def update_step(self, buffer: "ReplayBuffer", batch_size: int, compile: bool = False,
                    cudagraphs: bool = False) -> fast.UpdateStep:
        """The training loop's update: a batch drawn on the device, one update, its metrics summed on the device.

        With every speed flag off this is train(buffer.sample(batch_size)), the plain eager update. compile:
        torch.compile's forms of the same math, the losses compiled, the critics' fused layers
        (fuse_critic_layers) and one run's Adam step compiled (a stack and on_nonfinite "skip" keep fused Adam:
        fast.compiled_adam_step says why). cudagraphs (cuda): the whole update replayed as a CUDA graph per phase.
        """
        if compile:
            self.losses = torch.compile(self.losses)  # shadows the method on this instance
            self.fuse_critic_layers()
            if self.seeds is None and not self.skip_nonfinite:
                self.step_optimizer = fast.compiled_adam_step(self.optimizer)

        def update(phase: Tuple[bool, ...]) -> Dict[str, torch.Tensor]:
            batch = buffer.sample(batch_size, self.run_shape, self.streams)
            return self.apply_update(batch, self.draw_noise(batch_size), *phase)

        def next_phase() -> Tuple[bool, ...]:
            self.total_it += 1
            return self.phase(self.total_it)

        return fast.UpdateStep(update, next_phase, METRIC_NAMES, self.run_shape, self.optimizer, self.device,
                               cudagraphs, self.found_inf if self.skip_nonfinite else None, self.streams.generators)

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
            "optimizer": self.optimizer.state_dict(), "total_it": self.total_it, "stream": self.streams.states()[0],
            "cql_alpha": float(self.cql_alpha),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
            self.log_alpha_prime.copy_(state["log_alpha_prime"])
        fast.load_optimizer_state(self.optimizer, state["optimizer"])
        self.total_it = int(state["total_it"])

    # ---- a stack of runs: each run's state in the one-run layout, so that its checkpoint is an ordinary one
    def _run_layout(self) -> fast.RunLayout:
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

    def run_state_dict(self, run: int) -> Dict[str, Any]:
        """Run `run` of a stack as a one-run trainer's state_dict (copies): what CQL.load_state_dict takes."""
        return {**fast.run_state_dict(self._run_layout(), self.optimizer, run), "total_it": self.total_it,
                "stream": self.streams.states()[run],
                "cql_alpha": float(self.cql_alpha)}

    def load_run_state_dicts(self, states: List[Dict[str, Any]]) -> None:
        """Loads one one-run state_dict per run of the stack (checkpoints of one-seed runs fit too)."""
        if len(states) != len(self.seeds):
            raise ValueError(f"{len(states)} run states for a stack of {len(self.seeds)} runs")
        fast.load_run_state_dicts(self._run_layout(), self.optimizer, states)
        totals = {int(s["total_it"]) for s in states}
        if len(totals) != 1:
            raise RuntimeError(f"run states of different updates {sorted(totals)}")
        self.total_it = totals.pop()


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


def save_checkpoint(run_dir: Path, step: int, trainer: CQL, buffer: ReplayBuffer, state_mean: np.ndarray,
                    state_std: np.ndarray, run_state: RunState, keep: int = 0, run: Optional[int] = None,
                    prune: bool = True, config: Optional[TrainConfig] = None) -> Path:
    """checkpoint_<step>.pt (networks, optimizer, alphas, counters, run_state: what --resume needs) and
    replay_<step>.pt (the online rows: large, so only the newest is kept; older checkpoints load for their
    networks only). Both are written atomically, the replay file first, and old files go (prune_checkpoints)
    only after both are in place: a kill at any moment leaves the newest checkpoint with its replay file.
    With run (a stack), run `run` in the one-run layout with its own config (default: the trainer's with the
    run's seed); with prune False a stack prunes once every run has this step's files.
    """
    replay = run_dir / f"replay_{step}.pt"
    write_state_file(replay, buffer.online_state(run))
    path = run_dir / f"checkpoint_{step}.pt"
    own = config or (trainer.config if run is None else run_config(trainer.config, trainer.seeds[run]))
    state = {**(trainer.state_dict() if run is None else trainer.run_state_dict(run)),
             "state_mean": state_mean, "state_std": state_std, "config": asdict(own),
             "progress": dict(run_state.progress, online_transitions=buffer.n_added),
             "replay_file": replay.name, "run": run_state.to_dict()}
    write_state_file(path, state)
    if prune:
        runs_lib.prune_checkpoints(run_dir, replay, keep)
    return path


def load_checkpoints(paths: List[str], trainer: CQL, buffer: Optional[ReplayBuffer] = None,
                     field: str = "load_model") -> List[Dict[str, Any]]:
    """The checkpoints' networks, optimizer and counters into trainer (runs.load_checkpoints: paths[i] into run i
    of a stack, one path into every run), and their online rows into buffer."""
    states = runs_lib.load_checkpoints(paths, trainer, field, needs="progress")
    if buffer is not None:
        for run, (path, state) in enumerate(zip(paths * len(states) if len(paths) == 1 else paths, states)):
            load_replay(path, state, buffer, field, None if trainer.seeds is None else run)
    return states


# ======================================================================================
# Training
# ======================================================================================
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


@dataclass
class Source:
    """A member's data side (load_source), made once for the members of the same data (stacks.data_key)."""

    data: Optional[OfflineData]  # normalised, rewards transformed; None: pure online
    text: str  # what it is, for messages
    make_train_env: Callable[[], gym.Env]
    make_eval_env: Callable[[], gym.Env]
    train_env: Optional[gym.Env]  # made to probe the shapes: the first of its runs takes it
    probe_env: gym.Env  # an eval env, the evaluators' model
    max_action: float
    ref_min: Optional[float]
    ref_max: Optional[float]
    goal_task: bool
    sparse_reward: bool  # antmaze: a positive raw reward is a success
    reward_transform: Callable[[Any], np.ndarray]
    n_data: int
    state_mean: np.ndarray
    state_std: np.ndarray


def load_source(config: TrainConfig) -> Source:
    """config's dataset (none: pure online) and its training and eval envs, checked against each other; the
    dataset's rewards transformed and states normalised (prepare_data)."""
    if is_pure_online(config):
        data = None
        goal_in_state = resolve_goal_in_state(config, hdf5=False)
        make_train_env = make_gym_env(config.env, {}, config.max_episode_steps, goal_in_state)
        make_eval_env = make_gym_env(config.eval_env or config.env, {}, config.max_episode_steps, goal_in_state)
        ref_min, ref_max = config.ref_min_score, config.ref_max_score
        text = f"Gymnasium env {config.env} (no dataset)"
    else:
        data = load_dataset(config)
        make_train_env = make_eval_env = data.make_env
        ref_min, ref_max, text = data.ref_min_score, data.ref_max_score, data.source
    print(reference_scores_line(config, text, ref_min, ref_max, "" if data is None else data.ref_origin))
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
    env_names = (config.env, config.eval_env, env.spec.id if env.spec else None)
    reward_transform = make_reward_transform(config, data)
    # the training env gives flat rows (flat_observation_env)
    n_data, state_mean, state_std = prepare_data(config, data, reward_transform, env.observation_space.shape[0])
    return Source(data, text, make_train_env, make_eval_env, env, probe_env, max_action, ref_min, ref_max,
                  is_goal_task(*env_names), any(name and "antmaze" in name.lower() for name in env_names),
                  reward_transform, n_data, state_mean, state_std)


def load_sources(members: List[TrainConfig]) -> Dict[Tuple[Any, ...], Source]:
    """Each distinct data side of the members once (a --seeds stack has one), by data_key; members that cannot
    share the networks (state or action size, action bound) or that mix pure online with datasets are a
    ConfigError naming stack_configs."""
    online = [m for m in members if is_pure_online(m)]
    if online and len(online) < len(members):
        other = next(m for m in members if not is_pure_online(m))
        raise ConfigError(f"field 'stack_configs': {online[0].env} is pure online (no dataset), {other.env} is not: "
                          f"a stack's members all train on datasets or all without (run them in separate processes)")
    return prepare_members(members, load_source, lambda s: (s.train_env.observation_space.shape[0],
                                                           s.train_env.action_space.shape[0], s.max_action),
                           lambda s: s.text)


@releasing_run_dir_locks
@stopping_on_signals  # SIGINT, SIGTERM: the iteration in flight ends, then a checkpoint, one line (130, 143)
def train(config: TrainConfig, on_iteration: Optional[Callable[[int, List[Run], CQL], None]] = None,
          signals: Optional[StopSignals] = None) -> Dict[str, Any]:
    """Pre-trains offline, then trains online; returns a summary (scores, returns, counts, timings, paths).

    on_iteration(step, runs, trainer), if given, is called before the first iteration (step: the
    iterations done) and after each, before its checkpoint: tools/make_dataset.py keeps every
    transition (run.train_env.last_step) and snapshots of the actor with it."""
    begin = time.time()
    device = resolve_device(config.device)
    fast.keep_freed_host_memory(device)  # CPU: no page faults for each update's tensors
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    set_seed(config.seed)
    members = stack_members(config, lambda path: parse_config(["--config_path", path]))
    stacked = members is not None  # a stack of runs (--seeds, --stack_configs): each its own config and data side
    members = members or [config]
    sources = load_sources(members)
    first = sources[data_key(members[0])]
    state_dim, action_dim, max_action = (first.train_env.observation_space.shape[0],
                                         first.train_env.action_space.shape[0], first.max_action)
    # A ring never holds more than its dataset plus every online transition: no larger allocation.
    capacities = [max(1, min(config.buffer_size, sources[data_key(m)].n_data + config.online_iterations))
                  for m in members]
    seeds = [m.seed for m in members] if stacked else None  # before any run directory or ring: too large stops
    check_stack_resources(config, seeds, device, partial(CQL, config, state_dim, action_dim, max_action,
                                   torch.device("cpu")), state_dim, action_dim, max(capacities))
    runs = []
    for member in members:
        source = sources[data_key(member)]
        env, source.train_env = source.train_env or source.make_train_env(), None
        runs.append(Run(member, TrainingEnv(env, member.seed), source.state_mean, source.state_std,
                        source.reward_transform, source.sparse_reward, source.ref_min, source.ref_max,
                        source.goal_task))
    buffer = ReplayBuffer(capacities if stacked else capacities[0], state_dim, action_dim, device,
                          runs=(len(runs),) if stacked else ())
    for i, member in enumerate(members):  # each run's dataset into its own ring (one source: into all at once)
        data = sources[data_key(member)].data
        if data is not None and (len(sources) > 1 or i == 0):
            buffer.load_dataset({key: getattr(data, key) for key in BUFFER_FIELDS}, i if len(sources) > 1 else None)
    trainer = CQL(config, state_dim, action_dim, max_action, device,
                  capturable=config.cudagraphs and device.type == "cuda", seeds=seeds)
    states, resumed = open_runs(config, runs, stacked, lambda paths, field: load_checkpoints(paths, trainer, buffer,
                                                                                            field))
    which = f"seeds {', '.join(str(r.seed) for r in runs)}" if len(sources) == 1 else f"{len(sources)} datasets"
    where = (f"run dir {runs[0].dir}" if not stacked else f"{len(runs)} runs ({which}), run dirs "
             f"{', '.join(str(r.dir) for r in runs)}")
    ring = (f"{buffer.sizes[0]} transitions in a ring of {buffer.capacity}{' each' if stacked else ''}"
            if len(sources) == 1 else f"{'/'.join(map(str, buffer.sizes))} transitions in rings of {buffer.capacity}")
    print(f"CQL on {first.text if len(sources) == 1 else f'{len(sources)} datasets'}: {ring}, state {state_dim}, "
          f"action {action_dim}, device {device}, {where}"
          + (f", resumed at iteration {states[0]['progress']['iteration']}" if resumed else ""))

    use_compile = fast.resolve_compile(config.compile, device)
    update = trainer.update_step(buffer, config.batch_size, use_compile, config.cudagraphs)
    background = device.type == "cuda" if config.background_eval is None else config.background_eval
    with torch.random.fork_rng(devices=[]):  # a stack's one-run actor for the evaluators, aside from the stream
        template = TanhGaussianActor(state_dim, action_dim, max_action) if stacked else trainer.actor
    for run in runs:  # episode j of every evaluation is seeded the run's seed + j (as CORL reseeds), or eval_seed + j
        eval_seed = run.seed if config.eval_seed is None else config.eval_seed
        source = sources[data_key(run.config)]
        run.evaluator = Evaluator(source.probe_env, source.make_eval_env, config.n_episodes,
                                  partial(evaluate, sparse_reward=run.sparse_reward),
                                  (eval_seed, run.state_mean, run.state_std), template, background, run.dir.name,
                                  run.last_good_checkpoint)
    for source in sources.values():
        source.probe_env.close()
    window = restore_runs(runs, states, resumed, update)
    if resumed:
        trainer.streams.resume(states)
    pure_online = is_pure_online(members[0])
    total = config.offline_iterations + config.online_iterations
    start_it = runs[0].progress["iteration"]
    trainer.cql_alpha = config.cql_alpha if start_it < config.offline_iterations else config.cql_alpha_online
    checkpoint_freq = config.checkpoint_freq or config.eval_freq
    start = time.time()
    load_seconds, eval_seconds = start - begin, 0.0
    bar = tqdm(range(start_it, total), desc="CQL" + (f" x{len(runs)}" if stacked else ""), unit="it",
               dynamic_ncols=True, initial=start_it, total=total,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs stay short when not a terminal

    if on_iteration is not None:
        on_iteration(start_it, runs, trainer)
    for it in signals.steps(bar, [run.dir for run in runs], "iteration"):  # `it`: iterations done before this one
        if it == config.offline_iterations:
            trainer.cql_alpha = config.cql_alpha_online
            bar.write(f"online tuning from iteration {it}: cql_alpha {config.cql_alpha_online}")
        rows: List[Dict[str, float]] = [{} for _ in runs]
        warmup = False  # pure online mode's first warmup_steps iterations: random actions, no update
        if it >= config.offline_iterations:
            online_it = it - config.offline_iterations
            for run in runs:
                if run.train_env.obs is None:  # the first online iteration, or the first after a resume
                    run.train_env.reset(run.seed + online_it)
            warmup = pure_online and online_it < config.warmup_steps
            actions = act(trainer, runs, warmup, it)
            rows = step_envs(runs, actions, buffer, it + 1, config.env_errors_in_a_row)
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
            log_evaluations(runs, False, config.offline_iterations, bar)
        if on_iteration is not None:
            on_iteration(step, runs, trainer)
        if config.checkpoints_path and (step % checkpoint_freq == 0 or step == total or signals.caught):
            save_checkpoints(runs, step, trainer, buffer, update, window, config.keep_checkpoints, save_checkpoint)
    eval_start = time.time()
    log_evaluations(runs, True, config.offline_iterations, bar)
    eval_seconds += time.time() - eval_start
    for run in runs:
        run.evaluator.close()
        run.train_env.env.close()
    bar.close()
    for run in runs:
        run.logger.close()
    return summarize(runs, stacked, total, trainer.total_it, time.time() - start, load_seconds, eval_seconds, start_it,
                     cql_alpha=float(trainer.cql_alpha), online_transitions=buffer.n_added)


def main(argv: Optional[List[str]] = None) -> None:
    run_main(parse_config, train, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
