"""The Docker image's environment, without a Docker daemon: the Dockerfile's ENV variables, applied to
a process that cannot load libEGL (as on PyTorch's CUDA runtime image on a host without it), still
create Hopper-v4, an AntMaze env and a vector eval env, and the README's main job runs.

This machine may have libEGL, so the child process hides it: ctypes refuses to open any libEGL*, the
way the dynamic loader does where the library is absent. The first test shows that this reproduces
the failure seen on an H200 host with the image's old MUJOCO_GL=egl.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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
import algorithms.offline.cql as cql
try:
    ctypes.CDLL("libEGL.so.1")
    raise SystemExit("libEGL is not hidden")
except OSError:
    pass
env = gym.make("Hopper-v4")
env.reset(seed=0)
env.step(env.action_space.sample())
cql.check_env_id("AntMaze_UMaze-v4")
ant = cql.flat_observation_env(gym.make("AntMaze_UMaze-v4"), goal_in_state=True)
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
