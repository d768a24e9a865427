"""How long a seed stack's online env steps take: one after another here, or side by side in env workers.

    python benchmarks/env_step.py --env Hopper-v4 --runs 4 --steps 3000

Times finetune's step_envs (each run's env step, its reset at an episode's end, the transitions into
the stack's replay rings) with random actions, for the same runs and seeds both ways (env_workers
false, then true); the workers' start-up is left out. The gain is bounded by the free cores, and a
worker pays a pipe round trip per step: it pays off when an env step costs more than that.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.finetune.cql as cql  # noqa: E402


def time_steps(env_id: str, n_runs: int, steps: int, workers: bool) -> float:
    """Seconds per iteration of step_envs over n_runs runs (seeds 0..n_runs-1)."""
    make_env = cql._make_gym_env(env_id, {}, None, True)
    probe = make_env()
    state_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    if workers:
        runs = [cql.Run(seed, None, worker=cql.EnvWorker(probe.spec)) for seed in range(n_runs)]
        probe.close()
    else:
        runs = [cql.Run(seed, probe if seed == 0 else make_env()) for seed in range(n_runs)]
    for run in runs:  # waits for the workers to start
        run.reset_env(run.seed)
    buffer = cql.ReplayBuffer(steps + 1, state_dim, action_dim, torch.device("cpu"), runs=(n_runs,))
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, n_runs, action_dim)).astype(np.float32)

    def identity(x):
        return np.asarray(x, dtype=np.float32)

    start = time.perf_counter()
    for i in range(steps):
        cql.step_envs(runs, actions[i], buffer, identity, identity, False, None, None, i + 1)
    seconds = (time.perf_counter() - start) / steps
    for run in runs:
        run.close_env()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v4")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    one = time_steps(args.env, 1, args.steps, workers=False)
    sequential = time_steps(args.env, args.runs, args.steps, workers=False)
    side_by_side = time_steps(args.env, args.runs, args.steps, workers=True)
    print(f"{args.env}, {args.runs} runs, {args.steps} steps: one run here {1e6 * one:.0f} us per step; "
          f"{args.runs} runs one after another {1e6 * sequential:.0f} us, side by side in env workers "
          f"{1e6 * side_by_side:.0f} us per iteration: {sequential / side_by_side:.2f}x")


if __name__ == "__main__":
    main()
