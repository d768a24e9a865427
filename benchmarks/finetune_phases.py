"""Offline and online iterations/s of a finetune run, and where an online iteration's time goes.

    python benchmarks/finetune_phases.py --offline_iterations=2000 --online_iterations=1000 --log_freq=1 \
        --eval_freq=1000 --n_episodes=5
    python benchmarks/finetune_phases.py --profile ... # + cProfile of the online phase (top functions)

Runs algorithms/finetune/cql.py's train() (the docs' example: env data/hopper-v4-medium-replay.hdf5
unless --env is given; other arguments are the script's) with the thread count its main sets, times
each iteration through on_iteration and prints the rate of each phase. Iterations that submit an
evaluation or save a checkpoint are counted apart (their time shows in "held up").
"""
import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.finetune.cql as cql  # noqa: E402
from algorithms.common.process import default_cpu_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="cProfile the online phase")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--env=data/hopper-v4-medium-replay.hdf5", "--wandb_mode=disabled", f"--log_dir={tmp}", *extra]
        config = cql.parse_config(argv)
        default_cpu_threads(config.device)
        stamps = {}
        profiler = cProfile.Profile()

        def on_iteration(step: int, runs, trainer) -> None:
            stamps[step] = time.perf_counter()
            if args.profile and step == config.offline_iterations:
                profiler.enable()

        summary = cql.train(config, on_iteration)
        profiler.disable()
    total = config.offline_iterations + config.online_iterations
    marks = {config.eval_freq * k for k in range(1, total // config.eval_freq + 1)} | {total}
    for name, first, last in [("offline", 0, config.offline_iterations), ("online", config.offline_iterations, total)]:
        steps = [s for s in range(first + 1, last + 1) if s in stamps and s - 1 in stamps]
        seconds = [stamps[s] - stamps[s - 1] for s in steps]
        plain = [t for s, t in zip(steps, seconds) if s not in marks]
        if seconds:
            print(f"{name}: {len(seconds)} iterations in {sum(seconds):.1f} s, {len(seconds) / sum(seconds):.1f} it/s; "
                  f"without the evaluation/end iterations {len(plain) / max(sum(plain), 1e-9):.1f} it/s, "
                  f"{1000 * sum(plain) / max(len(plain), 1):.2f} ms each")
    print(f"whole run: {summary['seconds']:.1f} s (evaluation held training up {summary['eval_seconds']:.1f} s), "
          f"set-up {summary['load_seconds']:.1f} s")
    if args.profile:
        stats = pstats.Stats(profiler)
        online = max(config.online_iterations, 1)
        print("online iteration, by part (cProfile's cumulative time, ms per iteration):")
        for part, (file, function) in PARTS.items():
            cumulative = sum(entry[3] for (path, _, name), entry in stats.stats.items()
                             if path.endswith(file) and name == function)
            print(f"  {part}: {1000 * cumulative / online:.2f}")
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
            print(out.getvalue())


# The parts of an online iteration of train(): (file, function) whose cumulative time is the part's.
PARTS = {"act (actor forward, one action)": ("finetune/cql.py", "act"),
         "step_envs (env step, buffer add)": ("finetune/cql.py", "step_envs"),
         "  of it ReplayBuffer.add": ("finetune/cql.py", "add"),
         "update (sample, losses, backward, Adam)": ("common/fast.py", "__call__"),
         "window_means (metric means, one sync)": ("finetune/cql.py", "window_means"),
         "RunLogger.log (metrics.jsonl row)": ("common/runs.py", "log"),
         "log_evaluations (poll the evaluator)": ("finetune/cql.py", "log_evaluations"),
         "Evaluator.submit (evaluation)": ("common/evaluation.py", "submit")}


if __name__ == "__main__":
    main()
