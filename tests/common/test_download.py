"""A D4RL name whose file is not in the cache and cannot be downloaded (no network): a fault (exit code 3), not
bad input, in one line saying where to put the file (the cache folder and file name, D4RL_DATASET_DIR) or that
--dataset_path reads it from elsewhere."""
import socket

import pytest

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common import data as common_data
from algorithms.common.config import RunFault


def unused_local_url(file_name: str) -> str:
    """An http URL on 127.0.0.1 at a port with nothing listening (bound once by the OS, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{file_name}"


@pytest.mark.parametrize("module", [offline_cql, finetune_cql], ids=["offline", "finetune"])
def test_d4rl_download_without_network_is_a_fault_saying_where_to_put_the_file(module, tmp_path, monkeypatch,
                                                                                capsys):
    url = unused_local_url("hopper_random-v2.hdf5")
    monkeypatch.setitem(common_data.D4RL_DATASETS, "hopper-random-v2", (url, -20.272305, 3234.3))
    cache = tmp_path / "cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    with pytest.raises(SystemExit) as stop:
        module.main(["--env=hopper-random-v2", "--device=cpu", "--wandb_mode=disabled",
                     f"--checkpoints_path={tmp_path / 'runs'}"])
    assert stop.value.code == 3  # a fault: the same command works once the network does
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: env hopper-random-v2: download {url}: ")
    assert "<urlopen error" not in err  # the reason itself: [Errno 111] Connection refused
    assert f"put D4RL's file hopper_random-v2.hdf5 at {cache / 'hopper_random-v2.hdf5'}" in err
    assert "$D4RL_DATASET_DIR" in err and "--dataset_path" in err
    assert list(cache.iterdir()) == []  # no partial file left in the cache
    assert not (tmp_path / "runs").exists()  # stopped before any run directory


def test_download_that_times_out_is_a_fault(tmp_path, monkeypatch):
    """Each way a download fails is a DownloadFault (a RunFault), whatever urllib raised."""
    def silent(*args, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(common_data.urllib.request, "urlopen", silent)
    with pytest.raises(RunFault, match="download http://x/f.hdf5: timed out"):
        common_data.download_file("http://x/f.hdf5", tmp_path / "f.hdf5")
    assert list(tmp_path.iterdir()) == []
