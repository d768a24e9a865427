"""Runs every config x seed of a grid on this machine: stacks of runs spread over the GPUs, or a run per process.

    python scripts/run_grid.py --configs configs/offline/cql/hopper/*.yaml --seeds 0 1 2 3 --out runs/hopper \\
        -- --max_timesteps=100000

With --stack (the default on a CUDA machine) configs that can share a process (equal in every field but
algorithms/common/stacks.py MEMBER_FIELDS, datasets of equal state and action dims) form a group, run as one
stack: `--stack_configs=a.yaml,b.yaml --seeds=0,1,2,3 --checkpoints_path=<out>/<group>`. A field a file
leaves out counts as the program's TrainConfig default (read from its source; a default that is no literal
is compared as its text, which at worst keeps two configs apart). Dims come without loading data: an HDF5
file's header, else eval_env's env, else a D4RL locomotion name's Gymnasium env (data.LOCOMOTION_ENVS); a
config of unknown dims is a group of its own. With --gpus G > 1 the groups' configs, in order, are cut into
G runs of nearly equal length, one per GPU (each GPU trains about as many members); each process sees only
its GPU (CUDA_VISIBLE_DEVICES), and the processes of one GPU run one after another.

Re-running a grid on the same --out goes on where it stopped: a group whose runs all hold the checkpoint of
their last update (or of the --max_timesteps given after `--`, which lengthens a finished grid) is
skipped, one with checkpoints resumes (`--resume=<a run dir>`), one without starts afresh (a group's
folder is named by its first config and --gpus' cuts: re-run with the same --gpus).
Resuming needs checkpoints: the scripts write them because --out sets checkpoints_path. A second
grid on an --out in use is refused (exit 2). With --stack no each config x seed runs alone, `--config_path X
--seed S <args after -->`, --jobs at a time, without checkpoints_path. Logs go to <out>/logs/; a tqdm bar
counts finished processes; the summary lists the failed ones (exit 1 if any).
"""
import argparse
import collections
import fcntl
import itertools
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gymnasium as gym
import h5py
import yaml
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `algorithms` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms.common.config import STACK_RECORD  # noqa: E402
from algorithms.common.data import D4RL_DATASETS, LOCOMOTION_ENVS  # noqa: E402
from algorithms.common.help import config_fields  # noqa: E402
from algorithms.common.runs import checkpoint_files, checkpoint_step  # noqa: E402
from algorithms.common.stacks import MEMBER_FIELDS  # noqa: E402

Dims = Optional[Tuple[int, int]]  # a dataset's (state, action) dims; None: unknown


@dataclass
class Job:
    what: str  # the config, or the stack's group name
    seeds: List[int]
    command: List[str]
    log: Path
    gpu: Optional[int] = None  # the process sees only this GPU; None: all
    stack: bool = False


@dataclass
class Outcome:
    job: Job
    returncode: int
    seconds: float


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Options before `--`; everything after it is passed to every run unchanged."""
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="scripts/run_grid.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to every run, e.g. -- --max_timesteps=1000 --device=cpu")
    parser.add_argument("--configs", nargs="+", required=True, help="config YAML files, one run each per seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="seeds (default: 0 1 2 3)")
    parser.add_argument("--jobs", type=int, default=1, help="processes at the same time when no GPU is pinned "
                                                             "(default: 1, sequential)")
    parser.add_argument("--program", default="algorithms/offline/cql.py", help="training script to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the program")
    parser.add_argument("--out", type=Path, default=Path("runs/grid"),
                        help="the grid's folder: a run-directory folder per group, logs/ (default: runs/grid)")
    parser.add_argument("--log_dir", type=Path, default=None, help="where the logs go (default: <out>/logs)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--stack", choices=["auto", "yes", "no"], default="auto",
                        help="run the configs that can share a process as one stack (auto: yes when CUDA is "
                             "available)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs to spread the stacks over (default: all visible; 0: no pinning)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.gpus is not None and args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    twice = sorted({c for c in args.configs if args.configs.count(c) > 1})
    if twice:
        parser.error(f"config file(s) given twice: {', '.join(twice)}")
    if not Path(args.program).is_file():
        parser.error(f"--program {args.program}: file not found")
    args.log_dir = args.log_dir or args.out / "logs"
    return args, extra


def log_name(config: str, seeds: List[int]) -> str:
    """configs/offline/cql/hopper/medium_v2.yaml, [3] -> offline-cql-hopper-medium_v2-seed3.log; [0, 1] ->
    ...-seeds0_1.log"""
    parts = list(Path(config).with_suffix("").parts)
    if parts and parts[0] == "configs":
        parts = parts[1:]
    tail = f"-seed{seeds[0]}" if len(seeds) == 1 else "-seeds" + "_".join(map(str, seeds))
    return "-".join(p for p in parts if p not in ("", ".", "..", "/")) + tail + ".log"


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------ which configs share a process
def program_defaults(program: str) -> Dict[str, Tuple[str, Any]]:
    """The program's TrainConfig fields: name -> (type, default); none for a program without one."""
    try:
        return {name: (kind, default) for name, kind, default, _ in
                config_fields(Path(program).read_text(), "TrainConfig")[1]}
    except (LookupError, SyntaxError):
        return {}


def shared_values(config: Dict[str, Any], defaults: Dict[str, Tuple[str, Any]]) -> Dict[str, Any]:
    """The fields a stack's members share (all but MEMBER_FIELDS), a field the file leaves out at its default."""
    values = {name: default for name, (_, default) in defaults.items()}
    values.update(config)
    for name, (kind, _) in defaults.items():
        if kind in ("float", "[float]") and isinstance(values[name], str):  # YAML reads 1e-5 as a string
            try:
                values[name] = float(values[name])
            except ValueError:
                pass
    return {name: value for name, value in values.items() if name not in MEMBER_FIELDS}


@lru_cache(maxsize=None)
def env_dims(env_id: str, kwargs: Tuple[Tuple[str, Any], ...] = ()) -> Dims:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Hopper-v4 is out of date"
            env = gym.make(env_id, **dict(kwargs))
    except Exception:  # noqa: BLE001 (any env that cannot be made here: unknown dims, the run itself will say why)
        return None
    env.close()
    shapes = [getattr(space, "shape", None) or () for space in (env.observation_space, env.action_space)]
    return None if any(len(shape) != 1 for shape in shapes) else (shapes[0][0], shapes[1][0])  # not a goal Dict


def hdf5_dims(path: str) -> Dims:
    """The observations' and actions' widths in a D4RL-layout file, from its header (no array is read)."""
    try:
        with h5py.File(path, "r") as f:
            observations, actions = f.get("observations"), f.get("actions")
            if all(isinstance(c, h5py.Dataset) and c.ndim == 2 for c in (observations, actions)):
                return observations.shape[1], actions.shape[1]
    except OSError:
        pass
    return None


def config_dims(config: Dict[str, Any]) -> Dims:
    """The dims of the config's dataset: its HDF5 file's, else its eval_env's, else its D4RL locomotion env's."""
    env, eval_env = str(config.get("env") or ""), config.get("eval_env")
    file = config.get("dataset_path") or (env if env.endswith((".hdf5", ".h5")) or Path(env).is_file() else None)
    dims = hdf5_dims(str(file)) if file else None
    if dims is None and eval_env:
        dims = env_dims(str(eval_env))
    task = env.split("-")[0]
    if dims is None and env in D4RL_DATASETS and task in LOCOMOTION_ENVS:
        env_id, kwargs = LOCOMOTION_ENVS[task]
        dims = env_dims(env_id, tuple(sorted(kwargs.items())))
    return dims


def stack_groups(configs: Sequence[Tuple[str, Dict[str, Any], Dims]]) -> List[Tuple[List[str], Dims]]:
    """(file, shared values, dims) of each config -> the groups of files that can share a process, in order of
    their first file; a config of unknown dims is a group of its own."""
    groups: List[Tuple[List[str], Dict[str, Any], Dims]] = []
    for file, shared, dims in configs:
        same = next((g for g in groups if dims is not None and g[2] == dims and g[1] == shared), None)
        if same:
            same[0].append(file)
        else:
            groups.append(([file], shared, dims))
    return [(files, dims) for files, _, dims in groups]


def spread(groups: Sequence[List[str]], gpus: int) -> List[Tuple[Optional[int], List[str]]]:
    """(GPU, configs) of each process. Every config has the grid's seeds, so configs measure the load: with
    gpus > 1 the configs, in order, are cut into `gpus` runs of nearly equal length, each cut again where a
    group ends (a process holds one group's configs); gpus 1: each group on GPU 0; gpus 0: no GPU pinned."""
    if gpus <= 1:
        return [(0 if gpus else None, list(g)) for g in groups]
    flat = [(i, config) for i, group in enumerate(groups) for config in group]
    parts: List[Tuple[Optional[int], List[str]]] = []
    for gpu in range(gpus):
        share = flat[len(flat) * gpu // gpus:len(flat) * (gpu + 1) // gpus]
        parts += [(gpu, [config for _, config in run]) for _, run in itertools.groupby(share, key=lambda x: x[0])]
    return parts


def group_name(program: str, configs: List[str], dims: Dims) -> str:
    """algorithms/offline/cql.py, 12 configs from halfcheetah/medium_v2.yaml, (17, 6) ->
    offline-cql-17x6-halfcheetah-medium_v2-and-11-more"""
    words = list(Path(program).with_suffix("").parts[-2:]) + ([f"{dims[0]}x{dims[1]}"] if dims else [])
    words += Path(configs[0]).with_suffix("").parts[-2:]
    return "-".join(words) + (f"-and-{len(configs) - 1}-more" if len(configs) > 1 else "")


# ------------------------------------------------------------------ what a re-run does with a group's folder
def read_yaml(path: Path) -> Dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):  # the run reports a config it cannot read; a damaged record counts as none
        value = None
    return value if isinstance(value, dict) else {}


def last_update(config: Dict[str, Any]) -> int:
    """The update whose checkpoint ends the run: max_timesteps (offline), offline + online iterations (finetune)."""
    return config.get("max_timesteps", config.get("offline_iterations", 0) + config.get("online_iterations", 0))


LENGTH_FIELDS = ("max_timesteps", "offline_iterations", "online_iterations")


def length_overrides(extra: List[str]) -> Dict[str, int]:
    """The run-length fields the arguments after `--` set (--max_timesteps=N or --max_timesteps N)."""
    found: Dict[str, int] = {}
    for i, token in enumerate(extra):
        key, has_value, value = token.lstrip("-").replace("-", "_").partition("=")
        value = value if has_value else (extra[i + 1] if i + 1 < len(extra) else "")
        if token.startswith("--") and key in LENGTH_FIELDS and value.lstrip("-").isdigit():
            found[key] = int(value)
    return found


def group_state(folder: Path, members: collections.Counter, lengths: Optional[Dict[str, int]] = None
                ) -> Tuple[str, Optional[Path]]:
    """("done", None), ("resume", a run dir with checkpoints) or ("fresh", None) for a group whose run
    directories go to folder; members: its (env, seed) pairs; lengths: run lengths set on the command line (a
    longer one resumes a finished stack). A stack there counts when its run directories' config.yaml files hold
    exactly these pairs (another grid's, e.g. of other seeds, is left alone)."""
    stacks = set()
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (run_dir / "config.yaml").is_file():
            names = read_yaml(run_dir / STACK_RECORD).get("runs") or [run_dir.name]
            stacks.add(tuple(str(name) for name in names))
    best: Tuple[int, Optional[Path]] = (-1, None)
    for names in sorted(stacks):
        dirs = [folder / name for name in names]
        configs = [read_yaml(d / "config.yaml") for d in dirs]
        if collections.Counter((c.get("env"), c.get("seed")) for c in configs) != members:
            continue
        if all((d / f"checkpoint_{last_update({**c, **(lengths or {})})}.pt").is_file()
               for d, c in zip(dirs, configs)):
            return "done", None
        for d in dirs:
            files = checkpoint_files(d)
            if files and checkpoint_step(files[-1]) > best[0]:
                best = (checkpoint_step(files[-1]), d)
    return ("resume", best[1]) if best[1] else ("fresh", None)


def stack_jobs(args: argparse.Namespace, extra: List[str], gpus: int) -> Tuple[List[Job], List[str]]:
    """The stacks' processes and the names of the groups found finished."""
    defaults = program_defaults(args.program)
    read = {config: read_yaml(Path(config)) for config in args.configs}
    groups = stack_groups([(c, shared_values(read[c], defaults), config_dims(read[c])) for c in args.configs])
    dims_of = {config: dims for files, dims in groups for config in files}
    seeds = ",".join(map(str, args.seeds))
    jobs, finished, names = [], [], set()
    for gpu, configs in spread([files for files, _ in groups], gpus):
        name = group_name(args.program, configs, dims_of[configs[0]])
        while name in names:  # two groups whose first configs have one name (in other folders)
            name += "-2"
        names.add(name)
        env = defaults.get("env", (None, None))[1]
        members = collections.Counter((read[c].get("env", env), seed) for c in configs for seed in args.seeds)
        state, run_dir = group_state(args.out / name, members, length_overrides(extra))
        if state == "done":
            finished.append(name)
            continue
        start = [f"--resume={run_dir}"] if run_dir else [
            f"--stack_configs={','.join(configs)}", f"--seeds={seeds}", f"--checkpoints_path={args.out / name}"]
        jobs.append(Job(name, list(args.seeds), [args.python, args.program, *start, *extra],
                        args.log_dir / f"{name}.log", gpu, stack=True))
    return jobs, finished


def make_jobs(args: argparse.Namespace, extra: List[str]) -> Tuple[List[Job], List[str]]:
    stacks = args.stack == "yes" or (args.stack == "auto" and cuda_devices() > 0)
    if stacks:
        return stack_jobs(args, extra, cuda_devices() if args.gpus is None else args.gpus)
    return [Job(config, [seed], [args.python, args.program, "--config_path", config, "--seed", str(seed), *extra],
                args.log_dir / log_name(config, [seed]))
            for config in args.configs for seed in args.seeds], []


# ------------------------------------------------------------------ running
def seeds_text(job: Job) -> str:
    return f"seed {job.seeds[0]}" if len(job.seeds) == 1 else f"seeds {','.join(map(str, job.seeds))}"


def gpu_env(gpu: Optional[int]) -> Dict[str, str]:
    """This process's environment for a process pinned to GPU number gpu of those this process sees."""
    env = dict(os.environ)
    if gpu is not None:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if gpu < len(visible) else str(gpu)
    return env


def shown_command(job: Job) -> str:
    pin = "" if job.gpu is None else f"CUDA_VISIBLE_DEVICES={gpu_env(job.gpu)['CUDA_VISIBLE_DEVICES']} "
    return pin + " ".join(job.command)


def run_job(job: Job) -> Outcome:
    start = time.time()
    with open(job.log, "w") as log:
        log.write("$ " + shown_command(job) + "\n")
        log.flush()
        returncode = subprocess.run(job.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=gpu_env(job.gpu)).returncode
    return Outcome(job, returncode, time.time() - start)


def run_lanes(lanes: List[List[Job]], workers: int, done: Callable[[Outcome], None]) -> None:
    """Runs each lane's jobs one after another, `workers` lanes at a time; done(outcome) after each job."""
    lock = threading.Lock()

    def run_lane(lane: List[Job]) -> None:
        for job in lane:
            outcome = run_job(job)
            with lock:
                done(outcome)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run_lane, lane) for lane in lanes]:
            future.result()


def hold_lock(out: Path) -> Optional[Any]:
    """The open <out>/.grid.lock, locked for this grid; None when another grid holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".grid.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def main(argv: Optional[List[str]] = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    lock = None if args.dry_run else hold_lock(args.out)  # held until this process ends
    if lock is None and not args.dry_run:
        print(f"error: another grid is running in {args.out} (it holds {args.out / '.grid.lock'}); wait for it "
              f"to end or pass another --out", file=sys.stderr)
        return 2
    jobs, finished = make_jobs(args, extra)
    for name in finished:
        print(f"grid: {name} finished (every run has its last checkpoint), skipped")
    if args.dry_run:
        for job in jobs:
            print(shown_command(job))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    outcomes: List[Outcome] = []
    bar = tqdm(total=len(jobs), desc="grid", unit="run", dynamic_ncols=True)

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        bar.set_postfix(failed=sum(o.returncode != 0 for o in outcomes))
        bar.update()
        if outcome.returncode != 0:
            bar.write(f"failed (exit {outcome.returncode}): {outcome.job.what} {seeds_text(outcome.job)}, "
                      f"log {outcome.job.log}")

    pinned = [job.gpu for job in jobs if job.gpu is not None]
    if pinned:  # a lane per GPU: its processes one after another, the GPUs side by side
        run_lanes([[job for job in jobs if job.gpu == gpu] for gpu in sorted(set(pinned))], len(set(pinned)), done)
    else:
        run_lanes([[job] for job in jobs], args.jobs, done)
    bar.close()
    failures = [o for o in outcomes if o.returncode != 0]
    kind = "stack" if finished or any(job.stack for job in jobs) else "run"
    print(f"grid: {len(outcomes)} {kind}{'' if len(outcomes) == 1 else 's'}, {len(outcomes) - len(failures)} ok, "
          f"{len(failures)} failed" + (f", {len(finished)} finished before" if finished else "")
          + f"; logs in {args.log_dir}")
    for o in sorted(failures, key=lambda o: (o.job.what, o.job.seeds)):
        print(f"  failed (exit {o.returncode}, {o.seconds:.0f} s): {o.job.what} {seeds_text(o.job)} -> {o.job.log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
