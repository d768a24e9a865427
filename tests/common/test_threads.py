"""A run on the CPU takes one torch thread unless OMP_NUM_THREADS sets the count (process.default_cpu_threads,
called by run_main): torch's default, a thread per core, made a 2-seed quickstart stack of 300 updates take
145-165 s instead of 14-17 s on a busy 2-core machine."""
import pytest
import torch
from conftest import offline_run_args

import algorithms.offline.cql as offline_cql
from algorithms.common.process import default_cpu_threads


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 threads and no OMP_NUM_THREADS; the thread count restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_cpu_run_takes_one_thread(device, two_threads):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto is cuda here")
    default_cpu_threads(device)
    assert torch.get_num_threads() == 1


def test_omp_num_threads_keeps_its_count(two_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    default_cpu_threads("cpu")
    assert torch.get_num_threads() == 2


def test_the_scripts_main_sets_one_thread_on_the_cpu(two_threads, hopper_hdf5, tmp_path, capsys):
    offline_cql.main(offline_run_args(hopper_hdf5, tmp_path / "runs", updates=30))
    assert torch.get_num_threads() == 1
    assert "thread" not in capsys.readouterr().out  # nothing extra printed
