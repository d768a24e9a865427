"""Runs every config x seed of a grid on this machine, one after another or N at a time.

    python scripts/run_grid.py --configs configs/offline/cql/hopper/*.yaml --seeds 0 1 2 3 --jobs 2 \\
        -- --max_timesteps=100000 --device=cuda

Each run is `<python> <program> --config_path X --seed S <everything after -->`; its stdout and
stderr go to <log_dir>/<config>-seed<S>.log. With --stack (the default on a CUDA machine) each
config's seeds run as one process instead, `--config_path X --seeds S1,S2,...` (one seed stack: the
scripts train the runs together, each still with its own run directory), logged to
<config>-seeds<S1>_<S2>....log: processes sharing one GPU take turns on it, while a stack fills it
(docs/seeds.md). A tqdm bar counts finished processes; the summary at the
end lists the failed ones with their logs, and the exit code is 1 when any failed.
"""
import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from tqdm.auto import tqdm


@dataclass
class Job:
    config: str
    seeds: List[int]  # one seed, or a --seeds stack
    command: List[str]
    log: Path


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
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (default: 1, sequential)")
    parser.add_argument("--program", default="algorithms/offline/cql.py", help="training script to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the program")
    parser.add_argument("--log_dir", type=Path, default=Path("runs/grid_logs"),
                        help="where each run's stdout/stderr log goes (default: runs/grid_logs)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--stack", choices=["auto", "yes", "no"], default="auto",
                        help="run each config's seeds as one --seeds stack (auto: yes when CUDA is available)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    if not Path(args.program).is_file():
        parser.error(f"--program {args.program}: file not found")
    return args, extra


def log_name(config: str, seeds: List[int]) -> str:
    """configs/offline/cql/hopper/medium_v2.yaml, [3] -> offline-cql-hopper-medium_v2-seed3.log; [0, 1] ->
    ...-seeds0_1.log"""
    parts = list(Path(config).with_suffix("").parts)
    if parts and parts[0] == "configs":
        parts = parts[1:]
    tail = f"-seed{seeds[0]}" if len(seeds) == 1 else "-seeds" + "_".join(map(str, seeds))
    return "-".join(p for p in parts if p not in ("", ".", "..", "/")) + tail + ".log"


def use_stacks(choice: str) -> bool:
    if choice != "auto":
        return choice == "yes"
    import torch

    return torch.cuda.is_available()


def make_jobs(args: argparse.Namespace, extra: List[str]) -> List[Job]:
    if use_stacks(args.stack) and len(args.seeds) > 1:
        seeds = ",".join(map(str, args.seeds))
        return [Job(config, list(args.seeds), [args.python, args.program, "--config_path", config, "--seeds", seeds,
                                               *extra], args.log_dir / log_name(config, args.seeds))
                for config in args.configs]
    return [Job(config, [seed], [args.python, args.program, "--config_path", config, "--seed", str(seed), *extra],
                args.log_dir / log_name(config, [seed]))
            for config in args.configs for seed in args.seeds]


def seeds_text(job: Job) -> str:
    return f"seed {job.seeds[0]}" if len(job.seeds) == 1 else f"seeds {','.join(map(str, job.seeds))}"


def run_job(job: Job) -> Outcome:
    start = time.time()
    with open(job.log, "w") as log:
        log.write("$ " + " ".join(job.command) + "\n")
        log.flush()
        returncode = subprocess.run(job.command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL).returncode
    return Outcome(job, returncode, time.time() - start)


def main(argv: Optional[List[str]] = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    jobs = make_jobs(args, extra)
    if args.dry_run:
        for job in jobs:
            print(" ".join(job.command))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    outcomes: List[Outcome] = []
    bar = tqdm(total=len(jobs), desc="grid", unit="run", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            failed = sum(o.returncode != 0 for o in outcomes)
            bar.set_postfix(failed=failed)
            bar.update()
            if outcome.returncode != 0:
                bar.write(f"failed (exit {outcome.returncode}): {outcome.job.config} {seeds_text(outcome.job)}, "
                          f"log {outcome.job.log}")
    bar.close()
    failures = [o for o in outcomes if o.returncode != 0]
    stacks = any(len(o.job.seeds) > 1 for o in outcomes)
    kind = ("seed stack" if stacks else "run") + ("" if len(outcomes) == 1 else "s")
    print(f"grid: {len(outcomes)} {kind}, {len(outcomes) - len(failures)} ok, "
          f"{len(failures)} failed; logs in {args.log_dir}")
    for o in sorted(failures, key=lambda o: (o.job.config, o.job.seeds)):
        print(f"  failed (exit {o.returncode}, {o.seconds:.0f} s): {o.job.config} {seeds_text(o.job)} -> {o.job.log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
