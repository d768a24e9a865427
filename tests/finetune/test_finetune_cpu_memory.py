"""A finetune run on the CPU keeps the memory its updates free for the next update (fast.keep_freed_host_memory):
under glibc's default thresholds each update of CORL's shapes page-faulted its tensors in again (~15k faults an
update, a quarter of its CPU time in the kernel; the docs' finetune example ran 1.4x slower on a 2-core CPU)."""
import platform
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_ENV, ROOT, finetune_run_args, offline_run_args

import algorithms.finetune.cql as cql
import algorithms.offline.cql as offline_cql
from algorithms.common import fast

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Page faults of each of 7 updates of CORL's default shapes (batch 256, 10 sampled actions), after 3 to warm up.
FAULTS_OVER_UPDATES = """
import resource, sys, numpy as np, torch
import algorithms.finetune.cql as cql
from algorithms.common import fast
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert fast.keep_freed_host_memory(torch.device("cpu"))
config = cql.TrainConfig()
trainer = cql.CQL(config, 11, 3, 1.0, torch.device("cpu"))
rng = np.random.default_rng(0)
buffer = cql.ReplayBuffer(2000, 11, 3, torch.device("cpu"))
buffer.load_dataset({"observations": rng.standard_normal((2000, 11)), "actions": rng.uniform(-1, 1, (2000, 3)),
                     "rewards": rng.standard_normal(2000), "next_observations": rng.standard_normal((2000, 11)),
                     "terminals": np.zeros(2000)})
update = trainer.update_step(buffer, config.batch_size)
for _ in range(3):
    update()
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    update()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def median_faults_of_an_update(mode: str) -> int:
    env = {k: v for k, v in CHILD_ENV.items() if k not in fast.MALLOC_ENV}
    done = subprocess.run([sys.executable, "-c", FAULTS_OVER_UPDATES, mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(statistics.median(int(faults) for faults in done.stdout.split()))


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds")
def test_updates_on_the_cpu_reuse_freed_memory_instead_of_faulting_it_in():
    kept = median_faults_of_an_update("keep")
    default = median_faults_of_an_update("default")
    assert kept < 100  # a few stray pages (an update that first needs more memory takes it once)
    assert default > 1000  # what it was without: 4k-30k pages of its tensors faulted in again


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_only_a_cpu_run_without_the_users_own_malloc_settings_sets_them(monkeypatch):
    for name in fast.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert fast.keep_freed_host_memory(torch.device("cpu"))
    assert not fast.keep_freed_host_memory(torch.device("cuda"))  # a GPU run's updates allocate on the GPU
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # glibc read it at start: it stays the user's
    assert not fast.keep_freed_host_memory(torch.device("cpu"))


def test_a_finetune_run_keeps_freed_host_memory(hopper_hdf5, tmp_path, monkeypatch):
    devices = []
    monkeypatch.setattr(fast, "keep_freed_host_memory", devices.append)
    cql.train(cql.parse_config(finetune_run_args(hopper_hdf5, tmp_path / "runs", offline=4, online=6)))
    assert devices == [torch.device("cpu")]


def test_an_offline_run_keeps_freed_host_memory(hopper_hdf5, tmp_path, monkeypatch):
    devices = []
    monkeypatch.setattr(fast, "keep_freed_host_memory", devices.append)
    offline_cql.train(offline_cql.parse_config(offline_run_args(hopper_hdf5, tmp_path / "runs", updates=10)))
    assert devices == [torch.device("cpu")]
