"""D4RL-style datasets from any Gymnasium continuous-control task (GitHub issue 5).

    python tools/make_dataset.py --env Hopper-v4 --train_steps 60000 --kinds medium-replay
    python tools/make_dataset.py --help

1. Train a behaviour policy with the project's own online learner: the finetune script's train() in
   pure online mode with the CQL penalty off (that is SAC), acting uniformly at random for
   warmup_steps, driven through its on_iteration hook. Every snapshot_freq steps (and at step 0 and at the end) the
   actor's state_dict is kept with its deterministic evaluation return (eval_episodes episodes), and
   the learner is checkpointed. Every transition the learner sees is kept, in order (the stream).
2. Cut datasets as D4RL describes them:
     random         rollouts of the untrained policy (the step-0 snapshot)
     medium         rollouts of the first snapshot whose evaluation return reaches target_return, by
                    default random + (final - random) / 3 (a third of the final return when random is ~0)
     medium-replay  every transition the learner saw until the medium snapshot's step, in order
     expert         rollouts of the final policy
     medium-expert  medium then expert, concatenated
     full-replay    every transition the learner saw
   Rollouts sample actions from the policy (as D4RL) for n_transitions steps; episodes end by the
   env's time limit (timeouts) or by termination (terminals); the last row of every dataset ends an
   episode (a timeout if it was cut), so that concatenated datasets keep episodes apart.
3. Write <out_dir>/<prefix>-<kind>.hdf5 in D4RL's layout (observations, actions, rewards,
   next_observations as float32; terminals, timeouts as bool) with metadata attrs that
   algorithms/offline/cql.py reads (env_id, ref_min_score, ref_max_score) plus time_limit, kind,
   policy_step, behaviour_return, ...; written atomically; max_episode_steps only when it differs from
   the env's registered limit. ref_min_score / ref_max_score are the mean episode returns of the random
   and expert rollouts. Optionally a local Minari dataset too.

Resume: everything lives in work_dir (config.json, learner/ (the finetune script's run dir), stream/,
snapshots/, rollouts/). Run the same command again (or with a larger train_steps) and it continues from
the newest learner checkpoint with the finetune script's --resume: networks, optimizer, replay buffer,
random streams and the training env mid-episode. A resumed run gives the same stream as an uninterrupted one.
Options that change what is learned (env, seed, warmup, learning rates, ...) must stay the same.

Layout: config -> environment helpers -> learner (train) -> rollouts -> datasets and files -> main.
"""
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `algorithms` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym
import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

import algorithms.finetune.cql as finetune
from algorithms.common import config as strict
from algorithms.common.data import action_bound, is_gym_id, normalized_score
from algorithms.common.online import Run
from algorithms.common.runs import checkpoint_files, load_state_file, resolve_device
from algorithms.common.runs import write_atomic as write_file_atomic

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert", "full-replay")
COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


# ======================================================================================
# Config
# ======================================================================================
@dataclass
class MakeConfig:
    """What to train, when to snapshot, which datasets to cut and where to write them."""

    env: str = "Hopper-v4"  # Gymnasium id of a task with a 1-D symmetric Box action space
    seed: int = 0  # seeds the learner, its training episodes, evaluations and rollouts
    work_dir: Optional[str] = None  # learner, stream, snapshots, rollouts; None: runs/make_dataset/<env>-<seed>
    out_dir: str = "data"  # where the HDF5 files go
    prefix: Optional[str] = None  # file names <prefix>-<kind>.hdf5; None: the env id in lower case
    kinds: str = "random,medium,medium-replay,expert,medium-expert,full-replay"  # datasets to write, comma-separated
    train_steps: int = 100_000  # env steps of the behaviour learner (one update each after warmup)
    warmup_steps: int = 5_000  # first steps act uniformly at random, no updates
    snapshot_freq: int = 5_000  # keep the actor, evaluate it and checkpoint the learner every this many steps
    eval_episodes: int = 5  # deterministic evaluation episodes per snapshot
    n_transitions: int = 100_000  # transitions per rollout dataset (random, medium, expert; medium-expert has 2x)
    target_return: Optional[float] = None  # medium: first snapshot at this return; None: random + (final - random) / 3
    max_episode_steps: Optional[int] = None  # episode time limit; None: the env's own
    batch_size: int = 256  # learner: transitions per update
    policy_lr: float = 3e-4  # learner: actor and entropy-temperature learning rate
    qf_lr: float = 3e-4  # learner: critic learning rate
    q_n_hidden_layers: int = 2  # learner: hidden layers of 256 units in each critic
    discount: float = 0.99  # learner: discount factor
    compression: int = 0  # gzip level 1-9 for the HDF5 arrays; 0: none
    minari: bool = False  # also write each dataset as a local Minari dataset <minari_namespace>/<env>/<kind>-v0
    minari_namespace: str = "local"  # Minari namespace of those datasets
    device: str = "cpu"  # torch device of the learner and rollouts
    threads: int = 1  # torch intra-op threads (1 is fastest for these small networks on a busy CPU)


# Options that change what the learner does: a work dir refuses to continue with other values.
LEARNER_FIELDS = ("env", "seed", "warmup_steps", "snapshot_freq", "eval_episodes", "max_episode_steps",
                  "batch_size", "policy_lr", "qf_lr", "q_n_hidden_layers", "discount", "device")


class MakeError(ValueError):
    """An option, work dir or env that cannot be used; the message is one line naming it."""


def parse_args(argv: List[str]) -> MakeConfig:
    """`--config_path file.yaml` and `--key=value` / `--key value` options of MakeConfig, parsed and typed as
    the finetune script parses its own (command-line options override the file's)."""
    try:
        return strict.parse_config(argv, MakeConfig, check_config)
    except strict.ConfigError as e:
        raise MakeError(str(e)) from None


# Upper limits of the counts, the finetune script's where it has the option (a larger value is a typo).
MAKE_LIMITS = {"train_steps": strict.MAX_STEPS, "snapshot_freq": strict.MAX_STEPS,
               "eval_episodes": strict.MAX_EPISODES, "n_transitions": strict.MAX_ROWS,
               "batch_size": strict.MAX_BATCH, "q_n_hidden_layers": strict.MAX_HIDDEN_LAYERS,
               "threads": 4096, "warmup_steps": strict.MAX_STEPS, "max_episode_steps": strict.MAX_STEPS,
               "seed": strict.MAX_SEED}


def check_config(config: MakeConfig) -> None:
    for name in ("train_steps", "snapshot_freq", "eval_episodes", "n_transitions", "batch_size", "q_n_hidden_layers",
                 "policy_lr", "qf_lr", "threads"):
        if not getattr(config, name) > 0:
            raise MakeError(f"option '{name}' must be > 0, got {getattr(config, name)!r}")
    for name, low in (("warmup_steps", 0), ("seed", 0), ("max_episode_steps", 1)):
        if getattr(config, name) is not None and getattr(config, name) < low:
            raise MakeError(f"option '{name}' must be >= {low}, got {getattr(config, name)}")
    for name, limit in MAKE_LIMITS.items():
        if getattr(config, name) is not None and getattr(config, name) > limit:
            raise MakeError(f"option '{name}' must be at most {limit}, got {getattr(config, name)!r}")
    if not 0 <= config.discount <= 1:
        raise MakeError(f"option 'discount' must be in [0, 1], got {config.discount}")
    for name in ("policy_lr", "qf_lr"):  # as the finetune script's
        if getattr(config, name) > 1:
            raise MakeError(f"option '{name}' must be in (0, 1], got {getattr(config, name)}")
    if not 0 <= config.compression <= 9:
        raise MakeError(f"option 'compression' must be a gzip level 0-9, got {config.compression}")
    unknown = [k for k in kinds_of(config) if k not in KINDS]
    if unknown or not kinds_of(config):
        raise MakeError(f"option 'kinds': expected some of {', '.join(KINDS)}, got {config.kinds!r}")
    if not is_gym_id(config.env):
        raise MakeError(f"option 'env': {config.env!r} is not a registered Gymnasium id")


def kinds_of(config: MakeConfig) -> List[str]:
    return [k.strip() for k in config.kinds.split(",") if k.strip()]


def work_dir_of(config: MakeConfig) -> Path:
    return Path(config.work_dir or Path("runs") / "make_dataset" / f"{config.env.replace('/', '-')}-{config.seed}")


def write_atomic(path: Path, write, mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, write, mode)


# ======================================================================================
# Environment helpers
# ======================================================================================
def make_env(config: MakeConfig) -> gym.Env:
    extra = {"max_episode_steps": config.max_episode_steps} if config.max_episode_steps else {}
    return gym.make(config.env, **extra)


def env_facts(config: MakeConfig) -> Tuple[int, int, float, int]:
    """state_dim, action_dim, max_action and the episode time limit of config.env."""
    env = make_env(config)
    try:
        max_action = action_bound(env, f"env {config.env}")
    except strict.DatasetError as e:
        raise MakeError(str(e)) from None
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise MakeError(f"env {config.env}: needs a 1-D Box observation space, got {env.observation_space}")
    limit = env.spec.max_episode_steps if env.spec else None
    if not limit:
        raise MakeError(f"env {config.env}: has no time limit; set --max_episode_steps")
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    return state_dim, action_dim, max_action, int(limit)


class Columns:
    """Growing lists of the six D4RL columns; arrays() makes them float32 / bool arrays."""

    def __init__(self):
        self.rows: Dict[str, list] = {k: [] for k in COLUMNS}

    def add(self, obs, action, reward, next_obs, terminated, timeout) -> None:
        for key, value in zip(COLUMNS, (obs, action, reward, next_obs, terminated, timeout)):
            self.rows[key].append(value)

    def __len__(self) -> int:
        return len(self.rows["rewards"])

    def arrays(self, state_dim: int, action_dim: int) -> Dict[str, np.ndarray]:
        shapes = {"observations": (state_dim,), "next_observations": (state_dim,), "actions": (action_dim,)}
        out = {}
        for key in COLUMNS:
            dtype = bool if key in ("terminals", "timeouts") else np.float32
            out[key] = np.asarray(self.rows[key], dtype=dtype).reshape(-1, *shapes.get(key, ()))
        return out


def concat(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


def episode_returns(data: Dict[str, np.ndarray]) -> List[float]:
    """Returns of the complete episodes (ended by a terminal or a time-limit timeout)."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    sums = np.cumsum(data["rewards"], dtype=np.float64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(int)
    return [float(sums[e] - (sums[s - 1] if s > 0 else 0.0)) for s, e in zip(starts, ends)]


# ======================================================================================
# Learner: SAC as the finetune script's pure online mode, with snapshots and a kept stream
# ======================================================================================
def learner_config(config: MakeConfig, work: Path) -> finetune.TrainConfig:
    """The finetune script's pure online mode with the CQL penalty off (SAC), plain eager updates, its
    checkpoints (the newest only) in <work>/learner every snapshot_freq steps; the tool snapshots itself."""
    return finetune.TrainConfig(
        device=config.device, env=config.env, seed=config.seed, offline_iterations=0,
        online_iterations=config.train_steps, batch_size=config.batch_size, discount=config.discount,
        policy_lr=config.policy_lr, qf_lr=config.qf_lr, cql_alpha=0.0, cql_alpha_online=0.0,
        q_n_hidden_layers=config.q_n_hidden_layers, normalize=False, warmup_steps=config.warmup_steps,
        max_episode_steps=config.max_episode_steps, wandb_mode="disabled", compile=False, cudagraphs=False,
        background_eval=False, eval_freq=config.train_steps, n_episodes=1, log_freq=config.snapshot_freq,
        checkpoints_path=str(work / "learner"), checkpoint_freq=config.snapshot_freq, keep_checkpoints=1,
        name="learner", env_errors_in_a_row=1)  # the stream keeps one transition a step: a failed env step stops


def check_work_dir(config: MakeConfig, work: Path) -> None:
    """Writes config.json on first use; later runs must agree on every learner option."""
    path = work / "config.json"
    mine = {k: getattr(config, k) for k in LEARNER_FIELDS}
    if path.is_file():
        theirs = json.loads(path.read_text())
        changed = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items() if theirs.get(k) != v]
        if changed:
            raise MakeError(f"work dir {work}: made with other learner options ({'; '.join(changed)}); "
                            f"use another --work_dir")
    else:
        write_atomic(path, lambda f: json.dump(mine, f, indent=1), mode="w")


def load_stream(work: Path, n: int) -> Dict[str, np.ndarray]:
    """The first n transitions of the stream, from its chunk files stream/<start>_<end>.npz."""
    chunks = sorted((int(p.stem.split("_")[0]), int(p.stem.split("_")[1]), p) for p in (work / "stream").glob("*.npz"))
    parts, end = [], 0
    for start, stop, path in chunks:
        if start >= n:
            continue
        if start != end:
            raise MakeError(f"work dir {work}: stream chunk {path.name} starts at {start}, expected {end}")
        with np.load(path) as f:
            parts.append({k: f[k][: n - start] for k in COLUMNS})
        end = min(stop, n)
    if end != n:
        raise MakeError(f"work dir {work}: the stream holds {end} transitions, the checkpoint needs {n}")
    if not parts:
        return {k: np.zeros((0,)) for k in COLUMNS}
    return concat(parts)


def read_snapshots(work: Path) -> List[Dict[str, Any]]:
    path = work / "snapshots.json"
    return json.loads(path.read_text()) if path.is_file() else []


def load_actor(work: Path, step: int, state_dim: int, action_dim: int, max_action: float,
               device: torch.device) -> finetune.TanhGaussianActor:
    actor = finetune.TanhGaussianActor(state_dim, action_dim, max_action).to(device)
    actor.load_state_dict(torch.load(work / "snapshots" / f"actor_{step}.pt", map_location=device))
    return actor.eval()


def learner_checkpoint(work: Path) -> Optional[Path]:
    """The newest checkpoint of the learner's run in work_dir, if any; a run killed before its first
    checkpoint is removed (nothing of it can be continued)."""
    for run_dir in (work / "learner").glob("learner-*"):
        if not checkpoint_files(run_dir):
            shutil.rmtree(run_dir)
    runs = sorted((work / "learner").glob("learner-*"))
    if len(runs) > 1:
        raise MakeError(f"work dir {work}: holds {len(runs)} learner runs in {work / 'learner'}, expected one")
    return checkpoint_files(runs[0])[-1] if runs else None


def train_learner(config: MakeConfig, work: Path) -> List[Dict[str, Any]]:
    """Trains (or continues training) up to config.train_steps with the finetune script's online learner,
    keeping its transitions and snapshots through train()'s on_iteration; returns the snapshots, oldest first."""
    state_dim, action_dim, _, _ = env_facts(config)
    device = resolve_device(config.device)
    checkpoint = learner_checkpoint(work)
    start = 0 if checkpoint is None else load_state_file(checkpoint)["progress"]["iteration"]
    # Snapshots and stream chunks after the checkpoint: a kill came before it; they are made again.
    snapshots = [s for s in read_snapshots(work) if s["step"] <= start] if start else []
    if start > config.train_steps:
        raise MakeError(f"option 'train_steps' ({config.train_steps}): work dir {work} has already trained "
                        f"{start} steps; use a larger train_steps or another work dir")
    if start == config.train_steps and snapshots and snapshots[-1]["step"] == start:
        return snapshots
    if start:
        print(f"continuing the learner in {work} from step {start}")
    for chunk in (work / "stream").glob("*.npz"):
        if int(chunk.stem.split("_")[0]) >= start:
            chunk.unlink()
    lconfig = learner_config(config, work)
    lconfig.resume = None if checkpoint is None else str(checkpoint.parent)  # exact: env, buffer, random streams
    eval_envs = [make_env(config) for _ in range(config.eval_episodes)]
    new = Columns()  # the transitions since the last snapshot
    zero, one = np.zeros(state_dim), np.ones(state_dim)

    def snapshot(step: int, actor: finetune.TanhGaussianActor) -> None:
        returns = finetune.evaluate(eval_envs, actor, config.seed + 10_000, zero, one, device)[0]
        write_atomic(work / "snapshots" / f"actor_{step}.pt", lambda f: torch.save(actor.state_dict(), f))
        snapshots.append({"step": step, "eval_return_mean": float(returns.mean()),
                          "eval_return_std": float(returns.std())})
        write_atomic(work / "snapshots.json", lambda f: json.dump(snapshots, f, indent=1), mode="w")

    def on_iteration(step: int, runs: List[Run], trainer: finetune.CQL) -> None:
        """Keeps the step's transition; at a snapshot step writes the stream's new chunk, before the
        learner's checkpoint of that step: a checkpoint never counts transitions the stream lacks."""
        if step == start:  # before the first iteration
            if step == 0:
                snapshot(0, trainer.actor)
            return
        obs, action, reward, next_obs, terminated, truncated = runs[0].train_env.last_step
        new.add(obs, action, reward, next_obs, terminated, truncated and not terminated)
        if step % config.snapshot_freq == 0 or step == config.train_steps:
            snapshot(step, trainer.actor)
            arrays = new.arrays(state_dim, action_dim)
            write_atomic(work / "stream" / f"{step - len(new)}_{step}.npz", lambda f: np.savez(f, **arrays))
            new.__init__()

    try:
        finetune.train(lconfig, on_iteration)
    finally:
        for e in eval_envs:
            e.close()
    return snapshots


# ======================================================================================
# Rollouts of a snapshot, stochastic actions as in D4RL
# ======================================================================================
ROLLOUT_SEEDS = {"random": 1, "medium": 2, "expert": 3}


def rollout(config: MakeConfig, actor: finetune.TanhGaussianActor, n: int, seed: int, desc: str
            ) -> Dict[str, np.ndarray]:
    """n transitions from the stochastic actor; episode i reset with seed + i, noise from a seeded generator."""
    state_dim, action_dim = actor.net[0].in_features, actor.action_dim
    env = make_env(config)
    noise = torch.Generator().manual_seed(seed)
    device = next(actor.parameters()).device
    rows = Columns()
    episode = 0
    obs = env.reset(seed=seed + episode)[0]
    interval = 0.5 if sys.stderr.isatty() else 30.0
    for _ in tqdm(range(n), desc=desc, unit="step", dynamic_ncols=True, mininterval=interval):
        with torch.no_grad():
            state = torch.as_tensor(obs[None], dtype=torch.float32, device=device)
            action = actor(state, torch.randn(1, action_dim, generator=noise).to(device))[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.add(obs, action, reward, next_obs, terminated, truncated and not terminated)
        obs = next_obs
        if terminated or truncated:
            episode += 1
            obs = env.reset(seed=seed + episode)[0]
    env.close()
    return end_episode(rows.arrays(state_dim, action_dim))


def end_episode(data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The last row ends an episode: a timeout when it was cut mid-episode."""
    data = {k: v.copy() for k, v in data.items()}
    if len(data["rewards"]) and not (data["terminals"][-1] or data["timeouts"][-1]):
        data["timeouts"][-1] = True
    return data


def cached_rollout(config: MakeConfig, work: Path, policy: str, step: int, state_dim: int, action_dim: int,
                   max_action: float) -> Dict[str, np.ndarray]:
    path = work / "rollouts" / f"{policy}_step{step}_n{config.n_transitions}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in COLUMNS}
    actor = load_actor(work, step, state_dim, action_dim, max_action, resolve_device(config.device))
    data = rollout(config, actor, config.n_transitions, config.seed * 1_000_003 + ROLLOUT_SEEDS[policy] * 100_003,
                   f"{policy} rollouts (step {step})")
    write_atomic(path, lambda f: np.savez(f, **data))
    return data


# ======================================================================================
# Datasets and files
# ======================================================================================
def pick_medium(snapshots: List[Dict[str, Any]], target_return: Optional[float]) -> Tuple[Dict[str, Any], float]:
    """The first trained snapshot (after step 0, before the final one) whose evaluation return reaches the
    target, as D4RL stopped training its medium policy early; if none does, the one nearest to it
    (ties: the earliest). Returns the snapshot and the target."""
    first, final = snapshots[0]["eval_return_mean"], snapshots[-1]["eval_return_mean"]
    target = first + (final - first) / 3.0 if target_return is None else target_return
    candidates = snapshots[1:-1] or snapshots[-1:]
    reached = [s for s in candidates if s["eval_return_mean"] >= target]
    if reached:
        return reached[0], target
    return min(candidates, key=lambda s: (abs(s["eval_return_mean"] - target), s["step"])), target


def write_hdf5(path: Path, data: Dict[str, np.ndarray], attrs: Dict[str, Any], compression: int = 0) -> None:
    """D4RL's layout through a temporary file in the same folder, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        options = {"compression": "gzip", "compression_opts": compression, "shuffle": True} if compression else {}
        with h5py.File(tmp, "w") as f:
            for key in COLUMNS:
                f.create_dataset(key, data=data[key], **(options if data[key].ndim else {}))
            for key, value in attrs.items():
                f.attrs[key] = value
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a dataset is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_minari(dataset_id: str, data: Dict[str, np.ndarray], config: MakeConfig, ref_min: float, ref_max: float,
                 description: str) -> None:
    """A local Minari dataset whose episodes are built straight from the arrays (no jax needed)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    episodes, begin = [], 0
    for i, end in enumerate(ends):
        rows = slice(begin, end + 1)
        episodes.append(EpisodeBuffer(
            id=i, observations=np.concatenate([data["observations"][rows], data["next_observations"][end:end + 1]]),
            actions=data["actions"][rows], rewards=data["rewards"][rows].astype(np.float64),
            terminations=data["terminals"][rows], truncations=data["timeouts"][rows]))
        begin = end + 1
    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    minari.create_dataset_from_buffers(
        dataset_id, episodes, env=make_env(config), algorithm_name="SAC behaviour policy (tools/make_dataset.py)",
        ref_min_score=ref_min, ref_max_score=ref_max, description=description)


def make_datasets(config: MakeConfig) -> List[Dict[str, Any]]:
    """Trains (or continues) the learner, cuts config's kinds and writes them; returns one row per file."""
    torch.set_num_threads(config.threads)
    work = work_dir_of(config)
    work.mkdir(parents=True, exist_ok=True)
    check_work_dir(config, work)
    state_dim, action_dim, max_action, limit = env_facts(config)
    registered_limit = gym.spec(config.env).max_episode_steps
    snapshots = train_learner(config, work)
    stream = load_stream(work, config.train_steps)
    medium, target = pick_medium(snapshots, config.target_return)
    final = snapshots[-1]
    steps = {"random": snapshots[0]["step"], "medium": medium["step"], "expert": final["step"]}

    def policy_data(policy: str) -> Dict[str, np.ndarray]:
        return cached_rollout(config, work, policy, steps[policy], state_dim, action_dim, max_action)

    ref_min = float(np.mean(episode_returns(policy_data("random")) or [np.nan]))
    ref_max = float(np.mean(episode_returns(policy_data("expert")) or [np.nan]))
    eval_return = {s["step"]: s["eval_return_mean"] for s in snapshots}
    prefix = config.prefix or config.env.lower().replace("/", "-")
    rows = []
    for kind in kinds_of(config):
        if kind in ("random", "medium", "expert"):
            data, policy_step = policy_data(kind), steps[kind]
        elif kind == "medium-expert":
            data = concat([policy_data("medium"), policy_data("expert")])
            policy_step = [steps["medium"], steps["expert"]]
        elif kind == "medium-replay":
            data, policy_step = end_episode({k: v[: medium["step"]] for k, v in stream.items()}), medium["step"]
        else:  # full-replay
            data, policy_step = end_episode(stream), config.train_steps
        returns = episode_returns(data)
        behaviour = float(np.mean(returns)) if returns else float("nan")
        attrs = {
            "env_id": config.env, "time_limit": limit, "kind": kind, "seed": config.seed,
            "policy_step": policy_step, "behaviour_return": behaviour, "n_episodes": len(returns),
            "policy_eval_return": ([eval_return[s] for s in policy_step] if isinstance(policy_step, list)
                                   else eval_return.get(policy_step, float("nan"))),
            "medium_target_return": target, "ref_min_score": ref_min, "ref_max_score": ref_max,
            "train_steps": config.train_steps, "n_transitions": config.n_transitions,
            "tool": "tools/make_dataset.py", "tool_config": json.dumps(asdict(config)),
        }
        if limit != registered_limit:  # only then: the env's own limit is what a reader gets without it
            attrs["max_episode_steps"] = limit
        path = Path(config.out_dir) / f"{prefix}-{kind}.hdf5"
        write_hdf5(path, data, attrs, config.compression)
        if config.minari:
            write_minari(f"{config.minari_namespace}/{prefix.split('-v')[0]}/{kind}-v0", data, config, ref_min,
                         ref_max, f"{kind} data of {config.env} made by tools/make_dataset.py (seed {config.seed})")
        score = normalized_score(behaviour, ref_min, ref_max)
        rows.append({"kind": kind, "path": str(path), "transitions": len(data["rewards"]), "episodes": len(returns),
                     "policy_step": policy_step, "behaviour_return": behaviour, "normalized": score})
    summary = {"ref_min_score": ref_min, "ref_max_score": ref_max, "medium_target_return": target,
               "snapshots": snapshots, "files": rows}
    write_atomic(work / "summary.json", lambda f: json.dump(summary, f, indent=1), mode="w")
    print(f"{config.env}: ref_min_score {ref_min:.1f} (random), ref_max_score {ref_max:.1f} (expert, step "
          f"{final['step']}), medium snapshot step {medium['step']} (eval return {medium['eval_return_mean']:.1f}, "
          f"target {target:.1f})")
    for r in rows:
        print(f"  {r['kind']:<14} {r['transitions']:>8} transitions {r['episodes']:>5} episodes  behaviour return "
              f"{r['behaviour_return']:9.1f}  normalized {r['normalized']:6.1f}  -> {r['path']}")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        make_datasets(config)
    except MakeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, strict.RunFault) as e:  # the learner's run stopped (a failed write, ...)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
