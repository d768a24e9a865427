"""What makes a run durable: its directory (created, locked against a second process, its config recorded),
files written atomically, checkpoint files and which of them --resume continues from, the random streams,
and the metrics logger (metrics.jsonl, and wandb behind a guard that never stops training).

A write that fails stops the run with a WriteError (a RunFault: exit code 3) naming the file and the last
good checkpoint; a run directory that cannot be made or locked is a ConfigError naming the field it comes from.
"""
import contextlib
import errno
import fcntl
import functools
import json
import os
import pickle
import random
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from algorithms.common.config import STACK_RECORD, ConfigError, DatasetError, RunFault, StackRecord, run_config


@dataclass
class RunState:
    """What a run's checkpoint holds beside the networks and optimizer: its 'run' entry, what --resume needs to go
    on as the stopped run would have (None in a checkpoint for load_model only). A script's subclass adds what its
    runs keep (scores, an episode in progress, ...). The defaults are a fresh run's; to_dict/from_dict keep the
    checkpoints' keys, so older ones load."""

    rng: Optional[Dict[str, Any]] = None  # the global random streams (rng_states()); None: no run state
    metric_sum: Optional[torch.Tensor] = None  # the metric window's sums ...
    window: int = 0  # ... and its count of updates
    skipped_updates: Any = 0.0  # updates skipped in the window (on_nonfinite skip); older checkpoints: none
    metrics_rows: int = 0  # rows in metrics.jsonl at the checkpoint
    pending_evaluations: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)  # actor weights by step
    stack: Optional[List[str]] = None  # a stack's run directory names, to resume with; None: one run

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint's 'run' entry."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.stack is None:
            del state["stack"]
        return state

    @classmethod
    def from_dict(cls, run: Dict[str, Any]) -> "RunState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in run.items() if k in names})


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

    def __init__(self, config: Any, run_dir: Path, run_name: str, resume: bool = False,
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


def checkpoint_files(run_dir: Path) -> List[Path]:
    """The run's checkpoint files, oldest first."""
    return sorted(run_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def load_state_file(path: Any, map_location: Any = "cpu") -> Any:
    """The contents of a checkpoint or replay file; a ValueError with the one-line reason if it cannot be read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, KeyError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def read_checkpoint(path: str, map_location: Any, field: str) -> Dict[str, Any]:
    """A checkpoint file's contents; a ConfigError naming the field for a missing or unreadable file."""
    if not Path(path).is_file():
        raise ConfigError(f"field '{field}': checkpoint file {path} not found")
    try:
        return load_state_file(path, map_location)
    except ValueError as e:
        raise ConfigError(f"field '{field}': {path} does not fit this config ({e})") from None


def load_checkpoints(paths: List[str], trainer: Any, field: str, needs: Optional[str] = None
                     ) -> List[Dict[str, Any]]:
    """Reads a checkpoint per run of the trainer (one path: every run starts from it) and loads them into it:
    trainer.load_state_dict for one run, trainer.load_run_state_dicts for a stack (trainer.seeds). A missing,
    unreadable or unfitting file (or one without the entry `needs`: another script's) is a ConfigError
    naming the field."""
    paths = paths * len(trainer.seeds) if trainer.seeds is not None and len(paths) == 1 else paths
    loaded: Dict[str, Dict[str, Any]] = {}
    for path in paths:
        loaded[path] = loaded.get(path) or read_checkpoint(path, trainer.device, field)
        if needs is not None and needs not in loaded[path]:
            raise ConfigError(f"field '{field}': {path} does not fit this config (\"no '{needs}' entry\")")
    states = [loaded[path] for path in paths]
    try:
        if trainer.seeds is None:
            trainer.load_state_dict(states[0])
        else:
            trainer.load_run_state_dicts(states)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"field '{field}': {paths[0]} does not fit this config ({str(e).splitlines()[0]})") from None
    return states


def resume_checkpoints(run_dir: Path, n_runs: int, unit: str = "update") -> List[Path]:
    """The newest checkpoint of a stopped run, or for a stack of runs (run_dir: any of its run
    directories) of each of its runs: the newest `unit` (update, iteration) that every run has a checkpoint of."""
    files = checkpoint_files(run_dir)
    if not files:
        raise ConfigError(f"field 'resume': {run_dir} has no checkpoint to continue from (a run writes checkpoints "
                          f"when checkpoints_path is set: every checkpoint_freq updates, by default each evaluation)")
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
        raise ConfigError(f"field 'resume': the runs {', '.join(map(str, dirs))} have no checkpoint of one {unit}")
    return [d / f"checkpoint_{max(common)}.pt" for d in dirs]


def keep_lines(path: Path, n: int) -> None:
    """Keeps the first n lines of a text file (atomically); a torn last line goes too."""
    lines = path.read_text().splitlines(keepends=True)[:n] if path.exists() else []
    write_atomic(path, lambda f: f.writelines(lines), mode="w")


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


def default_cpu_threads(device: str) -> None:
    """One torch thread for a run on the CPU, unless OMP_NUM_THREADS sets the count. These networks are small:
    torch's default, a thread per core, mostly spins, against the evaluation envs and other processes too
    (300 updates of the quickstart on a busy 2-core machine: 272 s with 2 threads, 18 s with 1)."""
    if "OMP_NUM_THREADS" not in os.environ and resolve_device(device).type == "cpu":
        torch.set_num_threads(1)


def open_run_dirs(config: Any, seeds: List[int], label: str, unit: str = "update") -> Tuple[List[Path], List[Path]]:
    """Each seed's run directory, locked before anything in it changes (a second process stops here), and with
    config.resume the checkpoints to continue from: the stopped stack's directories and their newest checkpoint
    of one `unit` that all have, temporary files of writes a kill interrupted removed. Else new directories
    <name>-<label>-<seed>-<id> under checkpoints_path (or log_dir), and no checkpoints."""
    files: List[Path] = []
    if config.resume:
        files = resume_checkpoints(Path(config.resume), len(seeds), unit)
        dirs = [file.parent for file in files]
    else:
        root = Path(config.checkpoints_path or config.log_dir)
        dirs = [root / f"{config.name}-{label}-{seed}-{uuid.uuid4().hex[:8]}" for seed in seeds]
    for run_dir in dirs:
        make_run_dir(run_dir, config)
        lock_run_dir(run_dir, config)
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink()
    return dirs, files


def start_run_logs(config: Any, dirs: List[Path], seeds: List[int], stacked: bool) -> List[RunLogger]:
    """Each run's config.yaml (and, for a stack, its record: --resume of any of its directories resumes the whole
    stack) and its logger: metrics.jsonl and wandb, one guard for the process's runs."""
    guard = WandbGuard()
    loggers = []
    for run_dir, seed in zip(dirs, seeds):
        write_run_records(run_dir, config, seed, [d.name for d in dirs] if stacked else None)
        loggers.append(RunLogger(config, run_dir, run_dir.name, resume=bool(config.resume),
                                 seed=seed if stacked else None, guard=guard))
    return loggers


def run_main(parse_config: Callable[[List[str]], Any], train: Callable[[Any], Any], argv: List[str]) -> None:
    """A script's main: bad input (ConfigError, DatasetError) is one line and exit code 2, a fault that stops
    a run (FloatingPointError, RunFault) one line naming the last good checkpoint and exit code 3. On the CPU,
    one torch thread unless OMP_NUM_THREADS says otherwise (default_cpu_threads)."""
    try:
        config = parse_config(argv)
        default_cpu_threads(config.device)
        train(config)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, RunFault) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
