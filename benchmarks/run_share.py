"""Where a default offline run's wall time goes: data loading, updates, evaluation.

    python benchmarks/run_share.py --updates 20000

Writes a D4RL-format HalfCheetah-v4 dataset of --transitions random-policy steps (the real
halfcheetah files have 1-2M), then trains with CORL's defaults (batch 256, 10 evaluation
episodes of 1000 steps every 5000 updates) for --updates updates and prints each part's share.
With eval_freq 5000 the share of evaluation is the same for 20k updates as for a 1M run.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.offline.cql as cql  # noqa: E402
from tools.rollouts import random_transitions, write_d4rl_hdf5  # noqa: E402


def write_random_dataset(path: Path, n: int, seed: int = 0) -> None:
    """n random HalfCheetah-v4 transitions (episodes of 1000 steps) as a D4RL-format file."""
    write_d4rl_hdf5(path, random_transitions("HalfCheetah-v4", n, seed, max_episode_steps=1000),
                    {"env_id": "HalfCheetah-v4", "ref_min_score": -280.178953, "ref_max_score": 12135.0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--transitions", type=int, default=200_000)
    parser.add_argument("--device", default="auto")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "halfcheetah-random.hdf5"
        write_random_dataset(path, args.transitions)
        config = cql.parse_config([f"--env={path}", f"--max_timesteps={args.updates}", f"--device={args.device}",
                                   "--wandb_mode=disabled", f"--log_dir={tmp}/runs", *extra])
        summary = cql.train(config)
    total = summary["seconds"] + summary["load_seconds"]
    updates = summary["seconds"] - summary["eval_seconds"]
    print("\n| part | seconds | share |\n|---|---|---|")
    for name, seconds in [("data loading", summary["load_seconds"]), ("updates (+ logging)", updates),
                          ("evaluation", summary["eval_seconds"])]:
        print(f"| {name} | {seconds:.1f} | {100 * seconds / total:.1f}% |")
    print(f"| total | {total:.1f} | {args.updates / updates:.0f} updates/s while training |")


if __name__ == "__main__":
    main()
