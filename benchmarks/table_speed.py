"""How long CORL's whole offline CQL locomotion table would take on this GPU, projected from two measured stacks.

    python benchmarks/table_speed.py -- --tf32=true
    python benchmarks/table_speed.py --updates 50000 --groups hopper --work_dir /tmp/table -- --tf32=true
    python benchmarks/table_speed.py --dry_run

The table: 18 D4RL datasets (halfcheetah, hopper, walker2d x random, medium, medium-replay, medium-expert,
expert, full-replay) x 4 seeds x 1M updates = 72M seed-updates, trained as two stacks (one process each,
one batched update for all members): halfcheetah + walker2d (12 configs x 4 seeds = 48 members, state 17,
action 6) and hopper (6 x 4 = 24, state 11, action 3). Each dataset is a small D4RL-format file of
--transitions random-action steps of its real env (the real files have 0.1-2M), its config CORL's file with
dataset_path pointing at it; the env keeps its D4RL name, so evaluation runs the real Gymnasium env with
CORL's cadence (10 episodes of up to 1000 steps every 5000 updates) and D4RL's reference scores.

Each stack runs `algorithms/offline/cql.py --stack_configs=...` for --updates updates (arguments after `--`
go to every stack). Its `done:` line gives the sustained rate, evaluation included: one 1M-update stack then
takes 1M / (updates/s). A short run over-weights the evaluation waited for at its end (one of 2 rounds at
10k updates, of 200 in a 1M run); --updates 50000 gives a firmer figure. Set-up (compile, data loading:
more with the real files) is left out. The 4- and 8-GPU figures assume each GPU sustains this one's rate.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from algorithms.common.config import ConfigError, run_seeds  # noqa: E402
from algorithms.common.data import LOCOMOTION_ENVS  # noqa: E402
from scripts.run_grid import env_dims  # noqa: E402
from tools.rollouts import random_transitions, write_d4rl_hdf5  # noqa: E402

KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
GROUPS = {"cheetah-walker": ("halfcheetah", "walker2d"), "hopper": ("hopper",)}  # one stack each
TABLE_SEEDS, TABLE_UPDATES = 4, 1_000_000
DONE_LINE = re.compile(r"^done: (\d+) updates(?: \([^)]*\))? in ([\d.]+) s \(evaluation held training up ([\d.]+) s, "
                       r"([\d.]+)% of the run; set-up ([\d.]+) s\)", re.MULTILINE)


def dataset_name(task: str, kind: str) -> str:
    return f"{task}-{kind}-v2"


def corl_config(task: str, kind: str) -> Path:
    return ROOT / "configs" / "offline" / "cql" / task / f"{kind.replace('-', '_')}_v2.yaml"


def write_dataset(path: Path, task: str, transitions: int, seed: int) -> Path:
    """transitions random-action steps of task's env (episodes of up to 1000 steps) as a D4RL-format file."""
    env_id = LOCOMOTION_ENVS[task][0]
    return write_d4rl_hdf5(path, random_transitions(env_id, transitions, seed, max_episode_steps=1000),
                           {"env_id": env_id})


def write_config(path: Path, source: Path, dataset_path: Path) -> Path:
    """source's fields (a CORL config) with dataset_path set: the D4RL env name, its eval env and scores stay."""
    fields = yaml.safe_load(source.read_text())
    fields["dataset_path"] = str(dataset_path)
    path.write_text(f"# {source.relative_to(ROOT)} on synthetic data (benchmarks/table_speed.py)\n"
                    + yaml.safe_dump(fields, sort_keys=False))
    return path


def prepare_group(group: str, work: Path, transitions: int, write: bool = True) -> List[Path]:
    """The group's config files (and, with write, its datasets) under work; returns the config paths."""
    configs = []
    for task in GROUPS[group]:
        for kind in KINDS:
            name = dataset_name(task, kind)
            data, config = work / "data" / f"{name}.hdf5", work / "configs" / f"{name}.yaml"
            if write:
                data.parent.mkdir(parents=True, exist_ok=True)
                config.parent.mkdir(parents=True, exist_ok=True)
                write_dataset(data, task, transitions, seed=len(configs))
                write_config(config, corl_config(task, kind), data)
            configs.append(config)
    return configs


def stack_command(python: str, configs: List[Path], seeds: str, updates: int, work: Path, extra: List[str]) -> list:
    return [python, str(ROOT / "algorithms" / "offline" / "cql.py"), f"--stack_configs={','.join(map(str, configs))}",
            f"--seeds={seeds}", f"--max_timesteps={updates}", "--eval_freq=5000", "--n_episodes=10",
            "--log_freq=1000", "--wandb_mode=disabled", f"--log_dir={work / 'runs'}", *extra]


def parse_done_line(output: str) -> Optional[Dict[str, float]]:
    """The last `done:` line's figures (updates, seconds, eval_seconds, eval_share %, load_seconds); None if none."""
    found = DONE_LINE.findall(output)
    if not found:
        return None
    updates, seconds, eval_seconds, eval_share, load_seconds = found[-1]
    return {"updates": int(updates), "seconds": float(seconds), "eval_seconds": float(eval_seconds),
            "eval_share": float(eval_share), "load_seconds": float(load_seconds)}


def seed_updates_per_second(done: Dict[str, float], members: int) -> float:
    """Sustained: every member's updates over the run's wall time, evaluation included."""
    return done["updates"] * members / done["seconds"]


def table_seconds(n_configs: int, rate: float) -> float:
    """A group's share of the table (n_configs datasets x 4 seeds x 1M updates) at rate seed-updates/s."""
    return n_configs * TABLE_SEEDS * TABLE_UPDATES / rate


def run_stack(command: list) -> str:
    """Runs a stack, its stdout echoed as it comes (stderr, tqdm's, straight to ours); returns the stdout."""
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if process.returncode != 0:
        print(f"error: the stack exited with {process.returncode} (its output above)", file=sys.stderr)
        sys.exit(process.returncode if process.returncode > 0 else 1)
    return "".join(lines)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=10_000, help="updates of each stack")
    parser.add_argument("--transitions", type=int, default=20_000, help="random-action steps in each dataset")
    parser.add_argument("--seeds", default="0,1,2,3", help="each stack's --seeds")
    parser.add_argument("--groups", choices=("all", *GROUPS), default="all", help="the stacks to run")
    parser.add_argument("--work_dir", help="datasets, configs and runs go here; default: a temp dir, removed")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the stacks")
    parser.add_argument("--dry_run", action="store_true", help="print the data and the commands, run nothing")
    args = parser.parse_args(own)
    if args.updates < 1 or args.transitions < 2:
        parser.error(f"--updates must be >= 1 and --transitions >= 2, got {args.updates} and {args.transitions}")
    try:
        n_seeds = len(run_seeds(SimpleNamespace(seeds=args.seeds, seed=0)))
    except ConfigError as e:
        parser.error(f"--seeds: {e}")
    groups = list(GROUPS) if args.groups == "all" else [args.groups]
    with tempfile.TemporaryDirectory(prefix="table_speed-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        measured = {}
        for group in groups:
            configs = prepare_group(group, work, args.transitions, write=not args.dry_run)
            command = stack_command(args.python, configs, args.seeds, args.updates, work, extra)
            if args.dry_run:
                for task in GROUPS[group]:
                    env_id, kwargs = LOCOMOTION_ENVS[task]
                    state_dim, action_dim = env_dims(env_id, tuple(kwargs.items()))
                    print(f"data: {len(KINDS)} files {work}/data/{task}-<kind>-v2.hdf5, {args.transitions} "
                          f"random-action steps of {env_id} each (state {state_dim}, action {action_dim})")
                print(f"{group} ({len(configs)} configs x {n_seeds} seeds): {shlex.join(command)}")
                continue
            print(f"{group}: {len(configs)} configs x {n_seeds} seeds = {len(configs) * n_seeds} members", flush=True)
            done = parse_done_line(run_stack(command))
            if done is None:
                sys.exit(f"error: stack {group} printed no `done:` line")
            measured[group] = (len(configs), len(configs) * n_seeds, done)
    for group, (_, members, done) in measured.items():
        rate = seed_updates_per_second(done, members)
        print(f"{group}: {members} members, {done['updates']} updates in {done['seconds']:.0f} s: {rate:.0f} "
              f"seed-updates/s sustained ({done['updates'] / done['seconds']:.1f} updates/s, evaluation included); "
              f"evaluation held training up {done['eval_seconds']:.1f} s ({done['eval_share']:.1f}% of the run); "
              f"set-up {done['load_seconds']:.0f} s")
    if measured:
        parts = {g: table_seconds(n, seed_updates_per_second(d, m)) for g, (n, m, d) in measured.items()}
        total, share = sum(parts.values()), sum(n for n, _, _ in measured.values())
        what = "the whole table" if share == 18 else f"{share} of the table's 18 datasets only"
        print(f"projection, {what} ({share * TABLE_SEEDS} runs of 1M updates, each stack's 1M updates at its "
              f"measured rate): {' + '.join(f'{g} {hours(s)}' for g, s in parts.items())} = {hours(total)} on this "
              f"GPU; 4 GPUs {hours(total / 4)}, 8 GPUs {hours(total / 8)} if each sustains this GPU's rate "
              f"(projected, not measured; set-up left out)")


if __name__ == "__main__":
    main()
