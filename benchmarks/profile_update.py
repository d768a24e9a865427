"""Where an update's GPU time goes: kernels per update, GPU microseconds per update, top kernels.

    python benchmarks/profile_update.py --device cuda [--compile] [--seeds 16]

Runs a few warm-up updates, then profiles --updates eager updates of CORL's default shapes with
torch.profiler and prints the kernel count and device time per update with the heaviest kernels.
--seeds N profiles the update of a stack of N runs (the training scripts' --seeds).
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.offline.cql as cql  # noqa: E402
from benchmarks.update_speed import synthetic_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=0, help="0: the one-run trainer; N: a stack of N runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = cql.TrainConfig()
    trainer = cql.CQL(config, 17, 6, 1.0, device, capturable=device.type == "cuda",
                      seeds=list(range(args.seeds)) if args.seeds else None)
    buffer = cql.ReplayBuffer(synthetic_data(100_000, 17, 6), device)
    step = trainer.update_step(buffer, config.batch_size, compile=args.compile, cudagraphs=False)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(args.updates):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.key.startswith(("##", "Optimizer."))]  # ranges, not kernels
    kernels = sum(e.count for e in events)
    device_us = sum(e.self_device_time_total for e in events)
    ceiling = 1e6 * args.updates / max(device_us, 1)
    print(f"compile={args.compile}, seeds={args.seeds}: {kernels / args.updates:.0f} kernels and "
          f"{device_us / args.updates:.0f} us of GPU time per update (GPU-bound ceiling {ceiling:.0f} updates/s)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"  {e.self_device_time_total / args.updates:8.1f} us  x{e.count / args.updates:5.1f}  {e.key[:90]}")
    print("operators by GPU time, with input shapes:")
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")
           and e.device_time_total > 0 and e.key in ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")]
    for e in sorted(ops, key=lambda e: -e.device_time_total)[: args.top]:
        per_update = e.device_time_total / args.updates
        print(f"  {per_update:8.1f} us  x{e.count / args.updates:5.1f}  {e.key} {e.input_shapes}")


if __name__ == "__main__":
    main()
