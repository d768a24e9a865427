"""Evaluation of actor snapshots beside training: here and now, or in a worker process while the update loop
goes on. The episode loop itself is the script's (its `evaluate`); this module runs it, in the background
or not, keeps the snapshots of evaluations not yet finished (a checkpoint carries them) and replaces a worker
that dies, once.
"""
import copy
import multiprocessing
import pickle
import signal
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import gymnasium as gym
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from algorithms.common.config import ConfigError, RunFault
from algorithms.common.envs import one_line


class EvaluationWorkerError(RunFault):
    """An evaluation failed (an eval env raised, in the worker or in the trainer), or a background worker died
    again before the evaluations it was restarted for were done."""


def actor_weights(actor: nn.Module, run: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """A CPU copy of the actor's weights (of run `run` of a stack: actor.member(run), in the one-run layout):
    what an evaluation needs, frozen at the time of the call."""
    if run is not None:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in actor.member(run).items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in actor.state_dict().items()}


def _by_value(weights: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Weights as numpy arrays, which pickle by value: a tensor sent to another process goes through shared
    memory and holds a file descriptor open here until it is freed (~10 per job, and the open-file limit
    counts them for every run of a stack)."""
    return {k: v.numpy() for k, v in weights.items()}


def _evaluation_worker(env_spec: Any, n_episodes: int, actor: bytes, evaluate: Callable[..., Any],
                       jobs: Any, results: Any) -> None:
    """Background evaluator process: evaluates each (step, weights, episode_args) job, answers (step, result).
    actor: the pickled actor (by value, see _by_value). It ignores SIGINT: Ctrl-C in a terminal reaches the whole
    process group, and the trainer alone stops the run
    (its evaluations still pending go into its checkpoint); it started with SIGINT blocked (start_worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")
    try:
        policy = pickle.loads(actor)
        envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_spec)] * n_episodes)
        while (job := jobs.get()) is not None:
            step, weights, episode_args = job
            policy.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            results.send((step, evaluate(envs, policy, *episode_args)))
        envs.close()
    except Exception as e:  # reported to the trainer, which stops with it
        results.send((None, one_line(e)))


class Evaluator:
    """Evaluates actor snapshots with evaluate(envs, actor, *episode_args) on n_episodes envs side by side.

    actor: a one-run actor of the right shape (copied, never trained here). evaluate and actor must pickle
    (a module-level function, or functools.partial of one) when background: the worker process gets them.
    In the background the loop only copies the actor's weights (~0.3 MB); results are logged at their own
    step, and the weights of evaluations still running (`pending`) go into checkpoints. A worker that dies is
    replaced with a one-line warning and its pending evaluations run again; if the new one dies too first,
    the run stops (EvaluationWorkerError) naming the last good checkpoint. Nothing waits on a dead worker:
    it holds the only writing end of its answer pipe, so its death reads as the pipe's end.
    """

    def __init__(self, env: gym.Env, make_env: Callable[[], gym.Env], n_episodes: int, evaluate: Callable[..., Any],
                 episode_args: Tuple[Any, ...], actor: nn.Module, background: bool, label: str = "",
                 last_good_checkpoint: Callable[[], str] = lambda: ""):
        self.evaluate, self.episode_args = evaluate, episode_args
        self.label, self.last_good_checkpoint = label, last_good_checkpoint  # for messages: the run's name
        self.pending: Dict[int, Dict[str, torch.Tensor]] = {}
        self.resubmitted: Set[int] = set()  # steps whose evaluation a replaced worker's successor runs again
        self.finished: List[Tuple[int, Any]] = []
        self.worker = None
        self.actor = copy.deepcopy(actor).cpu()  # a copy, not a new actor: no draw from the random stream
        if background:
            if env.spec is None:
                raise ConfigError("field 'background_eval': the eval env has no Gymnasium spec to rebuild it from "
                                  "in a worker process; set background_eval false")
            self.worker_args = (env.spec, n_episodes, pickle.dumps(self.actor), evaluate)
            self.start_worker()
        else:
            self.envs = gym.vector.SyncVectorEnv([make_env] * n_episodes)

    def submit(self, step: int, weights: Dict[str, torch.Tensor]) -> None:
        """Evaluates the actor weights (see actor_weights) of update `step`."""
        if self.worker is None:
            self.actor.load_state_dict(weights)
            try:
                self.finished.append((step, self.evaluate(self.envs, self.actor, *self.episode_args)))
            except Exception as e:  # an eval env may raise anything: one line, as from the worker
                run = f" of {self.label}" if self.label else ""
                raise EvaluationWorkerError(f"evaluation of update {step}{run} failed in the trainer: {one_line(e)}"
                                            + self.last_good_checkpoint()) from None
            return
        self.jobs.put((step, _by_value(weights), self.episode_args))
        self.pending[step] = weights

    def start_worker(self) -> None:
        """A worker process with a job queue and an answer pipe of its own: a dead worker's are never reused,
        as it may have died holding the queue's lock or half-way through a message."""
        context = multiprocessing.get_context("spawn")  # never fork a process holding a CUDA context
        self.jobs = context.Queue()
        self.jobs.cancel_join_thread()  # at exit, never wait to feed jobs to a worker that is gone
        self.results, answers = context.Pipe(duplex=False)
        self.worker = context.Process(target=_evaluation_worker, daemon=True,
                                      args=(*self.worker_args, self.jobs, answers))
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited: no Ctrl-C traceback
        try:  # from the worker while it starts (imports torch), before _evaluation_worker ignores SIGINT
            self.worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a SIGINT that came meanwhile reaches the trainer now
        answers.close()  # the worker holds the only writing end: its death reads as the pipe's end

    def replace_dead_worker(self) -> None:
        """Called once every answer of a dead worker is read: one line, and a new worker that runs the pending
        evaluations again; an EvaluationWorkerError if some of them were already run again once."""
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
            self.jobs.put((step, _by_value(self.pending[step]), self.episode_args))
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

    def collect(self, wait: bool = False) -> List[Tuple[int, Any]]:
        """(step, evaluate's result) of the evaluations finished since the last call, oldest first; with wait,
        of all submitted ones."""
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
