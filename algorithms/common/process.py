"""What a script's process needs around its runs: its main (one line and an exit code for bad input, a fault or
a signal), output streams it outlives, SIGINT and SIGTERM that stop a run after its update with a checkpoint,
and a --seeds stack checked against the open-file limit and memory before any run directory exists.
"""
import contextlib
import errno
import fcntl
import functools
import io
import math
import os
import resource
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from algorithms.common.config import ConfigError, DatasetError, RunFault
from algorithms.common.runs import checkpoint_files, resolve_device


class QuietWhenGone:
    """sys.stdout or sys.stderr of a run: once its reader is gone (a pipe's: EPIPE, a terminal's: EIO) or it takes
    no writes (EBADF), its file descriptor is pointed at /dev/null and the run goes on (its results are in files),
    with one warning line on stderr for stdout, instead of a traceback that would stop it."""

    def __init__(self, stream: Any, fd: int):
        self.stream, self.fd = stream, fd

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.gone(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.gone(e)

    def gone(self, error: OSError) -> None:
        if error.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
            raise error
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.fd)  # the stream's unwritten text goes there too
        os.close(null)
        if self.fd == 1:
            print(f"warning: stdout is gone ({error.strerror}); the run goes on, its results go to its run "
                  f"directory", file=sys.stderr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guard_output_streams() -> None:
    """A run outlives its output: a closed stdin, stdout or stderr (`>&-`) is /dev/null (else the next file opened,
    such as the run's .lock, would take its number and get what is printed to it), as is a stdout or stderr open
    for reading only (pyenv's shim leaves its script there for a closed one); and a stdout or stderr whose reader
    goes away (QuietWhenGone) goes on as /dev/null."""
    for fd in (0, 1, 2):
        try:
            access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:  # closed
            access = None
        usable = access is not None and (fd == 0 or access != os.O_RDONLY)
        if not usable:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # os.open's are not: a child process would find it closed
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    if sys.stderr is None:
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    if sys.stdout is sys.__stdout__:  # not a test's captured stream, nor one wrapped already
        sys.stdout = QuietWhenGone(sys.stdout, 1)
    if sys.stderr is sys.__stderr__:
        sys.stderr = QuietWhenGone(sys.stderr, 2)


def default_cpu_threads(device: str) -> None:
    """One torch thread for a run on the CPU, unless OMP_NUM_THREADS sets the count. These networks are small:
    torch's default, a thread per core, mostly spins, against the evaluation envs and other processes too
    (300 updates of the quickstart on a busy 2-core machine: 272 s with 2 threads, 18 s with 1)."""
    if "OMP_NUM_THREADS" not in os.environ and resolve_device(device).type == "cpu":
        torch.set_num_threads(1)


def run_main(parse_config: Callable[[List[str]], Any], train: Callable[[Any], Any], argv: List[str]) -> None:
    """A script's main: bad input (ConfigError, DatasetError) is one line and exit code 2, a fault that stops
    a run (FloatingPointError, RunFault) one line naming the last good checkpoint and exit code 3, a run stopped
    by SIGINT or SIGTERM (Stopped) one line naming its checkpoint and exit code 130 or 143."""
    guard_output_streams()
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
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)


# What a --seeds stack holds open and in memory, checked before any run directory exists: a stack too large for
# the process fails in one line at the start, not with "Too many open files" or an out-of-memory kill mid-run.
FILES_PER_RUN = 2  # its metrics.jsonl and its run directory's .lock
FILES_PER_WORKER = 6  # a background evaluator: its job queue's pipe, its answer pipe, its process (5 measured)
FILES_PER_WANDB_RUN = 4  # a wandb run's files and connection (3 measured, offline mode)
FILES_SPARE = 32  # what comes and goes: checkpoint writes, torch.compile's workers, wandb's service, a dataset file


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_open_files(config: Any, n_runs: int, background: bool) -> None:
    """Raises the soft open-file limit (ulimit -n) to the hard one if the runs need more than it (training envs
    are counted as holding none, as MuJoCo's do); a ConfigError naming 'seeds' if even the hard limit is too low."""
    wandb = (config.wandb_mode or os.environ.get("WANDB_MODE")) != "disabled"
    per_run = FILES_PER_RUN + FILES_PER_WORKER * background + FILES_PER_WANDB_RUN * wandb
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: what the interpreter and torch hold is within the spare
        open_now = 0
    needed = open_now + n_runs * per_run + FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        with contextlib.suppress(ValueError, OSError):  # refused: the message below says what to do
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
            return
    what = (f"field 'seeds': {n_runs} runs need" if config.seeds is not None else "the run needs")
    raise ConfigError(f"{what} about {needed} open files ({per_run} per run: metrics, lock"
                      + (", background evaluator" if background else "") + (", wandb" if wandb else "")
                      + f"; {open_now} open now; {FILES_SPARE} spare), more than the open-file limit: ulimit -n is "
                      f"{soft}, its hard limit {hard}; raise it (ulimit -n {needed})"
                      + (" or run fewer seeds per process" if config.seeds is not None else ""))


def host_memory() -> Optional[Tuple[int, str]]:
    """Bytes a new allocation on the host can get, and where that figure comes from: /proc/meminfo's
    MemAvailable (else os.sysconf's free pages), or a container's cgroup limit less its use when lower; None
    where neither is known."""
    known: List[Tuple[int, str]] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        known += [(int(line.split()[1]) * 1024, "MemAvailable") for line in lines if line.startswith("MemAvailable:")]
    if not known:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            known.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"))
    with contextlib.suppress(OSError, ValueError):  # cgroup v2; its memory.max is "max" when unlimited
        cgroup = Path("/sys/fs/cgroup")
        known.append((int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text()),
                      "the cgroup's memory.max less memory.current"))
    return min(known) if known else None


def available_memory(device: torch.device) -> Optional[Tuple[int, str]]:
    """Bytes free for new tensors on the device, and where that figure comes from; None if unknown. On the host:
    host_memory (MemAvailable, or less if the process's cgroup, a container, allows less)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    return host_memory()


def run_memory(one_run: Any) -> int:
    """Bytes of a run's networks while Adam trains them, from a one-run trainer's nn.Module attributes: each
    trainable parameter four times (weights, gradient, Adam's two moments), a frozen one (a target) once."""
    modules = [m for m in vars(one_run).values() if isinstance(m, torch.nn.Module)]
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in params.values())


def check_stack_resources(config: Any, seeds: Optional[List[int]], device: torch.device,
                          make_one_run: Callable[[], Any], state_dim: int, action_dim: int, ring_rows: int = 0) -> None:
    """Before any run directory: a ConfigError naming 'seeds' (and 'buffer_size' for per-run replay rings of
    ring_rows transitions) for runs that cannot all be held open (check_open_files) or in the device's memory.
    The memory needed is a lower bound (networks and Adam states, replay rings, batches; not the update's
    intermediate tensors): what it refuses never fits. make_one_run: a one-run trainer on the cpu (run_memory),
    made aside from the random streams."""
    n_runs = len(seeds) if seeds is not None else 1
    background = device.type == "cuda" if config.background_eval is None else config.background_eval  # as train()'s
    check_open_files(config, n_runs, background)
    with torch.random.fork_rng(devices=[]):
        parts = {"networks and Adam states": run_memory(make_one_run())}
    row_bytes = 4 * (2 * state_dim + action_dim + 2)  # a float32 transition: obs, action, reward, next obs, terminal
    parts["batches"] = config.batch_size * row_bytes
    if ring_rows:
        parts["replay rings"] = ring_rows * row_bytes
    needed = n_runs * sum(parts.values())
    available = available_memory(device)
    if available is None or needed <= available[0]:
        return
    named = [f"'{name}'" for name, used in (("seeds", seeds is not None), ("buffer_size", ring_rows)) if used]
    subject = f"{'fields' if len(named) > 1 else 'field'} {' and '.join(named)}: " if named else ""
    raise ConfigError(f"{subject}{f'{n_runs} runs need' if n_runs > 1 else 'the run needs'} at least "
                      f"{_size(needed)} of {device.type} memory ("
                      + ", ".join(f"{what} {n_runs} x {_size(used)}" for what, used in parts.items())
                      + (f" ({ring_rows} rows x {row_bytes} B)" if ring_rows else "")
                      + f"), {_size(available[0])} is available ({available[1]}); run fewer seeds per process"
                      + (" or a smaller buffer_size" if ring_rows else ""))


def zero_tensors(shapes: Dict[str, Tuple[int, ...]], device: torch.device, what: str) -> Dict[str, torch.Tensor]:
    """float32 zeros of these shapes, by name; a ConfigError "<what> (<size>) does not fit in <device>'s memory"
    if the allocation fails (check_stack_resources' estimate is a lower bound: the device may still refuse)."""
    try:
        return {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    except RuntimeError as e:  # torch.OutOfMemoryError on cuda, "can't allocate memory" on the cpu
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        size = _size(4 * sum(math.prod(shape) for shape in shapes.values()))
        raise ConfigError(f"{what} ({size}) does not fit in {device}'s memory") from None


class Stopped(BaseException):
    """SIGINT or SIGTERM stopped the run (StopSignals): run_main prints the message, one line (where the run
    stopped, its checkpoint, the --resume command), and exits 128 + the signal's number (130, 143), as a shell
    reports a process the signal killed. A BaseException, as KeyboardInterrupt is: no `except Exception` on the
    way (a checkpoint reader, the wandb guard) takes it for a failure of its own."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster preempting the job) during a train(). During set-up a signal stops
    the run at once; while the training loop runs (steps) it is only recorded: the update in flight ends, its
    checkpoint is written (the loop saves when `caught`, if the run writes checkpoints), and then the run
    stops. A second signal stops at once, whatever is in flight; so does one after the loop (its last
    checkpoint is written by then). Every stop is a Stopped."""

    def __init__(self, config: Any, script: str):
        self.config, self.script = config, script  # script: the file to name in the --resume command
        self.caught: Optional[int] = None  # the signal recorded while the loop runs
        self.phase = "set-up"  # then "loop", then "end"
        self.dirs: List[Path] = []  # the run directories (a stack's, in order)
        self.unit, self.done = "update", 0  # the loop's unit and how many of them are done
        self.previous: Dict[int, Any] = {}

    def install(self) -> None:
        """Takes SIGINT and SIGTERM over; not outside the main thread (where Python delivers no signal)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not the main thread
                return

    def restore(self) -> None:
        """The handlers from before install() (a handler not set from Python, None: the default)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.phase == "loop" and self.caught is None:
            self.caught = signum  # steps() stops after the update in flight and its checkpoint
            return
        where = {"set-up": "during set-up, before training",
                 "loop": f"a second time, during {self.unit} {self.done + 1} or its checkpoint (not waiting for them)",
                 "end": f"after the last {self.unit} ({self.done}), while its last evaluations ran"}[self.phase]
        raise self.stopped(signum, where)

    def steps(self, steps: Iterable[int], dirs: List[Path], unit: str = "update") -> Iterator[int]:
        """The training loop's steps (each the count of `unit`s done before it); after each step's body, a
        signal received while it ran stops the run (Stopped), its checkpoint written by then."""
        self.dirs, self.unit, self.phase = dirs, unit, "loop"
        for step in steps:
            self.done = step
            yield step
            self.done = step + 1
            if self.caught is not None:
                break
        self.phase = "end"
        if self.caught is not None:  # (also one that came as the last step ended)
            raise self.stopped(self.caught, f"after {unit} {self.done}")

    def stopped(self, signum: int, where: str) -> Stopped:
        """The Stopped of `signum`, with the checkpoint a --resume continues from and the command."""
        message = f"stopped by {signal.Signals(signum).name} {where}"
        dirs = self.dirs or ([Path(self.config.resume)] if self.config.resume else [])
        if self.phase == "set-up":  # a resumed run's checkpoints are all there still (its newest in use)
            return Stopped(message + (f"; its checkpoints are kept: {self.resume_command(dirs[0])}"
                                      if dirs else "; no checkpoint written yet, nothing to resume"), signum)
        done = set.intersection(*({int(p.stem.split("_")[1]) for p in checkpoint_files(d)} for d in dirs))
        if not done:  # (a stack's runs resume from a checkpoint of one update that all of them have)
            return Stopped(message + ("; no checkpoint written yet" if self.config.checkpoints_path
                                      else "; no checkpoint (checkpoints_path not set)"), signum)
        checkpoint = (str(dirs[0] / f"checkpoint_{max(done)}.pt") if len(dirs) == 1 else
                      f"checkpoint_{max(done)}.pt of each of its {len(dirs)} runs in {dirs[0].parent}")
        return Stopped(f"{message}; checkpoint: {checkpoint}; {self.resume_command(dirs[0])}", signum)

    def resume_command(self, run_dir: Path) -> str:
        script = os.path.relpath(self.script)
        script = self.script if script.startswith("..") else script
        return f"continue with: python {shlex.quote(script)} --resume {shlex.quote(str(run_dir))}"


def stopping_on_signals(train: Callable[..., Any]) -> Callable[..., Any]:
    """train(config, ...) under a StopSignals of its own (its keyword argument `signals`: the loop runs over
    signals.steps), with the previous handlers back when it returns or raises (a test, a tool may call it
    again)."""

    @functools.wraps(train)
    def stopping_train(config: Any, *args: Any, **kwargs: Any) -> Any:
        signals = StopSignals(config, train.__code__.co_filename)
        signals.install()
        try:
            return train(config, *args, signals=signals, **kwargs)
        finally:
            signals.restore()

    return stopping_train
