"""How long an evaluation (n_episodes side by side) holds up training, here or in the background.

    python benchmarks/eval_speed.py --env HalfCheetah-v4 --episodes 10

Foreground: cql.evaluate in the training process (the time it takes is the time training
stops). Background: cql.Evaluator's worker process; training is held only while the actor's
weights are copied out, and the evaluation's own duration is reported beside it. An untrained
actor: HalfCheetah's episodes always last 1000 steps.
"""
import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.offline.cql as cql  # noqa: E402
from algorithms.common.evaluation import Evaluator, actor_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v4")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = gym.make(args.env)
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = cql.TanhGaussianActor(state_dim, action_dim, 1.0)
    if torch.cuda.is_available():
        actor = actor.cuda()  # as in training: evaluate copies it to the CPU
    mean, std = np.zeros(state_dim), np.ones(state_dim)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env)] * args.episodes)
    cql.evaluate(envs, actor, 0, mean, std)  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        cql.evaluate(envs, actor, 0, mean, std)
    foreground = (time.perf_counter() - start) / args.repeats
    envs.close()

    evaluator = Evaluator(env, lambda: gym.make(args.env), args.episodes, cql.evaluate, (0, mean, std), actor,
                          background=True)
    evaluator.submit(0, actor_weights(actor))
    evaluator.collect(wait=True)  # warm-up: worker start
    held, start = 0.0, time.perf_counter()
    for i in range(args.repeats):
        submit_start = time.perf_counter()
        evaluator.submit(i, actor_weights(actor))
        held += time.perf_counter() - submit_start
    evaluator.collect(wait=True)
    background = (time.perf_counter() - start) / args.repeats
    evaluator.close()
    print(f"{args.env}, {args.episodes} episodes: foreground {foreground:.2f} s per evaluation (training stopped); "
          f"background {1e3 * held / args.repeats:.2f} ms held per evaluation ({background:.2f} s in the worker)")


if __name__ == "__main__":
    main()
