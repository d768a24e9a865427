"""What makes a run durable: its directory (created, locked against a second process, its config recorded),
files written atomically, checkpoint files and which of them --resume continues from, the random streams,
and the metrics logger (metrics.jsonl, and wandb behind a guard that never stops training).

A write that fails stops the run with a WriteError (a RunFault: exit code 3) naming the file and the last
good checkpoint; a run directory that cannot be made or locked is a ConfigError naming the field it comes from,
and so is one where a file the run writes is a symbolic link or no regular file (a directory, a FIFO): a run never
writes through a link. The run directory itself may be a link.
"""
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import math
import os
import random
import re
import shlex
import stat
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from algorithms.common.config import STACK_RECORD, ConfigError, RunFault, StackRecord, run_config
from algorithms.common.state_files import (
    DIGEST_KEY,
    FORMAT_KEY,
    STATE_FORMAT,
    UntrustedFileError,
    content_digest,
    load_state_file,
    to_plain,
)


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


def write_run_records(run_dir: Path, config: Any, seed: int, stack: Optional[List[str]] = None,
                      own_config: Any = None) -> None:
    """A run's config.yaml (its own config, run_config) and, for a run of a stack (stack: its run directory
    names), stack.yaml (StackRecord) first: a run directory with the new config.yaml always has its record.
    A directory that takes no file (a read-only file system, a full disk) is a ConfigError naming the field it
    comes from: nothing has run yet."""
    own = asdict(own_config or run_config(config, seed))
    try:
        if stack is not None:
            record = {k: v for k, v in asdict(StackRecord(config.seeds, config.seed, stack, getattr(
                config, "stack_configs", None))).items() if k != "stack_configs" or v}  # seed stacks: as before
            write_atomic(run_dir / STACK_RECORD, lambda f: yaml.safe_dump(record, f, sort_keys=False), mode="w")
        write_atomic(run_dir / "config.yaml", lambda f: yaml.safe_dump(own, f, sort_keys=False), mode="w")
    except WriteError as e:
        raise ConfigError(f"field '{run_dir_field(config)}': cannot write {e.path} ({e.reason})") from None


RUN_FILES = (".lock", "metrics.jsonl", "config.yaml", STACK_RECORD)  # a run directory's files, with its *.pt files
NO_ODD_FILES = "a run writes its files neither through a link nor into another kind of file: move it away"


def odd_file(path: Path) -> Optional[str]:
    """What `path` is if it is neither a regular file nor absent ('a symbolic link to x', 'a directory', ...)."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except OSError:
        return None
    if kind == stat.S_IFLNK:
        with contextlib.suppress(OSError):
            return f"a symbolic link to {os.readlink(path)}"
        return "a symbolic link"
    names = {stat.S_IFREG: None, stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
    return names.get(kind, "a device file")


def odd_file_error(path: Path, field: str, kind: str) -> ConfigError:
    return ConfigError(f"field '{field}': {path} is {kind}; {NO_ODD_FILES}")


def odd_write_error(path: Path, kind: str) -> WriteError:
    reason = f"it is {kind}; {NO_ODD_FILES}"
    return WriteError(f"cannot write {path} ({reason}){last_checkpoint_note(path.parent)}", path, reason)


def open_run_file(path: Any, flags: int) -> int:
    """os.open for open()'s opener: never through a symbolic link (O_NOFOLLOW: ELOOP) and never a file of another
    kind (EINVAL; a FIFO would block a read: O_NONBLOCK); open()'s usual 0o666 for a new file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def new_file_mode(path: Path) -> int:
    """The mode a rewritten `path` gets: the replaced file's, or for a new one open()'s 0o666 less the umask
    (read from /proc: os.umask would set it, for every thread, meanwhile)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.lstat(path).st_mode)
    umask = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        umask = next(int(line.split()[1], 8) for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("Umask:"))
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes through a temporary file in the same folder and renames: a reader sees old or new, and the new file
    has the old one's mode (a new one 0o666 less the umask). A write that fails (any OSError: a full disk as much as
    a failing one) removes the temporary file: a WriteError. So is a path that is a symbolic link, or no regular
    file: the rename would replace the link, not write the file it names, and a run says so."""
    if kind := odd_file(path):
        raise odd_write_error(path, kind)
    file_mode = new_file_mode(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    with contextlib.suppress(OSError):  # mkstemp makes 0600; a file system without modes keeps its own
        os.chmod(tmp, file_mode)
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
        fd = open_run_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if kind := odd_file(path):
            raise odd_file_error(path, field, kind) from None
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
        refuse_odd_run_files(run_dir, field)
        return
    try:
        refuse_odd_run_files(run_dir, field)
    except ConfigError:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # the pid only makes the message above more helpful
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _RUN_DIR_LOCKS[run_dir] = fd


def refuse_odd_run_files(run_dir: Path, field: str) -> None:
    """A ConfigError naming the field if a file the run writes (RUN_FILES, checkpoint and replay *.pt) is a link or
    no regular file: found before anything in the directory changes, not when the run gets to write it."""
    for path in sorted(run_dir.iterdir()):
        if (path.name in RUN_FILES or path.suffix == ".pt") and (kind := odd_file(path)):
            raise odd_file_error(path, field, kind)


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
    warning line and ends wandb for every run of the process; metrics.jsonl goes on with every row. Offline,
    wandb itself prints nothing: when the last run closes, one line names the runs' data and how to upload it."""

    def __init__(self) -> None:
        self.failed = False
        self.open_runs = 0
        self.offline_dirs: List[Path] = []  # each offline run's wandb/offline-run-<time>-<id>, as wandb made it

    def closed(self) -> None:
        """A run's wandb has finished; after the last, the one line for the offline runs (none once wandb failed)."""
        self.open_runs -= 1
        if self.open_runs or self.failed or not self.offline_dirs:
            return
        # a resumed run made a directory per process that ran it: `wandb sync` uploads them in order, as one run
        dirs = sorted({str(d) for run in self.offline_dirs
                       for d in [run, *run.parent.glob(f"offline-run-*-{run.name.rsplit('-', 1)[-1]}")]})
        runs, root = len(self.offline_dirs), os.path.commonpath(dirs)
        where = (f"in {dirs[0]}" if len(dirs) == 1 else f"under {root}" if len(dirs) == runs else
                 f"in {len(dirs)} directories under {root}")
        print(f"wandb: {'offline run' if runs == 1 else f'{runs} offline runs'} {where}; upload "
              f"{'it' if runs == 1 else 'them'} with: wandb sync {' '.join(map(shlex.quote, dirs))}")

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


def strict_json(value: Any) -> Any:
    """value with each non-finite float as the string "NaN", "Infinity" or "-Infinity": strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class RunLogger:
    """Every logged row goes to <run_dir>/metrics.jsonl and, unless disabled, to wandb. metrics.jsonl is strict
    JSON, a row per line: a non-finite value is the string "NaN", "Infinity" or "-Infinity" (wandb gets the float).
    A metrics.jsonl that is a link or no regular file is a ConfigError naming the field."""

    def __init__(self, config: Any, run_dir: Path, run_name: str, resume: bool = False,
                 seed: Optional[int] = None, guard: Optional[WandbGuard] = None):
        self.path = run_dir / "metrics.jsonl"
        try:
            try:  # counted in bytes: a tail that is not UTF-8 (a disk's garbage) is a line like another
                with open(self.path, "rb", opener=open_run_file) as f:
                    self.rows = sum(1 for _ in f)  # a checkpoint records the count
            except FileNotFoundError:
                self.rows = 0
            self.file = open(self.path, "a", opener=open_run_file)
        except OSError as e:
            field = run_dir_field(config)
            if kind := odd_file(self.path):
                raise odd_file_error(self.path, field, kind) from None
            raise ConfigError(f"field '{field}': cannot open {self.path} ({e.strerror})") from None
        # wandb's own WANDB_MODE counts when the config leaves the mode open (e.g. WANDB_MODE=disabled)
        env_mode = os.environ.get("WANDB_MODE")
        mode = config.wandb_mode or (env_mode if env_mode in ("online", "offline", "disabled") else None) or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = None
        self.guard = guard or WandbGuard()  # one for the runs of a stack: one warning, one timeout at most
        if mode != "disabled":
            if mode == "offline":  # nothing to the network: wandb (0.31) would still send its usage metrics to the
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # server (and wait 10 s for it at exit)
            import wandb  # imported only when used

            stacked = seed is not None  # one of several runs of this process: each its own wandb run

            def start() -> Any:
                run = wandb.init(project=config.project, group=config.group, name=run_name, mode=mode,
                                 config={**asdict(config), **({"seed": seed} if stacked else {})},
                                 dir=str(run_dir), id=run_name.rsplit("-", 1)[-1],
                                 resume="allow" if resume else None,  # a resumed run goes on in the same run
                                 # offline: silent (its ~34 lines a run), the guard prints one line for all runs;
                                 # online: only the run's links. Colours only on a terminal (click strips them)
                                 settings={"silent": mode == "offline", "quiet": True},
                                 **({"reinit": "create_new"} if stacked else {}))
                # x-axis "update" instead of wandb's own step: evaluations may arrive after later rows
                run.define_metric("update")
                run.define_metric("*", step_metric="update")
                if mode == "offline":
                    self.guard.offline_dirs.append(Path(run.dir).parent)  # run.dir is <that directory>/files
                return run

            self.wandb = self.guard.call("init", start)
            self.guard.open_runs += self.wandb is not None

    def log(self, row: Dict[str, float], step: int) -> None:
        try:
            self.file.write(json.dumps({"step": step, **strict_json(row)}, allow_nan=False) + "\n")
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
            self.guard.closed()


CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pt")


def checkpoint_files(run_dir: Path) -> List[Path]:
    """The run's checkpoint files, oldest first; another file whose name starts so (checkpoint_best.pt) is not one."""
    files = [p for p in run_dir.glob("checkpoint_*.pt") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(files, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def write_state_file(path: Path, state: Dict[str, Any]) -> None:
    """Writes a checkpoint or replay file atomically: state made plain (to_plain), its format and the digest
    of its contents beside it."""
    plain = to_plain(state)
    write_atomic(path, lambda f: torch.save({FORMAT_KEY: STATE_FORMAT, DIGEST_KEY: content_digest(plain), **plain}, f))


def read_checkpoint(path: str, map_location: Any, field: str) -> Dict[str, Any]:
    """A checkpoint file's contents; a ConfigError naming the field for a missing, unreadable, damaged or
    untrusted file."""
    if str(path) in _VERIFIED:  # resume_checkpoints read it already
        return _VERIFIED.pop(str(path))
    if not Path(path).is_file():
        raise ConfigError(f"field '{field}': checkpoint file {path} not found")
    try:
        return load_state_file(path, map_location)
    except UntrustedFileError as e:
        raise ConfigError(f"field '{field}': {e}") from None
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


_VERIFIED: Dict[str, Any] = {}  # checkpoints resume_checkpoints read, for read_checkpoint
Usable = Callable[[Path, Dict[str, Any]], Optional[str]]  # why a checkpoint cannot be resumed from, or None


def verified_checkpoint(path: Path, usable: Usable) -> Optional[str]:
    """Why checkpoint `path` cannot be resumed from (unreadable, damaged, no run state, not usable), or None:
    then its contents wait in _VERIFIED for read_checkpoint."""
    try:
        state = load_state_file(path)
    except ValueError as e:
        return str(e)
    if not isinstance(state.get("run"), dict) or state["run"].get("rng") is None:
        return "it holds no run state (made for load_model, or before --resume existed)"
    reason = usable(path, state)
    if reason is None:
        _VERIFIED[str(path)] = state
    return reason


def resume_checkpoints(run_dir: Path, n_runs: int, unit: str = "update", usable: Usable = lambda path, state: None
                       ) -> Tuple[List[Path], Set[Path]]:
    """The newest good checkpoint of a stopped run, or for a stack of runs (run_dir: any of its run
    directories) of each of its runs: the newest `unit` (update, iteration) of which every run has a good one;
    and the checkpoints passed over as bad. A checkpoint that is damaged, unreadable or not usable(path, state)
    is named in a warning line and an older one is used; none good is a ConfigError."""
    files = checkpoint_files(run_dir)
    if not files:
        raise ConfigError(f"field 'resume': {run_dir} has no checkpoint to continue from (a run writes checkpoints "
                          f"when checkpoints_path is set: every checkpoint_freq updates, by default each evaluation)")
    bad: Dict[Path, str] = {}
    dirs: Optional[List[Path]] = None
    for file in reversed(files):  # the stack's members, from the newest good checkpoint that names them
        reason = verified_checkpoint(file, usable)
        if reason is None:
            names = _VERIFIED[str(file)]["run"].get("stack")
            dirs = [run_dir.parent / name for name in names] if names else [run_dir]
            break
        bad[file] = reason
    if dirs is not None and len(dirs) != n_runs:
        raise ConfigError(f"field 'resume': {file} is a checkpoint of {len(dirs)} run(s), "
                          f"the config's seeds name {n_runs}")
    chosen: Optional[List[Path]] = None
    steps = set.intersection(*({checkpoint_step(p) for p in checkpoint_files(d)} for d in dirs)) if dirs else set()
    for step in sorted(steps, reverse=True):
        candidates = [d / f"checkpoint_{step}.pt" for d in dirs]
        for candidate in candidates:
            if str(candidate) not in _VERIFIED and candidate not in bad:
                reason = verified_checkpoint(candidate, usable)
                if reason is not None:
                    bad[candidate] = reason
        if not any(candidate in bad for candidate in candidates):
            chosen = candidates
            break
    if chosen is None:
        newest, reason = next(iter(bad.items()))
        raise ConfigError(f"field 'resume': no good checkpoint to continue from in {run_dir}: {newest}: {reason}"
                          + (f" (and {len(bad) - 1} older checkpoint(s) fail too)" if len(bad) > 1 else ""))
    for path, reason in bad.items():
        print(f"warning: checkpoint {path} is passed over ({reason}; renamed {path.name}.skipped); resuming "
              f"from {chosen[0].name}", file=sys.stderr)
    for stale in set(_VERIFIED) - {str(c) for c in chosen}:
        del _VERIFIED[stale]
    return chosen, set(bad)


def prune_checkpoints(run_dir: Path, replay: Path, keep: int) -> None:
    """Removes the replay files but `replay` and, with keep > 0, all but the newest keep checkpoints."""
    for old in run_dir.glob("replay_*.pt"):
        if old != replay:
            old.unlink()
    for old in checkpoint_files(run_dir)[:-keep] if keep else []:
        old.unlink()


def replay_missing(path: Path, state: Dict[str, Any]) -> Optional[str]:
    """Why checkpoint `path` cannot be resumed from for want of its replay file (online rows), or None."""
    online = (state.get("progress") or {}).get("online_transitions", 0)
    if online and not (path.parent / state["replay_file"]).is_file():
        return f"its replay file {state['replay_file']} is gone: a run keeps only its newest checkpoint's"
    return None


def pending_evaluations(state: Dict[str, Any]) -> Dict[int, Dict[str, torch.Tensor]]:
    """The actor weights of a checkpoint's unfinished evaluations, by step: in its run state, or, in
    checkpoints written before 2026-12, at the top level."""
    run_state = state.get("run") or {}
    return run_state.get("pending_evaluations", state.get("pending_evaluations", {}))


def keep_lines(path: Path, n: int) -> None:
    """Keeps the first n lines of a file (atomically), as bytes: a torn last line goes too, and one that is not
    UTF-8 (a disk's garbage) as well. A link or no regular file is a WriteError (write_atomic)."""
    try:
        with open(path, "rb", opener=open_run_file) as f:
            lines = list(itertools.islice(f, n))
    except FileNotFoundError:
        lines = []
    except OSError as e:
        kind = odd_file(path)
        raise (odd_write_error(path, kind) if kind else write_error(path, e)) from None
    write_atomic(path, lambda f: f.writelines(lines))


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


def open_run_dirs(config: Any, seeds: List[int], labels: List[str], unit: str = "update",
                  usable: Usable = lambda path, state: None) -> Tuple[List[Path], List[Path]]:
    """Each run's run directory (labels: each run's dataset label), locked before anything in it
    changes (a second process stops here), and with config.resume the checkpoints to continue from: the stopped
    stack's directories and their newest checkpoint of one `unit` that all have, temporary files of writes a kill
    interrupted removed. Else new directories <name>-<label>-<seed>-<id> under checkpoints_path (or log_dir), and
    no checkpoints."""
    files: List[Path] = []
    bad: Set[Path] = set()
    if config.resume:
        if Path(config.resume).is_dir():  # a link or FIFO among the checkpoints: one line, before any is judged
            refuse_odd_run_files(Path(config.resume), "resume")
        files, bad = resume_checkpoints(Path(config.resume), len(seeds), unit, usable)
        dirs = [file.parent for file in files]
    else:
        root = Path(config.checkpoints_path or config.log_dir)
        dirs = [root / f"{config.name}-{label}-{seed}-{uuid.uuid4().hex[:8]}" for label, seed in zip(labels, seeds)]
    for run_dir in dirs:
        make_run_dir(run_dir, config)
        lock_run_dir(run_dir, config)
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink()
        for newer in checkpoint_files(run_dir) if files else []:
            if newer in bad:  # kept for a look, out of the way of --resume and last_checkpoint_note
                newer.rename(newer.with_name(newer.name + ".skipped"))
            elif checkpoint_step(newer) > checkpoint_step(files[0]):  # a kill came before every run of a
                newer.unlink()  # stack had this step's: the step is trained again
    return dirs, files


def start_run_logs(config: Any, dirs: List[Path], seeds: List[int], stacked: bool,
                   members: Optional[List[Any]] = None) -> List[RunLogger]:
    """Each run's config.yaml (and, for a stack, its record: --resume of any of its directories resumes the whole
    stack) and its logger: metrics.jsonl and wandb, one guard for the process's runs. members: each run's own
    config (default: config with the run's seed)."""
    guard = WandbGuard()
    loggers = []
    for i, (run_dir, seed) in enumerate(zip(dirs, seeds)):
        own = members[i] if members else run_config(config, seed)
        write_run_records(run_dir, config, seed, [d.name for d in dirs] if stacked else None, own)
        loggers.append(RunLogger(own if members else config, run_dir, run_dir.name, resume=bool(config.resume),
                                 seed=seed if stacked else None, guard=guard))
    return loggers


# What a resume may change (how long, how often it logs, evaluates and saves, where it runs and reports); any
# other field changes what the run computes and must stay as its checkpoint recorded it.
RESUME_MAY_CHANGE = ("max_timesteps", "online_iterations", "eval_freq", "log_freq", "checkpoint_freq",
                     "keep_checkpoints", "device", "compile", "cudagraphs", "background_eval", "env_errors_in_a_row",
                     "project", "group", "name", "wandb_mode", "checkpoints_path", "log_dir", "dataset_path",
                     "minari_download", "load_model", "resume")
RESUMES = "resumes.jsonl"  # in each run directory: a row per resume, with the fields it changed


def check_resume(config: Any, dirs: List[Path], seeds: List[int], states: List[Dict[str, Any]], step: int,
                 members: Optional[List[Any]] = None) -> None:
    """Compares each run's config on resume with the one its checkpoint recorded: a field outside
    RESUME_MAY_CHANGE that differs is a ConfigError naming each such field; else the resume and what it changed
    (old and new values) is appended to the run's resumes.jsonl, before config.yaml takes the new values."""
    changes = []
    for i, (run_dir, seed, state) in enumerate(zip(dirs, seeds, states)):
        saved, now = state.get("config") or {}, asdict(members[i] if members else run_config(config, seed))
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        fixed = [f"'{k}' ({old!r} -> {new!r})" for k, (old, new) in changed.items() if k not in RESUME_MAY_CHANGE]
        if fixed:
            raise ConfigError(f"field{'s' if len(fixed) > 1 else ''} {', '.join(fixed)}: --resume of {run_dir} "
                              f"would change what the run computes (its checkpoint has the first values); a resume "
                              f"may change only {', '.join(RESUME_MAY_CHANGE[:-1])}")
        changes.append({k: {"from": old, "to": new} for k, (old, new) in changed.items()})
    for run_dir, changed in zip(dirs, changes):
        row = json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": changed}) + "\n"
        text = ((run_dir / RESUMES).read_bytes() if (run_dir / RESUMES).is_file() else b"") + row.encode()
        write_atomic(run_dir / RESUMES, lambda f, text=text: f.write(text))
