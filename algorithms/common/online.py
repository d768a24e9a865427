"""The bookkeeping of online runs (the finetune script's): each run of a stack with its own config, training env,
data side (state normalisation, reward transform, reference returns), counters, directory, logger, evaluator
and results; its actions, env steps and rows into its replay ring; its metric windows, evaluations, checkpoints
and run state; the summary line. A run is a stack of one. Nothing here is CQL: the trainer is passed in (its
actor, random streams and weights), and so are the script's checkpoint reader and writer.
"""
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from algorithms.common import fast
from algorithms.common import runs as runs_lib
from algorithms.common.config import ConfigError
from algorithms.common.data import dataset_label, normalized_score
from algorithms.common.envs import EnvStep, TrainingEnv, env_state, set_env_state
from algorithms.common.evaluation import Evaluator
from algorithms.common.runs import (
    RunLogger,
    check_resume,
    keep_lines,
    last_checkpoint_note,
    load_state_file,
    open_run_dirs,
    rng_states,
    set_rng_states,
    start_run_logs,
)
from algorithms.common.runs import RunState as BaseRunState


def new_progress() -> Dict[str, Any]:
    """A run's counters at its start: the checkpoint's 'progress' entry (with online_transitions added)."""
    return {"iteration": 0, "train_episodes": 0, "train_successes": 0, "eval_success_rates": [], "scores": []}


@dataclass
class RunState(BaseRunState):
    """A run's checkpoint entries 'run' (BaseRunState: what --resume needs, and an online run's episode in
    progress and results) and 'progress' (its counters, an entry of its own)."""

    progress: Dict[str, Any] = field(default_factory=new_progress)
    goal_task: bool = False
    last_score: Optional[float] = None
    eval_returns: List[float] = field(default_factory=list)
    episode: Tuple[Optional[np.ndarray], float, int, bool] = (None, 0.0, 0, False)  # obs, return, length, success
    env: Optional[Dict[str, Any]] = None  # env_state() of the training env mid-episode
    env_errors: Tuple[int, int] = (0, 0)  # failed training-env steps: all, and the latest in a row

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint's 'run' entry (progress is an entry of its own)."""
        state = super().to_dict()
        del state["progress"]
        if not any(self.env_errors):  # written once a step failed: other checkpoints keep their keys
            del state["env_errors"]
        return state

    @classmethod
    def from_dict(cls, run: Dict[str, Any], progress: Optional[Dict[str, Any]] = None) -> "RunState":
        state = super().from_dict({k: v for k, v in run.items() if k != "progress"})
        state.episode, state.env_errors = tuple(state.episode), tuple(state.env_errors)
        state.progress.update({k: copy.deepcopy(v) for k, v in (progress or {}).items() if k in state.progress})
        return state

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "RunState":
        """A checkpoint's run state; one without a 'run' entry (rng None) gives its progress and pending evaluations."""
        state = cls.from_dict(checkpoint.get("run") or {}, checkpoint.get("progress"))
        state.pending_evaluations = runs_lib.pending_evaluations(checkpoint)
        return state


def load_replay(path: str, state: Dict[str, Any], buffer: Any, field: str, run: Optional[int] = None) -> None:
    """Puts the online rows of checkpoint `path` (its replay file) into the buffer (into run `run`'s ring)."""
    progress = state["progress"]
    if progress["online_transitions"] > 0:
        replay = Path(path).parent / state["replay_file"]
        if not replay.is_file():
            raise ConfigError(f"field '{field}': {path} needs its replay file {replay}, which is gone "
                              f"(a run keeps only its newest checkpoint's replay buffer)")
        try:
            online = load_state_file(replay)
        except ValueError as e:
            raise ConfigError(f"field '{field}': replay file {replay} is unreadable ({e})") from None
        if online["n_added"] != progress["online_transitions"]:
            raise ConfigError(f"field '{field}': replay file {replay} holds {online['n_added']} online transitions, "
                              f"{path} counts {progress['online_transitions']}")
        buffer.load_online_state(online, str(replay), field, run)


def phase_of(step: int, offline_iterations: int) -> Dict[str, int]:
    """offline_iter or online_iter of the step-th iteration, 0-based within its phase as CORL logs them
    (its loop index t = step - 1, and t - offline_iterations online)."""
    if step > offline_iterations:
        return {"online_iter": step - 1 - offline_iterations}
    return {"offline_iter": step - 1}


@dataclass
class Run:
    """One member's run in train(): its own config, training env with the episode in progress, data side,
    counters, directory, logger, evaluator and evaluation results. One run is a stack of one."""

    config: Any  # the member's own config: what its config.yaml records, it trains this run alone
    train_env: TrainingEnv
    state_mean: np.ndarray  # its state normalisation (online states too)
    state_std: np.ndarray
    reward_transform: Callable[[Any], np.ndarray]  # raw rewards -> its dataset's scale
    sparse_reward: bool = False  # antmaze-like: a positive raw reward is a success
    ref_min: Optional[float] = None  # its reference returns (normalized scores)
    ref_max: Optional[float] = None
    goal_task: bool = False  # success is logged (a goal task, or the env reported a success)
    dir: Optional[Path] = None
    logger: Optional[RunLogger] = None
    evaluator: Optional[Evaluator] = None
    progress: Dict[str, Any] = field(default_factory=new_progress)
    last_score: Optional[float] = None
    eval_returns: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.train_env.last_good_checkpoint = self.last_good_checkpoint  # its faults name this run's checkpoint

    @property
    def seed(self) -> int:
        return self.config.seed

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.state_mean) / self.state_std).astype(np.float32)

    def step(self, action: np.ndarray, step: int, errors_in_a_row: int) -> Tuple[EnvStep, Dict[str, float]]:
        """One step of the training env (TrainingEnv.step), and the row of the episode it ended (empty while the
        episode goes on)."""
        result, ended = self.train_env.step(action, self.sparse_reward, step, errors_in_a_row)
        self.goal_task = self.goal_task or result.success is not None
        row: Dict[str, float] = {}
        if ended is not None:
            episode_return, episode_length, episode_success = ended
            progress = self.progress
            progress["train_episodes"] += 1
            row["train/episode_return"], row["train/episode_length"] = episode_return, episode_length
            score = normalized_score(episode_return, self.ref_min, self.ref_max)
            if score is not None:
                row["train/d4rl_normalized_episode_return"] = score
            if self.goal_task:
                progress["train_successes"] += int(episode_success)
                row["train/is_success"] = float(episode_success)
                row["train/regret"] = 1.0 - progress["train_successes"] / progress["train_episodes"]
            if result.error is not None:
                row["train/env_errors"] = self.train_env.errors
        return result, row

    def log_evaluations(self, finished: List[Tuple[int, Any]], offline_iterations: int) -> None:
        """Logs finished evaluations: (step, (returns, successes, whether the env told success))."""
        for eval_step, (returns, successes, reported) in finished:  # in the background these may come after later rows
            self.goal_task = self.goal_task or reported
            self.last_score = normalized_score(returns, self.ref_min, self.ref_max)
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
        env = self.train_env
        return RunState(progress=self.progress, rng=rng, metric_sum=metric_sum, window=window,
                        skipped_updates=skipped_updates, metrics_rows=self.logger.rows,
                        pending_evaluations=dict(self.evaluator.pending), stack=stack, goal_task=self.goal_task,
                        last_score=self.last_score, eval_returns=list(self.eval_returns),
                        episode=(None if env.obs is None else env.obs.copy(), env.episode_return,
                                 env.episode_length, env.episode_success),
                        env=None if env.obs is None else env_state(env.env),
                        env_errors=(env.errors, env.errors_in_a_row))

    def restore(self, state: RunState, resume: bool) -> None:
        """Takes a checkpoint's progress and unfinished evaluations (which run again); with resume also its
        evaluation results and episode in progress, with the training env's state."""
        self.progress = state.progress
        for eval_step, weights in sorted(state.pending_evaluations.items()):  # CPU copies, as when submitted
            self.evaluator.submit(eval_step, {k: v.cpu() for k, v in weights.items()})
        if not resume:  # load_model: fresh episodes, the random streams not restored
            return
        self.goal_task, self.last_score, self.eval_returns = state.goal_task, state.last_score, state.eval_returns
        env = self.train_env
        env.obs, env.episode_return, env.episode_length, env.episode_success = state.episode
        env.errors, env.errors_in_a_row = state.env_errors
        if state.env is not None:
            set_env_state(env.env, state.env)
        elif env.obs is not None:  # the env's state could not be saved: a fresh episode, as after load_model
            print(f"the training env of seed {self.seed} was not saved (its state is not plain data): the episode of "
                  f"{env.episode_length} steps in progress at iteration {self.progress['iteration']} is dropped, "
                  f"a new one starts")
            env.new_episode(None)


def open_runs(config: Any, runs: List[Run], stacked: bool,
              load: Callable[[List[str], str], List[Dict[str, Any]]]) -> Tuple[Optional[List[Dict[str, Any]]], bool]:
    """Gives each run its directory (with its config) and logger, and loads the checkpoints they start from
    (load(paths, field): the script's reader, into the trainer and the replay rings): with resume each run's
    newest (a stack: of the newest iteration that every run has one of), with load_model the one that every run
    starts from; each run takes its checkpoint's state normalisation. Returns those checkpoints, one per run
    (None: a fresh start), and whether they resume."""
    seeds, labels = [run.seed for run in runs], [dataset_label(run.config.env) for run in runs]
    members = [run.config for run in runs] if stacked else None  # None: a lone run's config.yaml is run_config's
    if config.resume:
        dirs, files = open_run_dirs(config, seeds, labels, "iteration", runs_lib.replay_missing)
        states = load([str(f) for f in files], "resume")
        check_resume(config, dirs, seeds, states, states[0]["progress"]["iteration"], members)
        for run_dir, state in zip(dirs, states):
            for orphan in run_dir.glob("replay_*.pt"):  # written by a kill between the replay and checkpoint writes
                if orphan.name != state["replay_file"]:
                    orphan.unlink()
            keep_lines(run_dir / "metrics.jsonl", state["run"]["metrics_rows"])  # rows after the checkpoint come again
    else:
        states = load([config.load_model], "load_model") if config.load_model else None
        dirs, _ = open_run_dirs(config, seeds, labels)
    loggers = start_run_logs(config, dirs, seeds, stacked, members)
    for i, (run, run_dir, logger) in enumerate(zip(runs, dirs, loggers)):
        run.dir, run.logger = run_dir, logger
        if states is not None:
            run.state_mean, run.state_std = states[i]["state_mean"], states[i]["state_std"]
    return states, bool(config.resume)


def restore_runs(runs: List[Run], states: Optional[List[Dict[str, Any]]], resumed: bool,
                 update: fast.UpdateStep) -> int:
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


def act(trainer: Any, runs: List[Run], warmup: bool, it: int) -> np.ndarray:
    """One action per run (rows): uniformly random in warmup, else all actors in one call (trainer.actor(states,
    noise), each run's noise from its own stream), one host sync."""
    if warmup:
        return np.stack([run.train_env.env.action_space.sample() for run in runs])
    with torch.no_grad():
        states = torch.as_tensor(np.stack([run.normalize(run.train_env.obs) for run in runs]), device=trainer.device)
        if trainer.seeds is not None:
            states = states[:, None]  # each run's actor takes a batch of one
        noise = trainer.streams.randn(1, trainer.action_dim)  # each run's own stream, as its updates
        actions = trainer.actor(states, noise)[0].reshape(len(runs), -1).cpu().numpy()
    if not np.isfinite(actions).all():  # broken weights: stop before the env or the buffer sees it
        bad = int(np.argwhere(~np.isfinite(actions))[0][0])
        raise FloatingPointError(f"non-finite action ({actions[bad]}) from the actor"
                                 + (f" of seed {runs[bad].seed}" if trainer.seeds is not None else "")
                                 + f" in iteration {it + 1}" + runs[bad].last_good_checkpoint())
    return actions


def step_envs(runs: List[Run], actions: np.ndarray, buffer: Any, step: int = 0, errors_in_a_row: int = 5
              ) -> List[Dict[str, float]]:
    """Steps every run's env with its action and adds the transitions (normalised, rewards transformed: each
    run's own) to the buffer (a stack: one to each run's ring); returns each run's row of the ended episode
    (empty if none ended). A failed step (step_env) stores nothing of its own: a one-run ring adds no row; a
    stack's rings move together, so the failed run's row repeats its newest transition, unless the rings are
    still empty (the stack's first online step, with no dataset): then none adds one."""
    transitions: List[Optional[Tuple[Any, ...]]] = []
    rows = []
    for run, action in zip(runs, actions):
        obs = run.train_env.obs
        result, row = run.step(action, step, errors_in_a_row)
        rows.append(row)
        # A time-limit truncation is not a terminal: the target bootstraps through it.
        transitions.append(None if result.error is not None else (
            run.normalize(obs), action, run.reward_transform(result.reward), run.normalize(result.next_obs),
            float(result.terminated)))
    if any(t is None for t in transitions):
        if not buffer.runs or not min(buffer.sizes):
            return rows
        transitions = [buffer.newest(i) if t is None else t for i, t in enumerate(transitions)]
    buffer.add(*(np.stack(column) for column in zip(*transitions)))
    return rows


def window_means(update: fast.UpdateStep, runs: List[Run], window: int, step: int) -> List[Dict[str, float]]:
    """Each run's metric means over the window of `window` updates that ends at iteration `step`; a window
    with no kept update or a non-finite mean stops training, naming the last good checkpoint."""
    stacked = update.metric_sum.dim() > 1  # (metrics, n_seeds) sums
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


def log_evaluations(runs: List[Run], wait: bool, offline_iterations: int, bar: Any) -> None:
    """Logs the evaluations finished since the last call (with wait, all submitted ones) of every run."""
    finished = [run.evaluator.collect(wait=wait) for run in runs]
    for run, results in zip(runs, finished):
        run.log_evaluations(results, offline_iterations)
    latest = [run.last_score if run.last_score is not None else run.eval_returns[-1] if run.eval_returns else None
              for run in runs]
    if any(finished) and None not in latest:  # a stack shows the mean over its runs
        bar.set_postfix(score=f"{np.mean(latest):.1f}", refresh=False)  # shown at the next refresh, with a fresh count


def save_checkpoints(runs: List[Run], step: int, trainer: Any, buffer: Any, update: fast.UpdateStep, window: int,
                     keep: int, save_checkpoint: Callable[..., Any]) -> None:
    """Every run's checkpoint of iteration `step` (a stack: one ordinary checkpoint per run, its own config and
    normalisation), written by the script's save_checkpoint; the old files go only once every run has this
    iteration's."""
    if not trainer.parameters_finite():  # never replace good weights with broken ones
        raise FloatingPointError(f"non-finite network weights after iteration {step}" + runs[0].last_good_checkpoint())
    stacked = trainer.seeds is not None
    rng = rng_states()
    for i, run in enumerate(runs):
        run.progress["iteration"] = step
        state = run.run_state(rng, update.run_metric_sum(i).clone(), window, update.skipped_updates.clone(),
                              [r.dir.name for r in runs] if stacked else None)  # the sibling runs to resume with
        save_checkpoint(run.dir, step, trainer, buffer, run.state_mean, run.state_std, state,
                        run=i if stacked else None, prune=False, config=run.config if stacked else None)
    for run in runs:
        runs_lib.prune_checkpoints(run.dir, run.dir / f"replay_{step}.pt", keep)


def summarize(runs: List[Run], stacked: bool, total: int, updates: int, elapsed: float, load_seconds: float,
              eval_seconds: float, first: int = 0, **more: Any) -> Dict[str, Any]:
    """train()'s summary, printed in one line with every run's normalized score (a stack of several datasets:
    each dataset's mean over its seeds); first: the iteration a resumed process started from (its time counts the
    iterations after it); more: the script's own entries."""
    summaries = [{"seed": run.seed, "env": run.config.env, "run_dir": str(run.dir), "last_score": run.last_score,
                  "best_score": max(run.progress["scores"]) if run.progress["scores"] else None,
                  "eval_returns": run.eval_returns, "train_episodes": run.progress["train_episodes"],
                  "env_errors": run.train_env.errors} for run in runs]
    summary = {"iterations": total, "updates": updates, "seconds": elapsed, "load_seconds": load_seconds,
               "eval_seconds": eval_seconds, **more}
    if stacked:
        summary = {"runs": summaries, "run_dirs": [s["run_dir"] for s in summaries], **summary}
    else:
        summary = {"run_dir": summaries[0]["run_dir"], **summary,
                   **{k: v for k, v in summaries[0].items() if k not in ("seed", "env", "run_dir")}}
    last = [run.last_score for run in runs]
    by_env: Dict[str, List[float]] = {}
    for run in runs:
        by_env.setdefault(run.config.env, []).append(run.last_score)
    if None not in last and not stacked:
        score_text = f"normalized score last {last[0]:.1f}, best {summaries[0]['best_score']:.1f}"
    elif None not in last and len(by_env) == 1:
        score_text = (f"normalized score last {np.mean(last):.1f} +- {np.std(last):.1f} over {len(runs)} seeds "
                      f"({', '.join(f'{v:.1f}' for v in last)})")
    elif None not in last:
        score_text = "normalized score last (mean over seeds) " + ", ".join(
            f"{dataset_label(env)} {np.mean(v):.1f}" for env, v in by_env.items())
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
    resumed = f", {total - first} in this process, resumed at iteration {first}" if first else ""
    print(f"done: {total} iterations ({updates} updates{each}{resumed}) in {elapsed:.0f} s (evaluation "
          f"held training up {eval_seconds:.1f} s, {eval_share:.1f}% of the run; set-up {load_seconds:.0f} s), "
          f"{score_text}{failed}; metrics in {metrics}")
    return summary
