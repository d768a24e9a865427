"""Updates per second of the offline CQL update: the plain eager path against each fast variant.

    python benchmarks/update_speed.py --device cuda
    python benchmarks/update_speed.py --device cpu --updates 30
    python benchmarks/update_speed.py --device cuda --seeds 1,4,16 --variants plain,compile+cudagraphs

All variants run in one process on the same device, CORL's default shapes (halfcheetah: state 17,
action 6; batch 256; 3x256 critics; 10 CQL actions), on a synthetic buffer of --buffer_size
transitions. Ratios are against the plain eager update, the readable reference. A "CORL-style"
row adds what CORL does per update on top of the same math: one host sync (.item()) per metric.
Before timing, each fast variant is checked against the plain one: fed the same batches and
noise from the same weights, the parameters after --check_updates updates must agree.

--seeds N trains a stack of N independent runs per update (algorithms/offline/cql.py --seeds):
rows then report seed-updates/s (updates/s x N) and peak GPU memory per seed (the synthetic
buffer, shared by all runs, left out). A list (1,4,16) times each stack size in turn.
"""
import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.offline.cql as cql  # noqa: E402


def synthetic_data(n: int, state_dim: int, action_dim: int, seed: int = 0) -> cql.OfflineData:
    rng = np.random.default_rng(seed)
    return cql.OfflineData(
        observations=rng.standard_normal((n, state_dim), dtype=np.float32),
        actions=rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
        rewards=rng.standard_normal(n, dtype=np.float32),
        next_observations=rng.standard_normal((n, state_dim), dtype=np.float32),
        terminals=(rng.random(n) < 0.01).astype(np.float32),
        make_env=None, ref_min_score=None, ref_max_score=None, is_locomotion=False, source="synthetic",
    )


def make(config: cql.TrainConfig, device: torch.device, cudagraphs: bool, n_seeds: int = 0) -> cql.CQL:
    """A one-run trainer (n_seeds 0) or a stack of n_seeds runs."""
    torch.manual_seed(0)
    return cql.CQL(config, 17, 6, 1.0, device, capturable=cudagraphs and device.type == "cuda",
                   seeds=list(range(n_seeds)) if n_seeds else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_against_plain(config: cql.TrainConfig, device: torch.device, compile: bool, cudagraphs: bool,
                        updates: int, n_seeds: int = 0, critic_layers: Optional[Dict[str, bool]] = None) -> float:
    """Largest relative difference of all gradients together (one vector), fast vs plain, over
    `updates` updates.

    Before each update the fast trainer gets the plain one's weights; both then see the same batch
    and noise, so their gradients must agree up to float rounding (the CUDA graph, captured at the
    fourth update, replays kernels on copies of the inputs).
    """
    plain = make(config, device, False, n_seeds)
    fast = make(config, device, cudagraphs, n_seeds)
    if compile:  # the critics' compiled forms as UpdateStep sets them, less what the variant turns off
        fast.fuse_critic_layers()
        for name, value in (critic_layers or {}).items():
            setattr(fast.critic, name, value)
    losses = torch.compile(fast.losses) if compile else fast.losses
    gen = torch.Generator(device=device).manual_seed(1)
    b, n, a = (*plain.run_shape, config.batch_size), config.cql_n_actions, 6

    def draw() -> Tuple[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]:
        def randn(*shape):
            return torch.randn(*shape, device=device, generator=gen)

        def uniform(*shape):
            return torch.rand(*shape, device=device, generator=gen) * 2 - 1

        batch = (randn(*b, 17), uniform(*b, a), randn(*b), randn(*b, 17), (uniform(*b) > 0.9).float())
        noise = {"policy": randn(*b, a), "next": randn(*((*b, n, a) if config.cql_max_target_backup else (*b, a))),
                 "cql_current": randn(*b, n, a), "cql_next": randn(*b, n, a), "cql_random": uniform(*b, n, a)}
        return batch, noise

    def fast_step(batch, noise):
        total, _ = losses(batch, noise, False)
        fast.optimizer.zero_grad(set_to_none=True)
        total.backward()
        fast.optimizer.step()

    def params(trainer):
        return list(trainer.actor.parameters()) + list(trainer.critic.parameters()) + [trainer.log_alpha]

    static, graph, worst = None, None, 0.0
    for i in range(updates):
        with torch.no_grad():
            for p, q in zip(params(plain) + list(plain.target_critic.parameters()),
                            params(fast) + list(fast.target_critic.parameters())):
                q.copy_(p)
        batch, noise = draw()
        plain.apply_update(batch, noise, False, True)
        if cudagraphs and device.type == "cuda" and i >= 3:
            if graph is None:
                static = (tuple(t.clone() for t in batch), {k: v.clone() for k, v in noise.items()})
                fast.optimizer.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fast_step(*static)
            for dst, src in zip(static[0], batch):
                dst.copy_(src)
            for k in noise:
                static[1][k].copy_(noise[k])
            graph.replay()
        else:
            fast_step(batch, noise)
        want = torch.cat([p.grad.flatten() for p in params(plain)])
        got = torch.cat([q.grad.flatten() for q in params(fast)])
        worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def time_variant(config: cql.TrainConfig, buffer: cql.ReplayBuffer, device: torch.device, compile: bool,
                 cudagraphs: bool, corl_sync: bool, warmup: int, updates: int, n_seeds: int = 0,
                 critic_layers: Optional[Dict[str, bool]] = None) -> Tuple[float, float]:
    trainer = make(config, device, cudagraphs, n_seeds)
    step = trainer.update_step(buffer, config.batch_size, compile=compile, cudagraphs=cudagraphs)
    for name, value in (critic_layers or {}).items():  # a variant without one of UpdateStep's compiled layers
        setattr(trainer.critic, name, value)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(updates):
        if corl_sync:  # CORL: every metric fetched to the host after every update
            metrics = trainer.train(buffer.sample(config.batch_size, trainer.run_shape))
            {k: v.item() for k, v in metrics.items()}
        else:
            step()
    sync(device)
    return updates / (time.perf_counter() - start), warm_seconds


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--updates", type=int, default=2000, help="timed updates per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates first (compilation, capture)")
    parser.add_argument("--buffer_size", type=int, default=2_000_000, help="synthetic transitions on the device")
    parser.add_argument("--check_updates", type=int, default=20, help="updates compared against the plain path")
    parser.add_argument("--variants", default="plain,corl_style,compile,cudagraphs,compile+cudagraphs")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (reported separately; off by default)")
    parser.add_argument("--on_nonfinite", default="stop", choices=["stop", "skip"],
                        help="the training scripts' option: skip adds the on-device non-finite check to every update")
    parser.add_argument("--seeds", default="0", help="runs per update, comma-separated stack sizes; 0: the one-run "
                                                     "trainer, N: a stack of N seeds (--seeds of the training script)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    config = cql.TrainConfig(on_nonfinite=args.on_nonfinite)  # CORL defaults

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = synthetic_data(args.buffer_size, 17, 6)
    host_mb = sum(a.nbytes for a in (data.observations, data.actions, data.rewards, data.next_observations,
                                     data.terminals)) / 2**20
    buffer = cql.ReplayBuffer(data, device)
    del data
    buffer_mb = sum(t.numel() * t.element_size() for t in (buffer.observations, buffer.actions, buffer.rewards,
                                                              buffer.next_observations, buffer.terminals)) / 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}, "
          f"on_nonfinite {args.on_nonfinite}, batch {config.batch_size}, "
          f"{config.q_n_hidden_layers}x256 critics, {config.cql_n_actions} CQL actions")
    print(f"buffer: {args.buffer_size} transitions, {buffer_mb:.0f} MiB on {device.type} ({host_mb:.0f} MiB as host "
          f"arrays while loading); peak host RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (from {rss_before:.0f})")

    variants = {  # (compile, cudagraphs, CORL's host syncs, EnsembleCritic layers turned off)
        "plain": (False, False, False, {}), "corl_style": (False, False, True, {}),
        "compile": (True, False, False, {}), "cudagraphs": (False, True, False, {}),
        "compile+cudagraphs": (True, True, False, {}),
        "compile+cudagraphs-two_passes": (True, True, False, {"one_pass": False}),
        "compile+cudagraphs-matmul_output": (True, True, False, {"sum_output": False}),
    }
    rows = []
    for n_seeds in [int(n) for n in args.seeds.split(",")]:
        runs = max(n_seeds, 1)
        for label in args.variants.split(","):
            compile, cudagraphs, corl_sync, critic_layers = variants[label]
            if cudagraphs and device.type != "cuda":
                continue
            error = None
            if compile or cudagraphs:
                error = check_against_plain(config, device, compile, cudagraphs, args.check_updates, n_seeds,
                                            critic_layers)
                torch._dynamo.reset()  # compiled code holds the check's trainers: free them before measuring memory
                gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ups, warm = time_variant(config, buffer, device, compile, cudagraphs, corl_sync, args.warmup,
                                     args.updates, n_seeds, critic_layers)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            rows.append((n_seeds, label, ups, warm, error, peak))
            print(f"  seeds {n_seeds:<3} {label:<20} {ups:9.1f} updates/s, {ups * runs:9.1f} seed-updates/s "
                  f"(warm-up {warm:5.1f} s)", flush=True)

    print("\n| seeds | variant | updates/s | seed-updates/s | vs plain | 1M updates (all seeds) | warm-up s "
          "| max rel. gradient diff vs plain | peak GPU MiB | GPU MiB per seed (buffer apart) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_seeds, label, ups, warm, error, peak in rows:
        runs = max(n_seeds, 1)
        plain = next((r[2] for r in rows if r[0] == n_seeds and r[1] == "plain"), None)
        err = "-" if error is None else f"{error:.1e}"
        ratio = "-" if plain is None else f"{ups / plain:.2f}x"  # the plain variant was not run
        print(f"| {n_seeds or '-'} | {label} | {ups:.1f} | {ups * runs:.1f} | {ratio} | "
              f"{1e6 / ups / 60:.1f} min | {warm:.1f} | {err} | {peak:.0f} | {(peak - buffer_mb) / runs:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
