"""Two setup paths the README gives, end to end in child processes (so the tests survive the scripts'
restructuring):

* torch.compile without a C compiler on PATH: algorithms/common/fast.py's c_compiler_problem() names the
  problem in one line, and a compiled CPU run without a compiler ends with that line (exit 2), not an
  Inductor traceback.
* Minari downloads (`--minari_download=true` and `minari download <id>`) with requirements/runtime.txt
  installed, against a local stand-in for the Hugging Face Hub on 127.0.0.1: huggingface_hub's own client
  (which minari's default `hf://` remote uses) lists, resolves and downloads a small dataset that the test
  made with minari's own API, laid out in the repository the way minari's upload_dataset lays it out.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from algorithms.common.fast import c_compiler_problem

ROOT = Path(__file__).resolve().parents[2]
PYTHON = os.path.realpath(sys.executable)  # not a pyenv shim: a shim is a bash script that needs PATH
COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++")


def python_only_path(tmp_path: Path) -> str:
    """A PATH of one directory holding a link to this Python and nothing else (no compiler, no shell)."""
    bin_dir = tmp_path / "python-only-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(PYTHON)
    return str(bin_dir)


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CC", "CXX", "MINARI_REMOTE", "HF_ENDPOINT", "HF_TOKEN", "MINARI_DATASETS_PATH")
           and not k.lower().endswith("_proxy")}
    env.update(WANDB_MODE="disabled", MUJOCO_GL="disable", PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- no C compiler on PATH
def fake_compiler(directory: Path, name: str) -> None:
    """An executable `name` that answers --version, as torch's cpp_compiler_search asks."""
    path = directory / name
    path.write_text(f"#!{PYTHON}\nprint('{name} (fake) 1.0')\n")
    path.chmod(0o755)


def test_no_compiler_on_path_is_one_line_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", python_only_path(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    cuda, cpu, both = c_compiler_problem("cuda"), c_compiler_problem("cpu"), c_compiler_problem()
    assert cuda == ("torch.compile needs a C compiler (gcc or clang) on PATH: install one (apt-get install gcc) "
                    "or set --compile=false")
    assert cpu == ("torch.compile on the CPU needs a C++ compiler (g++) on PATH: install one (apt-get install g++) "
                   "or set --compile=false")
    assert c_compiler_problem("cuda:1") == cuda and both == cuda  # both needs: the first one missing
    assert all("\n" not in line for line in (cuda, cpu))


def test_compilers_are_found_the_way_triton_and_inductor_look(tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    fake_compiler(tools, "clang")  # Triton: $CC, else gcc, else clang
    assert c_compiler_problem("cuda") is None and c_compiler_problem("cpu") is not None
    fake_compiler(tools, "g++")  # Inductor's CPU kernels: $CXX, else g++
    assert c_compiler_problem("cpu") is None and c_compiler_problem() is None
    (tools / "clang").unlink()
    fake_compiler(tools, "cc")  # `cc` alone is not one Triton looks for
    assert c_compiler_problem("cuda") is not None
    monkeypatch.setenv("CC", "cc")  # ... unless CC names it
    assert c_compiler_problem("cuda") is None
    monkeypatch.setenv("CC", str(tmp_path / "missing-gcc"))
    assert "CC=" in c_compiler_problem("cuda")
    monkeypatch.setenv("CXX", "clang++")  # CXX replaces g++ in Inductor's search: not on PATH here
    assert "CXX='clang++'" in c_compiler_problem("cpu")
    (tools / "g++").write_text("#!/bin/sh\nexit 1\n")  # a g++ that does not run is no compiler for Inductor
    monkeypatch.delenv("CXX")
    assert c_compiler_problem("cpu") is not None


def test_this_machine_has_what_both_lookups_need():
    """Here (and in the image, which installs g++) both compilers are found."""
    if not shutil.which("g++"):
        pytest.skip("no g++ on this machine")
    assert c_compiler_problem() is None


def test_compiled_cpu_run_without_a_compiler_ends_in_one_line(tmp_path, monkeypatch):
    """Before the scripts called c_compiler_problem (torch 2.13 CPU): exit 1 after ~15 s with Inductor's
    traceback ending in `InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx`."""
    path = python_only_path(tmp_path)
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("CXX", raising=False)
    expected = c_compiler_problem("cpu")
    done = subprocess.run(
        [PYTHON, "algorithms/offline/cql.py", "--config_path", "configs/offline/cql/quickstart.yaml",
         "--max_timesteps", "20", "--eval_freq", "20", "--n_episodes", "1", "--log_freq", "10", "--compile", "true",
         "--device", "cpu", "--log_dir", str(tmp_path / "runs")],
        cwd=ROOT, env=child_env(PATH=path), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if done.returncode == 0:  # a run that falls back to eager is fine too
        assert "done: 20 updates" in done.stdout + done.stderr
        return
    lines = [line for line in done.stderr.splitlines() if line.strip() and "upd/s" not in line]  # tqdm's bar
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: ") and lines[0].endswith(expected), lines


# ----------------------------------------------------------------------------- Minari downloads
HUB_USER = "minari-local"  # MINARI_REMOTE=hf://minari-local: the stand-in for hf://farama-minari
NAMESPACE = "testhub"
DATASET_ID = f"{NAMESPACE}/hopper-random-v0"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalHub(ThreadingHTTPServer):
    """Enough of the Hugging Face Hub's HTTP API for huggingface_hub's HfApi.list_datasets, repo_info,
    list_repo_tree, hf_hub_download and snapshot_download on public dataset repos: repos maps
    "user/name" to a local folder, served as the repository's files at one commit."""

    daemon_threads = True

    def __init__(self, repos: dict):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.commit = hashlib.sha1(b"local hub").hexdigest()
        self.requests = []  # (method, path), for the assertions

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def files(self, repo_id: str) -> dict:
        folder = self.repos[repo_id]
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 20  # a stuck client connection ends its handler thread

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.route(body=False)

    def do_GET(self) -> None:
        self.route(body=True)

    def send(self, status: int, data: bytes, body: bool, **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_json(self, value, body: bool) -> None:
        self.send(200, json.dumps(value).encode(), body)

    def not_found(self, code: str, body: bool) -> None:
        self.send(404, json.dumps({"error": code}).encode(), body, X_Error_Code=code,
                  X_Repo_Commit=self.server.commit)

    def route(self, body: bool) -> None:
        hub = self.server
        url = urlsplit(self.path)
        hub.requests.append((self.command, url.path))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "datasets"] and len(parts) == 2:  # list_datasets(author=, search=)
            query = parse_qs(url.query)
            authors, searches = query.get("author", []), query.get("search", [])
            found = [{"id": r, "_id": hashlib.md5(r.encode()).hexdigest()[:24], "private": False,
                      "sha": hub.commit} for r in hub.repos
                     if (not authors or r.split("/")[0] in authors) and all(s in r for s in searches)]
            return self.send_json(found, body)
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if repo_id not in hub.repos:
                return self.not_found("RepoNotFound", body)
            files = hub.files(repo_id)
            if rest[:1] == ["revision"] or not rest:  # repo_info
                return self.send_json({"id": repo_id, "_id": "0" * 24, "private": False, "sha": hub.commit,
                                       "siblings": [{"rfilename": f} for f in files]}, body)
            if rest[:1] == ["tree"] and len(rest) >= 2:  # list_repo_tree(recursive=True)
                prefix = "/".join(rest[2:])
                entries = [{"type": "file", "oid": git_blob_sha(p.read_bytes()), "size": p.stat().st_size,
                            "path": f} for f, p in files.items() if f.startswith(prefix)]
                return self.send_json(entries, body)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":  # hf_hub_download
            repo_id, filename = "/".join(parts[1:3]), "/".join(parts[5:])
            if repo_id not in hub.repos:
                return self.not_found("RepoNotFound", body)
            path = hub.files(repo_id).get(filename)
            if path is None:
                return self.not_found("EntryNotFound", body)
            data = path.read_bytes()
            return self.send(200, data, body, Content_Type="application/octet-stream",
                             ETag=f'"{git_blob_sha(data)}"', X_Repo_Commit=hub.commit)
        self.not_found("NotFound", body)


@pytest.fixture
def local_hub(tmp_path):
    """A LocalHub serving repo minari-local/testhub: the namespace's metadata and a 3-episode Hopper-v5
    dataset, made by minari (create_dataset_from_buffers) in a separate MINARI_DATASETS_PATH."""
    source = tmp_path / "made"
    make = ("import gymnasium as gym\n"
            "from tools.rollouts import random_episodes, write_minari_dataset\n"
            "env = gym.make('Hopper-v5', max_episode_steps=30)\n"
            f"write_minari_dataset({DATASET_ID!r}, random_episodes(env, 3, seed=0), env)\n")
    subprocess.run([PYTHON, "-c", make], cwd=ROOT, env=child_env(MINARI_DATASETS_PATH=str(source)), check=True,
                   capture_output=True, timeout=60)
    assert (source / DATASET_ID / "data" / "main_data.hdf5").is_file()
    # The repository as minari's HuggingFaceStorage.upload_dataset leaves it: the namespace folder's files,
    # and the dataset's id added to the "datasets" of the namespace_metadata.json at the repository's root.
    repo = shutil.copytree(source / NAMESPACE, tmp_path / "repo")
    namespace_metadata = json.loads((repo / "namespace_metadata.json").read_text())
    namespace_metadata["datasets"] = [*namespace_metadata.get("datasets", []), DATASET_ID]
    (repo / "namespace_metadata.json").write_text(json.dumps(namespace_metadata))
    hub = LocalHub({f"{HUB_USER}/{NAMESPACE}": repo})
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)


def hub_env(hub: LocalHub, tmp_path: Path, datasets: Path) -> dict:
    return child_env(MINARI_DATASETS_PATH=str(datasets), MINARI_REMOTE=f"hf://{HUB_USER}",
                     HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
                     HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10")


def assert_downloaded(datasets: Path, hub: LocalHub) -> None:
    made = hub.repos[f"{HUB_USER}/{NAMESPACE}"] / DATASET_ID.split("/", 1)[1] / "data"
    got = datasets / DATASET_ID / "data"
    for name in ("main_data.hdf5", "metadata.json"):
        assert (got / name).read_bytes() == (made / name).read_bytes(), name
    assert (datasets / NAMESPACE / "namespace_metadata.json").is_file()
    resolved = {p for m, p in hub.requests if m == "GET" and "/resolve/" in p}
    assert any(p.endswith("/data/main_data.hdf5") for p in resolved), sorted(resolved)


def test_runtime_requirements_give_minari_its_default_remote():
    """minari's default remote (hf://farama-minari) needs huggingface_hub, which only its hf extra installs."""
    from packaging.requirements import Requirement

    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements/runtime.txt").read_text().splitlines()]
    (minari_requirement,) = [Requirement(line) for line in lines if line and Requirement(line).name == "minari"]
    assert "hf" in minari_requirement.extras
    from minari.storage.remotes import DEFAULT_REMOTE, get_cloud_storage

    assert type(get_cloud_storage(DEFAULT_REMOTE)).__name__ == "HuggingFaceStorage"


def test_training_script_downloads_a_minari_dataset_from_the_hub(local_hub, tmp_path):
    datasets = tmp_path / "minari-datasets"
    datasets.mkdir()
    done = subprocess.run(
        [PYTHON, "algorithms/offline/cql.py", f"--env={DATASET_ID}", "--minari_download=true",
         "--max_timesteps=10", "--eval_freq=10", "--n_episodes=1", "--log_freq=5", "--batch_size=16",
         "--max_episode_steps=20", "--device=cpu", "--compile=false", f"--log_dir={tmp_path / 'runs'}"],
        cwd=ROOT, env=hub_env(local_hub, tmp_path, datasets), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 10 updates" in done.stdout + done.stderr, done.stdout[-2000:]
    assert_downloaded(datasets, local_hub)


def test_minari_cli_downloads_a_dataset_from_the_hub(local_hub, tmp_path):
    datasets = tmp_path / "minari-datasets"
    datasets.mkdir()
    cli = Path(sysconfig.get_path("scripts")) / "minari"  # the console script pip installed with minari
    if not cli.is_file():
        pytest.skip(f"no minari command at {cli}")
    done = subprocess.run([str(cli), "download", DATASET_ID], cwd=tmp_path,
                          env=hub_env(local_hub, tmp_path, datasets), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert_downloaded(datasets, local_hub)
