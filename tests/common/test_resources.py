"""What a --seeds stack needs from the process, checked before any run directory exists (algorithms/common/runs.py's
check_stack_resources): open files beyond the soft limit raise it to the hard one, beyond the hard one are one line
naming 'seeds' (exit 2); memory beyond what the device has is one line naming 'seeds' (and 'buffer_size' for the
finetune script's per-run replay rings), exit 2, with no run directory made. And a background evaluator holds a
few files per run, not one per tensor of every evaluation it has pending."""
import os
import re
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import CHILD_ENV, OFFLINE_SCRIPT, offline_run_args

import algorithms.finetune.cql as finetune_cql
from algorithms.common import process, runs
from algorithms.common.evaluation import Evaluator, actor_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_stack_past_the_hard_open_file_limit_is_one_line_before_any_run_directory(hopper_hdf5, tmp_path):
    def limit_open_files():  # in the child: `ulimit -n 128` with the hard limit as low
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    root = tmp_path / "runs"
    result = subprocess.run([sys.executable, OFFLINE_SCRIPT, *offline_run_args(hopper_hdf5, root), "--seeds=300"],
                            env=CHILD_ENV, preexec_fn=limit_open_files, capture_output=True, text=True, timeout=300)
    err = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"error: field 'seeds': 300 runs need about (\d+) open files \(2 per run: metrics, lock; "
                        r"\d+ open now; 32 spare\), more than the open-file limit: ulimit -n is 128, its hard limit "
                        r"128; raise it \(ulimit -n \1\) or run fewer seeds per process", err[0]), err[0]
    assert not root.exists() or not any(root.iterdir())  # no run directory


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8192, reason="needs a hard limit of 8192 files")
def test_a_low_soft_open_file_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = SimpleNamespace(wandb_mode="disabled", seeds="300")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_files() + 16, 256), hard))
        process.check_open_files(config, 300, background=True)  # 300 x 8 files: past 256, within the hard limit
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_stack_too_large_for_memory_is_one_line_naming_seeds_and_buffer_size(tmp_path, capsys):
    # 64 rings of a billion Pendulum transitions (36 B each): 2.1 TiB, on any host
    with pytest.raises(SystemExit) as exit_info:
        finetune_cql.main(["--env=Pendulum-v1", "--offline_iterations=0", "--online_iterations=1e9",
                           "--buffer_size=1e9", "--seeds=64", "--wandb_mode=disabled", "--device=cpu",
                           f"--log_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert re.fullmatch(r"error: fields 'seeds' and 'buffer_size': 64 runs need at least 2\.1 TiB of cpu memory "
                        r"\(networks and Adam states 64 x [\d.]+ MiB, batches 64 x 9\.0 KiB, replay rings 64 x 33\.5 "
                        r"GiB \(1000000000 rows x 36 B\)\), [\d.]+ [GT]iB is available \((MemAvailable|the cgroup's "
                        r"memory\.max less memory\.current)\); run fewer seeds per process or a smaller buffer_size",
                        err[0]), err[0]
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_an_allocation_the_device_refuses_is_a_config_error(monkeypatch):
    """A stack within the estimate (a lower bound) may still not fit: the failed allocation is one line."""
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "zeros", refuse)
    with pytest.raises(runs.ConfigError, match=re.escape("field 'buffer_size': a replay ring of 1000 transitions "
                                                         "(1.1 MiB) does not fit in cpu's memory")):
        process.zero_tensors({"observations": (1000, 200), "rewards": (2, 1000, 50)}, torch.device("cpu"),
                          "field 'buffer_size': a replay ring of 1000 transitions")


class _Trainer:
    def __init__(self):
        self.actor = torch.nn.Linear(10, 10)  # 110 trainable parameters: weights, gradient, two Adam moments
        self.target = torch.nn.Linear(10, 10).requires_grad_(False)  # 110 frozen: once
        self.same_actor = self.actor  # counted once
        self.rate = 0.1


def test_run_memory_counts_each_trainable_parameter_four_times_and_a_frozen_one_once():
    assert process.run_memory(_Trainer()) == 4 * (4 * 110 + 110)


def test_the_memory_estimate_refuses_only_past_what_is_available(monkeypatch):
    config = SimpleNamespace(wandb_mode="disabled", seeds="2", background_eval=False, batch_size=100)
    needed = 2 * (4 * (4 * 110 + 110) + 100 * 4 * (2 * 3 + 1 + 2) + 50 * 4 * (2 * 3 + 1 + 2))  # nets, batches, rings
    for available, refused in ((needed, False), (needed - 1, True)):
        monkeypatch.setattr(process, "available_memory", lambda device, free=available: (free, "MemAvailable"))
        if not refused:
            process.check_stack_resources(config, [0, 1], torch.device("cpu"), _Trainer, 3, 1, ring_rows=50)
            continue
        with pytest.raises(runs.ConfigError, match=r"^fields 'seeds' and 'buffer_size': 2 runs need at least"):
            process.check_stack_resources(config, [0, 1], torch.device("cpu"), _Trainer, 3, 1, ring_rows=50)


def test_the_one_run_trainer_is_made_aside_from_the_random_stream(monkeypatch):
    monkeypatch.setattr(process, "available_memory", lambda device: None)
    config = SimpleNamespace(wandb_mode="disabled", seeds=None, background_eval=False, batch_size=1)
    torch.manual_seed(0)
    process.check_stack_resources(config, None, torch.device("cpu"), _Trainer, 3, 1)
    drawn = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), drawn)


def test_a_background_evaluator_holds_no_file_per_pending_weight(tmp_path):
    """Weights sent to the worker as tensors went through shared memory, one open file each while pending: ~10 per
    evaluation and run, which a large stack's open-file estimate could not bound."""
    env = finetune_cql.make_gym_env("Pendulum-v1", {}, 5, False)
    actor = finetune_cql.TanhGaussianActor(3, 1, 2.0)
    before = open_files()
    evaluator = Evaluator(env(), env, 1, finetune_cql.evaluate, (0, 0.0, 1.0), actor, background=True)
    try:
        started = open_files()
        for step in range(1, 6):
            evaluator.submit(step, actor_weights(actor))
        assert evaluator.results.poll(120)  # the first answer: the queue has sent the jobs by now
        assert open_files() <= started + 1, (before, started, open_files())  # five pending; a pipe's end at most
        assert [step for step, _ in evaluator.collect(wait=True)] == [1, 2, 3, 4, 5]
    finally:
        evaluator.close()
    assert started - before <= process.FILES_PER_WORKER
