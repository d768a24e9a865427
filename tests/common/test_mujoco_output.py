"""MuJoCo's own output: its warnings are a line each on stderr, never stdout or a MUJOCO_LOG.TXT in the working
directory, and the compiler's deprecation notice for every HalfCheetah model is dropped (a 48-member stack's
evaluation workers printed it 258 times)."""
import subprocess
import sys

from conftest import CHILD_ENV, ROOT

CODE = """
import algorithms.common.evaluation  # as the trainer and every evaluation worker do
import gymnasium as gym, mujoco, numpy as np
env = gym.make("HalfCheetah-v4")
env.reset(seed=0)
model, data = env.unwrapped.model, env.unwrapped.data
data.qvel[:] = np.inf  # an unstable simulation: MuJoCo warns and resets it
mujoco.mj_step(model, data)
print("stepped")
"""


def test_mujoco_warns_on_stderr_in_one_line_and_not_of_settotalmass(tmp_path):
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", CODE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**CHILD_ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stepped\n"
    assert "settotalmass" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("MuJoCo: ")]
    assert "Nan, Inf or huge value in QVEL" in line
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
