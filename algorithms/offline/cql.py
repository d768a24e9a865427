"""Conservative Q-Learning (CQL), offline: read top to bottom.

Kumar et al., 2020 (https://arxiv.org/abs/2006.04779), with the options and defaults of CORL's
offline CQL, on Gymnasium + MuJoCo, h5py and Minari instead of gym, d4rl and mujoco-py.

    python algorithms/offline/cql.py --config_path configs/offline/cql/hopper/medium_v2.yaml --seed=3
    python algorithms/offline/cql.py --config_path configs/offline/cql/hopper/medium_v2.yaml --seeds=0,1,2,3
    python algorithms/offline/cql.py --help  # every option, with its meaning and default

This file holds everything that is CQL: config, normalisation, replay buffer, networks, the loss, the
update, the training loop and the evaluation episodes. What is not CQL (strict config parsing, datasets,
run directories and checkpoints, the background evaluator, the speed mechanics) is in algorithms/common/.
The manual is README.md and docs/.
"""
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

if __package__ in (None, ""):  # run as a file (python algorithms/offline/cql.py): the repository root on the path
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
    MAX_HIDDEN_LAYERS, MAX_SAMPLED_ACTIONS, MAX_STEPS, NON_NEGATIVE, POSITIVE, RUN_BOUNDS, RUN_LIMITS, ConfigError,
    DatasetError)
from algorithms.common.data import (  # noqa: E402
    OfflineData, action_bound, actions_outside_line, check_dataset_matches_env, dataset_label, load_dataset,
    normalized_score, reference_scores_line, return_range)
from algorithms.common.evaluation import Evaluator, actor_weights  # noqa: E402
from algorithms.common.fast import EnsembleLinear  # noqa: E402
from algorithms.common.runs import RunState as BaseRunState  # noqa: E402
from algorithms.common.runs import (  # noqa: E402
    RunLogger, check_resume, checkpoint_files, keep_lines, last_checkpoint_note, load_checkpoints, open_run_dirs,
    releasing_run_dir_locks, resolve_device, rng_states, set_rng_states, set_seed, start_run_logs, write_state_file)
from algorithms.common.stacks import data_key, prepare_members, stack_members, summarize  # noqa: E402
from algorithms.common.process import StopSignals, check_stack_resources, run_main, stopping_on_signals  # noqa: E402


# ======================================================================================
# Config
# ======================================================================================
@dataclass
class TrainConfig:
    """CORL's offline CQL options with their defaults, then this project's additions (dataset_path on)."""

    device: str = "auto"  # torch device; "auto": cuda when available, else cpu
    env: str = "halfcheetah-medium-expert-v2"  # D4RL name, Minari dataset id, or path to a D4RL-format HDF5 file
    seed: int = 0  # seeds python, numpy, torch and the evaluation episodes
    seeds: Optional[str] = None  # runs in one process: a list "0,1,2,3" or a count "4" (seed..seed+3); None: one
    stack_configs: Optional[str] = None  # config files trained in this process, "a.yaml,b.yaml" (each x seeds)
    eval_freq: int = 5_000  # evaluate every this many updates
    n_episodes: int = 10  # evaluation episodes, run side by side
    max_timesteps: int = 1_000_000  # number of gradient updates
    checkpoints_path: Optional[str] = None  # where run directories with checkpoints go; None: no checkpoints
    load_model: str = ""  # checkpoint file to start from; "" starts fresh
    buffer_size: int = 2_000_000  # largest dataset (transitions) the replay buffer accepts
    batch_size: int = 256  # transitions per update
    discount: float = 0.99  # discount factor gamma
    alpha_multiplier: float = 1.0  # multiplies the SAC entropy temperature alpha
    use_automatic_entropy_tuning: bool = True  # learn alpha towards entropy -action_dim
    backup_entropy: bool = False  # subtract alpha * log_pi(a'|s') in the TD target
    policy_lr: float = 3e-5  # actor (and alpha) learning rate
    qf_lr: float = 3e-4  # critic (and Lagrange alpha') learning rate
    soft_target_update_rate: float = 5e-3  # tau of the Polyak target update
    target_update_period: int = 1  # update the target critics every this many updates
    cql_n_actions: int = 10  # sampled actions per state for the CQL penalty
    cql_importance_sample: bool = True  # importance-weight sampled actions by their density
    cql_lagrange: bool = False  # tune the penalty weight alpha' towards cql_target_action_gap
    cql_target_action_gap: float = -1.0  # Lagrange target for the penalty (logsumexp Q - data Q)
    cql_temp: float = 1.0  # temperature of the logsumexp over sampled actions
    cql_alpha: float = 10.0  # weight of the CQL penalty
    cql_max_target_backup: bool = False  # TD target from the max over cql_n_actions next actions
    cql_clip_diff_min: float = -math.inf  # lower clip of the penalty (logsumexp Q - data Q)
    cql_clip_diff_max: float = math.inf  # upper clip of the penalty
    orthogonal_init: bool = True  # orthogonal initialisation of the critics
    normalize: bool = True  # normalise states by the dataset mean and std
    normalize_reward: bool = False  # rescale rewards (locomotion: returns to a 1000 range), then scale/bias
    q_n_hidden_layers: int = 3  # hidden layers of 256 units in each critic
    reward_scale: float = 5.0  # reward multiplier applied when normalize_reward
    reward_bias: float = -1.0  # reward offset applied when normalize_reward
    bc_steps: int = 0  # first updates train the actor by behaviour cloning (log-likelihood)
    policy_log_std_multiplier: float = 1.0  # initial value of the actor's learnable log-std multiplier
    project: str = "CORL"  # wandb project
    group: str = "CQL-D4RL"  # wandb group
    name: str = "CQL"  # run name prefix; the run directory is <name>-<env>-<seed>-<id>
    dataset_path: Optional[str] = None  # read env's data from this HDF5 file instead of the D4RL cache
    eval_env: Optional[str] = None  # Gymnasium id to evaluate on; default: the dataset's own env
    max_episode_steps: Optional[int] = None  # evaluation episode length; default: the env's limit
    ref_min_score: Optional[float] = None  # return that scores 0; default: D4RL's / the dataset's
    ref_max_score: Optional[float] = None  # return that scores 100; default: D4RL's / the dataset's
    minari_download: bool = False  # let Minari download a dataset that is not stored locally
    goal_in_state: Optional[bool] = None  # goal Dict envs: desired_goal in the state; None: false for HDF5, else true
    background_eval: Optional[bool] = None  # evaluate in a worker process while training goes on; None: on for cuda
    checkpoint_freq: Optional[int] = None  # checkpoint every this many updates; None: at each evaluation
    keep_checkpoints: int = 0  # keep only the newest this many checkpoint files; 0 keeps all
    resume: Optional[str] = None  # run directory of a stopped run: continue from its newest checkpoint
    on_nonfinite: str = "stop"  # at a non-finite loss or gradient: "stop" naming it, or "skip" that update and go on
    log_freq: int = 1_000  # average and log training metrics every this many updates
    log_dir: str = "runs"  # where run directories go when checkpoints_path is None
    wandb_mode: Optional[str] = None  # online, offline or disabled; None: online if an API key is set, else offline
    compile: Optional[bool] = None  # torch.compile the losses and one run's Adam step (same math); None: on for cuda
    cudagraphs: bool = True  # on cuda, replay the whole update (sampling, losses, backward, Adam) as a CUDA graph
    tf32: bool = False  # allow TF32 matmuls on cuda: faster, ~1e-3 relative precision instead of fp32's


# CQL's own fields and their ranges, beside the run fields every script has (RUN_BOUNDS, RUN_LIMITS).
BOUNDS: Dict[str, Tuple[float, Optional[float], bool]] = {
    **RUN_BOUNDS, "target_update_period": POSITIVE, "cql_n_actions": POSITIVE, "q_n_hidden_layers": POSITIVE,
    "policy_lr": POSITIVE, "qf_lr": POSITIVE, "cql_temp": POSITIVE, "max_timesteps": NON_NEGATIVE,
    "bc_steps": NON_NEGATIVE, "cql_alpha": NON_NEGATIVE, "alpha_multiplier": NON_NEGATIVE, "discount": (0, 1, True),
    "soft_target_update_rate": (0, 1, False),
}
LIMITS: Dict[str, float] = {
    **RUN_LIMITS, "target_update_period": MAX_STEPS, "cql_n_actions": MAX_SAMPLED_ACTIONS,
    "q_n_hidden_layers": MAX_HIDDEN_LAYERS, "max_timesteps": MAX_STEPS, "bc_steps": MAX_STEPS,
    "policy_lr": 1, "qf_lr": 1,  # Adam moves each weight by about lr per update: past 1 it only wrecks them
}


def check_config(config: TrainConfig) -> None:
    """Rejects impossible values with a one-line ConfigError naming the field."""
    strict.check_run_config(config, BOUNDS, LIMITS)
    if config.cql_clip_diff_min > config.cql_clip_diff_max:
        raise ConfigError(f"fields 'cql_clip_diff_min' ({config.cql_clip_diff_min}) > "
                          f"'cql_clip_diff_max' ({config.cql_clip_diff_max})")


def parse_config(argv: List[str]) -> TrainConfig:
    """`--config_path file.yaml` and `--key=value` overrides, strictly (algorithms/common/config.py)."""
    return strict.parse_config(argv, TrainConfig, check_config)


# ======================================================================================
# Data
# ======================================================================================


def normalize_rewards(data: OfflineData, config: TrainConfig, max_episode_steps: int = 1000) -> None:
    """CORL's modify_reward: locomotion returns rescaled to a 1000 range, then reward * scale + bias."""
    if data.is_locomotion:
        low, high = return_range(data.rewards, data.terminals if data.episode_ends is None else data.episode_ends,
                                 max_episode_steps)
        if not high > low:
            raise DatasetError(f"{data.source}: every episode has return {high}; cannot rescale rewards "
                               f"by the return range (set normalize_reward false)")
        data.rewards = data.rewards / (high - low) * max_episode_steps
    with np.errstate(over="ignore"):  # an overflow is the error below, not a warning on stderr
        data.rewards = (data.rewards * config.reward_scale + config.reward_bias).astype(np.float32)
    if not np.isfinite(data.rewards).all():
        raise ConfigError(f"fields 'reward_scale' ({config.reward_scale:g}) and 'reward_bias' "
                          f"({config.reward_bias:g}): {data.source}'s rewards overflow float32 once scaled by them")


class Prepared(NamedTuple):
    """A member's data side (prepare_data), made once for the members of the same data (stacks.data_key)."""

    data: OfflineData  # rewards transformed, states normalised
    state_mean: np.ndarray
    state_std: np.ndarray
    max_action: float  # the eval env's action bound
    probe_env: gym.Env  # an eval env, the evaluators' model


def prepare_data(config: TrainConfig) -> Prepared:
    """config's dataset checked against its eval env, rewards transformed and states normalised."""
    data = load_dataset(config)
    print(reference_scores_line(config, data.source, data.ref_min_score, data.ref_max_score, data.ref_origin))
    probe_env = data.make_env()
    check_dataset_matches_env(data, probe_env)
    max_action = action_bound(probe_env, "eval env")
    if outside_line := actions_outside_line(data, max_action):
        print(outside_line)
    if len(data.rewards) > config.buffer_size:
        raise ConfigError(f"field 'buffer_size' ({config.buffer_size}) is smaller than the dataset "
                          f"({len(data.rewards)} transitions)")
    if config.normalize_reward:
        normalize_rewards(data, config)
    state_dim = data.observations.shape[1]
    state_mean, state_std = np.zeros(state_dim), np.ones(state_dim)
    if config.normalize:
        state_mean, state_std = data.observations.mean(0), data.observations.std(0) + 1e-3
    data.observations = ((data.observations - state_mean) / state_std).astype(np.float32)
    data.next_observations = ((data.next_observations - state_mean) / state_std).astype(np.float32)
    return Prepared(data, state_mean, state_std, max_action, probe_env)


class ReplayBuffer:
    """The dataset's transitions as one device tensor, a row (s, a, r, s', done) per transition: a batch
    is one gather (not five), drawn on the device (no host sync). The fields are column views of it. A stack
    of members on different datasets holds them as blocks of rows one after another (run_blocks: each run's
    block), and each run draws from its own block only."""

    def __init__(self, data: Union[OfflineData, List[OfflineData]], device: torch.device,
                 run_blocks: Optional[List[int]] = None):
        blocks = data if isinstance(data, list) else [data]
        sizes = [len(block.rewards) for block in blocks]
        self.widths = [blocks[0].observations.shape[1], blocks[0].actions.shape[1], 1,
                       blocks[0].observations.shape[1], 1]
        self.rows = torch.empty(sum(sizes), sum(self.widths), dtype=torch.float32, device=device)
        starts = np.cumsum([0] + sizes)  # each block's first row
        for block, start, size in zip(blocks, starts, sizes):
            columns = (block.observations, block.actions, block.rewards[:, None], block.next_observations,
                       block.terminals[:, None])
            for view, column in zip(self.rows[start:start + size].split(self.widths, 1), columns):
                view.copy_(torch.as_tensor(column, dtype=torch.float32))
        self.observations, self.actions, rewards, self.next_observations, terminals = self.rows.split(self.widths, 1)
        self.rewards, self.terminals = rewards[:, 0], terminals[:, 0]
        self.size = sum(sizes)
        self.run_sizes = [sizes[b] for b in run_blocks] if run_blocks else self.size  # each run draws in [0, size)
        run_starts = [int(starts[b]) for b in run_blocks or [0]]  # ... of its block, which starts here
        self.run_starts = torch.tensor(run_starts, device=device)[:, None] if any(run_starts) else None

    def sample(self, batch_size: int, runs: Tuple[int, ...] = (), streams: Optional[fast.RunStreams] = None
               ) -> Tuple[torch.Tensor, ...]:
        """A batch of rows; with runs = (n_seeds,), one batch of its own for each run: (n_seeds, batch, ...),
        drawn from each run's stream (or, without streams, the global one; one block only)."""
        index = (streams.randint(self.run_sizes, batch_size) if streams is not None
                 else torch.randint(0, self.size, (*runs, batch_size), device=self.rows.device))
        if self.run_starts is not None:
            index = index + self.run_starts
        obs, actions, rewards, next_obs, dones = self.rows[index].split(self.widths, -1)
        return obs, actions, rewards[..., 0], next_obs, dones[..., 0]


# ======================================================================================
# Networks
# ======================================================================================
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def init_linear(linear: nn.Linear, last: bool, orthogonal: bool) -> None:
    """CORL's offline initialisation of one layer (its init_module_weights on a network's layers).

    orthogonal: orthogonal weights, gain sqrt(2) for hidden layers and 1e-2 for the output layer,
    zero biases. Otherwise the output layer gets xavier-uniform weights with gain 1e-2 and a zero
    bias, and hidden layers keep PyTorch's default. CORL's offline actor never passes its
    orthogonal_init on, so the actor here is always built with orthogonal False.
    The finetune script's init_linear is CORL finetune's scheme, which differs.
    """
    if orthogonal:
        nn.init.orthogonal_(linear.weight, gain=1e-2 if last else math.sqrt(2))
        nn.init.zeros_(linear.bias)
    elif last:
        nn.init.xavier_uniform_(linear.weight, gain=1e-2)
        nn.init.zeros_(linear.bias)


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

    With seeds, one trainer holds len(seeds) independent runs: every network, alpha and Adam state
    gets a leading run dimension (the critic ensemble folds it into its members), batches and noise
    are (n_seeds, batch, ...), and the losses and metrics are per run, shape run_shape = (n_seeds,).
    The runs share no parameter and Adam is element-wise, so the summed loss and the one optimizer
    step are exactly n_seeds separate updates. Run i starts from the weights a one-run CQL made
    right after torch.manual_seed(seeds[i]) has, i.e. those of a one-seed run with seed seeds[i].

    With config.on_nonfinite "skip", apply_update sets `found_inf`, a device scalar, to 1 when the
    loss or a gradient is non-finite, and fused Adam (the one that reads optimizer.found_inf) and
    update_target then change nothing; one found_inf for a stack skips the update of every run.
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
            self.actor = TanhGaussianActor(state_dim, action_dim, max_action, log_std_multiplier).to(device)
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

    def losses(self, batch: Tuple[torch.Tensor, ...], noise: Dict[str, torch.Tensor], bc: bool
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Sum of the four losses, each reaching only its own parameters, and the metrics.

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
            # Sampled actions for the penalty: policy at s and at s' (both scored at s), uniform.
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
        if c.cql_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            cql_min_losses = alpha_prime.detach() * c.cql_alpha * (cql_diff - c.cql_target_action_gap)
            alpha_prime_loss = -0.5 * (alpha_prime * c.cql_alpha * (cql_diff.detach() - c.cql_target_action_gap)).sum(0)
        else:
            alpha_prime = obs.new_zeros(runs)
            cql_min_losses = c.cql_alpha * cql_diff
            alpha_prime_loss = obs.new_zeros(runs)
        critic_loss = qf_losses.sum(0) + cql_min_losses.sum(0)

        total = (policy_loss + alpha_loss + critic_loss + alpha_prime_loss).sum()  # runs add up: disjoint parameters
        metrics = {
            "policy_loss": policy_loss, "alpha_loss": alpha_loss, "alpha": alpha, "log_pi": log_pi.mean(-1),
            "qf1_loss": qf_losses[0], "qf2_loss": qf_losses[1],
            "average_qf1": q_data[0].mean(-1), "average_qf2": q_data[1].mean(-1),
            "average_target_q": target_q.mean(-1),
            "cql_std_q1": cql_std[0], "cql_std_q2": cql_std[1],
            "cql_q1_rand": q_rand[0].mean((-2, -1)), "cql_q2_rand": q_rand[1].mean((-2, -1)),
            "cql_q1_current_actions": q_current[0].mean((-2, -1)),
            "cql_q2_current_actions": q_current[1].mean((-2, -1)),
            "cql_q1_next_actions": q_next[0].mean((-2, -1)), "cql_q2_next_actions": q_next[1].mean((-2, -1)),
            "cql_min_qf1_loss": cql_min_losses[0], "cql_min_qf2_loss": cql_min_losses[1],
            "cql_qf1_diff": cql_diff[0], "cql_qf2_diff": cql_diff[1],
            "alpha_prime_loss": alpha_prime_loss, "alpha_prime": alpha_prime,
        }
        return total, {k: v.detach() for k, v in metrics.items()}

    def train(self, batch: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
        """One update of actor, critics, alpha and alpha'; metrics stay on the device."""
        self.total_it += 1
        bc, update_target = self.phase(self.total_it)
        return self.apply_update(batch, self.draw_noise(batch[0].shape[0]), bc, update_target)

    def phase(self, update: int) -> Tuple[bool, bool]:
        """(behaviour-cloning update?, target update after it?) for the update-th update."""
        return update <= self.config.bc_steps, update % self.config.target_update_period == 0

    def apply_update(self, batch: Tuple[torch.Tensor, ...], noise: Dict[str, torch.Tensor], bc: bool,
                     update_target: bool) -> Dict[str, torch.Tensor]:
        total, metrics = self.losses(batch, noise, bc)
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
                "stream": self.streams.states()[run]}

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
def evaluate(envs: gym.vector.VectorEnv, actor: TanhGaussianActor, seed: int, state_mean: np.ndarray,
             state_std: np.ndarray) -> np.ndarray:
    """Returns of deterministic episodes run side by side in envs, episode i seeded seed + i.

    The actor runs as a CPU copy: for a handful of states a step on the CPU beats a round trip to
    the GPU. An env whose episode ended keeps being stepped (and reset by the vector env) until
    all have ended; its extra rewards are not counted.
    """
    policy = copy.deepcopy(actor).cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few rows: worker threads would only spin and steal the envs' cores
    try:
        obs, _ = envs.reset(seed=[seed + i for i in range(envs.num_envs)])
        returns = np.zeros(envs.num_envs)
        running = np.ones(envs.num_envs, dtype=bool)
        while running.any():
            state = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32)
            obs, reward, terminated, truncated, _ = envs.step(policy.act(state).numpy())
            returns += np.where(running, reward, 0.0)
            running &= ~(terminated | truncated)
    finally:
        torch.set_num_threads(threads)
    return returns


def save_checkpoint(path: Path, trainer: CQL, state_mean: np.ndarray, state_std: np.ndarray,
                    run_state: Optional["RunState"] = None, run: Optional[int] = None,
                    config: Optional[TrainConfig] = None) -> None:
    """Everything needed to continue: trainer (or run `run` of a stack, in the one-run layout),
    normalisation, config (the run's own; default the trainer's) and (for resume) run_state."""
    state = {**(trainer.state_dict() if run is None else trainer.run_state_dict(run)),
             "state_mean": state_mean, "state_std": state_std, "config": asdict(config or trainer.config),
             "run": None if run_state is None else run_state.to_dict()}
    write_state_file(path, state)


# ======================================================================================
# Training
# ======================================================================================
@dataclass
class RunState(BaseRunState):
    """A run's checkpoint entry 'run' (BaseRunState: what --resume needs), with its evaluation results."""

    scores: Dict[int, float] = field(default_factory=dict)  # normalized score by update
    last_return: Optional[float] = None


@dataclass
class Run:
    """One member's run in train(): its own config, data, directory, logger, evaluator and evaluation results."""

    config: TrainConfig  # what its config.yaml records: it trains this run alone
    data: OfflineData  # its dataset (normalised), shared by the members of the same data
    state_mean: np.ndarray
    state_std: np.ndarray
    dir: Optional[Path] = None
    logger: Optional[RunLogger] = None
    evaluator: Optional[Evaluator] = None
    scores: Dict[int, float] = field(default_factory=dict)  # normalized score by update
    last_return: Optional[float] = None

    def run_state(self, rng: Dict[str, Any], metric_sum: torch.Tensor, window: int, skipped_updates: torch.Tensor,
                  stack: Optional[List[str]]) -> RunState:
        """This run's state for its checkpoint, with the stack's random streams and metric window."""
        return RunState(rng=rng, metric_sum=metric_sum, window=window, skipped_updates=skipped_updates,
                        metrics_rows=self.logger.rows, pending_evaluations=dict(self.evaluator.pending), stack=stack,
                        scores=self.scores, last_return=self.last_return)

    @property
    def seed(self) -> int:
        return self.config.seed

    def last_good_checkpoint(self) -> str:
        return last_checkpoint_note(self.dir, none="")

    def restore(self, state: RunState) -> None:
        """Takes a stopped run's evaluation results; its unfinished evaluations run again."""
        self.scores, self.last_return = state.scores, state.last_return
        for eval_step, weights in sorted(state.pending_evaluations.items()):  # CPU copies, as when submitted
            self.evaluator.submit(eval_step, {k: v.cpu() for k, v in weights.items()})


def save_checkpoints(runs: List[Run], step: int, trainer: CQL, update: fast.UpdateStep, window: int,
                     keep: int) -> None:
    """Every run's checkpoint of update `step` (a stack: one ordinary checkpoint per run, all of one
    update); old ones go (keep > 0) only once every run has this update's."""
    if not trainer.parameters_finite():  # never overwrite good weights with broken ones
        raise FloatingPointError(f"non-finite network weights after update {step}" + runs[0].last_good_checkpoint())
    stacked = trainer.seeds is not None
    rng = rng_states()
    for i, run in enumerate(runs):
        run_state = run.run_state(rng, update.run_metric_sum(i).clone(), window, update.skipped_updates.clone(),
                                  [r.dir.name for r in runs] if stacked else None)  # the siblings to resume with
        save_checkpoint(run.dir / f"checkpoint_{step}.pt", trainer, run.state_mean, run.state_std, run_state,
                        run=i if stacked else None, config=run.config)
    for run in runs:
        for old in checkpoint_files(run.dir)[:-keep] if keep else []:
            old.unlink()


@releasing_run_dir_locks
@stopping_on_signals  # SIGINT, SIGTERM: the update in flight ends, then a checkpoint and one line (exit 130, 143)
def train(config: TrainConfig, signals: Optional[StopSignals] = None) -> Dict[str, Any]:
    """Trains CQL on config's dataset; returns a summary (last and best normalized score, paths)."""
    begin = time.time()
    device = resolve_device(config.device)
    fast.keep_freed_host_memory(device)  # CPU: no page faults for each update's tensors
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    set_seed(config.seed)  # a stack of runs: its batches and noise come from this one stream
    members = stack_members(config, lambda path: parse_config(["--config_path", path]))
    stacked = members is not None
    members = members or [config]
    prepared = prepare_members(members, prepare_data, lambda p: (p.data.observations.shape[1], p.data.actions.shape[1],
                                                                 p.max_action), lambda p: p.data.source)
    blocks = list(prepared)
    data, max_action = prepared[blocks[0]].data, prepared[blocks[0]].max_action
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    buffer = ReplayBuffer([prepared[key].data for key in blocks], device,
                          [blocks.index(data_key(m)) for m in members] if len(blocks) > 1 else None)

    seeds = [m.seed for m in members] if stacked else None
    check_stack_resources(config, seeds, device, lambda: CQL(config, state_dim, action_dim, max_action,
                                                             torch.device("cpu")), state_dim, action_dim)
    trainer = CQL(config, state_dim, action_dim, max_action, device,
                  capturable=config.cudagraphs and device.type == "cuda", seeds=seeds)
    runs = [Run(m, *prepared[data_key(m)][:3]) for m in members]  # a run per member: its data, state mean and std
    labels = [dataset_label(m.env) for m in members]
    resumed: Optional[List[RunState]] = None  # each run's run state
    if config.resume:
        dirs, files = open_run_dirs(config, [run.seed for run in runs], labels)
        states = load_checkpoints([str(f) for f in files], trainer, "resume")
        check_resume(config, dirs, [run.seed for run in runs], states, trainer.total_it, members if stacked else None)
        resumed = [RunState.from_dict(state["run"]) for state in states]
        for run, run_dir, run_state, state in zip(runs, dirs, resumed, states):
            run.state_mean, run.state_std = state["state_mean"], state["state_std"]
            keep_lines(run_dir / "metrics.jsonl", run_state.metrics_rows)  # rows after the checkpoint come again
    else:
        if config.load_model:  # a stack starts every run from it
            state = load_checkpoints([config.load_model], trainer, "load_model")[0]
            for run in runs:
                run.state_mean, run.state_std = state["state_mean"], state["state_std"]
        dirs, _ = open_run_dirs(config, [run.seed for run in runs], labels)
    loggers = start_run_logs(config, dirs, [run.seed for run in runs], stacked, members if stacked else None)
    for run, run_dir, logger in zip(runs, dirs, loggers):
        run.dir, run.logger = run_dir, logger
    which = f"seeds {', '.join(str(r.seed) for r in runs)}" if len(blocks) == 1 else f"{len(blocks)} datasets"
    where = f"run dir {runs[0].dir}" if not stacked else f"{len(runs)} runs ({which}) in {runs[0].dir.parent}"
    source = data.source if len(blocks) == 1 else f"{len(blocks)} datasets"
    print(f"CQL on {source}: {buffer.size} transitions, state {state_dim}, action {action_dim}, "
          f"device {device}, {where}" + (f", resumed at update {trainer.total_it}" if resumed else ""))

    use_compile = fast.resolve_compile(config.compile, device)
    update = trainer.update_step(buffer, config.batch_size, use_compile, config.cudagraphs)
    background = device.type == "cuda" if config.background_eval is None else config.background_eval
    with torch.random.fork_rng(devices=[]):  # a stack's one-run actor for the evaluators, aside from the stream
        template = TanhGaussianActor(state_dim, action_dim, max_action) if stacked else trainer.actor
    for run in runs:  # episode i of run k is seeded seeds[k] + i
        run.evaluator = Evaluator(prepared[data_key(run.config)].probe_env, run.data.make_env, config.n_episodes,
                                  evaluate, (run.seed, run.state_mean, run.state_std), template, background,
                                  run.dir.name, run.last_good_checkpoint)
    for data_side in prepared.values():
        data_side.probe_env.close()
    window = 0
    if resumed is not None:
        window = resumed[0].window
        update.skipped_updates.copy_(torch.as_tensor(resumed[0].skipped_updates))
        for i, (run, run_state) in enumerate(zip(runs, resumed)):
            update.run_metric_sum(i).copy_(run_state.metric_sum)
            run.restore(run_state)
        set_rng_states(resumed[0].rng)  # last: from here on the run draws what the stopped one would have
        trainer.streams.resume(states)
    checkpoint_freq = config.checkpoint_freq or config.eval_freq
    start, first = time.time(), trainer.total_it
    load_seconds, eval_seconds = start - begin, 0.0
    bar = tqdm(range(first, config.max_timesteps), desc="CQL", unit="upd", dynamic_ncols=True, initial=first,
               total=config.max_timesteps,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs stay short when not a terminal

    def log_evaluations(run: Run, finished: List[Tuple[int, np.ndarray]]) -> None:
        for eval_step, returns in finished:  # in the background these may come after later rows
            row = {"eval_return_mean": float(returns.mean()), "eval_return_std": float(returns.std())}
            score = normalized_score(returns, run.data.ref_min_score, run.data.ref_max_score)
            if score is not None:
                row["d4rl_normalized_score"] = run.scores[eval_step] = score
            run.last_return = row["eval_return_mean"]
            run.logger.log(row, eval_step)
        latest = [r.scores[max(r.scores)] if r.scores else r.last_return for r in runs]
        if finished and None not in latest:  # a stack shows the mean over its runs
            # refresh=False: shown at the next refresh, with a fresh update count
            bar.set_postfix(score=f"{np.mean(latest):.1f}", refresh=False)

    for _ in signals.steps(bar, [run.dir for run in runs]):  # a signal stops it after an update and its checkpoint
        update()
        window += 1
        step = trainer.total_it
        if step % config.log_freq == 0 or step == config.max_timesteps:
            run_means = update.take_run_means(window)
            if run_means[0].get("skipped_updates") == window:  # on_nonfinite "skip", and nothing was kept
                raise FloatingPointError(
                    f"every update in updates {step - window + 1}..{step} had a non-finite loss or gradient"
                    + (" in some run of the stack" if stacked else "") + " (on_nonfinite=skip)"
                    + runs[0].last_good_checkpoint())
            for run, means in zip(runs, run_means):
                for name, value in means.items():
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"non-finite {name} ({value}) in updates {step - window + 1}..{step}"
                            + (f" of the run with seed {run.seed}" if stacked else "") + run.last_good_checkpoint())
            for run, means in zip(runs, run_means):
                run.logger.log(means, step)
            window = 0
        if step % config.eval_freq == 0 or step == config.max_timesteps:
            eval_start = time.time()
            for i, run in enumerate(runs):
                run.evaluator.submit(step, actor_weights(trainer.actor, i if stacked else None))
            eval_seconds += time.time() - eval_start
        if step % config.log_freq == 0 or step % config.eval_freq == 0 or step == config.max_timesteps:
            for run in runs:
                log_evaluations(run, run.evaluator.collect())
        if config.checkpoints_path and (step % checkpoint_freq == 0 or step == config.max_timesteps or signals.caught):
            save_checkpoints(runs, step, trainer, update, window, config.keep_checkpoints)
    eval_start = time.time()
    for run in runs:
        log_evaluations(run, run.evaluator.collect(wait=True))
    eval_seconds += time.time() - eval_start
    for run in runs:
        run.evaluator.close()
    bar.close()
    for run in runs:
        run.logger.close()
    return summarize(runs, trainer.total_it, time.time() - start, load_seconds, eval_seconds, stacked, first)


def main(argv: Optional[List[str]] = None) -> None:
    run_main(parse_config, train, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
