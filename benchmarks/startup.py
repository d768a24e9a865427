"""Where a run's start-up goes, from process start to its first updates, phase by phase.

    python benchmarks/startup.py --config_path configs/offline/cql/quickstart.yaml --max_timesteps=3 \
        --eval_freq=3 --n_episodes=1 --wandb_mode=disabled

Runs the offline script's main() with the arguments given, printing, against the time the process
started, when each set-up function returned and how long it took, and the first updates (each
followed by a device synchronize). Run it twice with one TORCHINDUCTOR_CACHE_DIR to see an empty
and a warm compile cache. (CQL includes importing torch._dynamo, which torch.optim does on first
use; the gap before Evaluator is torch.compile importing Inductor.)
"""
import sys
import time

START = time.time()
import torch  # noqa: E402

sys.path.insert(0, ".")
import algorithms.offline.cql as cql  # noqa: E402
from algorithms.common import fast  # noqa: E402

TIMED = ("resolve_device", "load_dataset", "check_dataset_matches_env", "ReplayBuffer", "CQL", "start_run_logs",
         "Evaluator", "summarize")


def stamp(what: str) -> None:
    print(f"[{time.time() - START:6.2f} s] {what}", flush=True)


def timed(name: str) -> None:
    original = getattr(cql, name)

    def wrapper(*args, **kwargs):
        begin = time.time()
        result = original(*args, **kwargs)
        stamp(f"{name} took {time.time() - begin:.2f} s")
        return result

    setattr(cql, name, wrapper)


def main() -> None:
    stamp("imported torch and the script")
    for name in TIMED:
        timed(name)
    update_call, updates = fast.UpdateStep.__call__, [0]

    def update(self) -> None:
        begin = time.time()
        update_call(self)
        updates[0] += 1
        if updates[0] <= 6:
            if self.metric_sum.device.type == "cuda":
                torch.cuda.synchronize()
            stamp(f"update {updates[0]} took {time.time() - begin:.2f} s")

    fast.UpdateStep.__call__ = update
    cql.main(sys.argv[1:])
    stamp("main returned")


if __name__ == "__main__":  # the background evaluator's spawned process imports this file too
    main()
