"""The test session leaves no temporary files behind: Gymnasium-Robotics' maze envs write an
ant_maze<time>.xml into the temp dir each time one is made; conftest's session_temp_dir gives the session
(and the children it starts) a temp dir of its own and removes it at the end."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import pytest
from conftest import CHILD_ENV, ROOT, SYSTEM_TMP

pytest.importorskip("gymnasium_robotics")


def make_antmaze() -> None:
    env = gym.make("AntMaze_UMaze-v4")
    env.reset(seed=0)
    env.close()


def test_antmaze_env_writes_into_the_session_temp_dir(session_temp_dir):
    before = sorted(SYSTEM_TMP.glob("ant_maze*.xml"))
    make_antmaze()
    assert sorted(SYSTEM_TMP.glob("ant_maze*.xml")) == before  # nothing in the system's temp dir
    assert list(session_temp_dir.glob("ant_maze*.xml"))
    assert tempfile.gettempdir() == os.environ["TMPDIR"] == CHILD_ENV["TMPDIR"] == str(session_temp_dir)


def test_a_session_that_makes_antmaze_envs_leaves_no_file(tmp_path):
    """A pytest session run with its own system temp dir: that dir holds as many ant_maze files after as
    before (none), and no session dir either."""
    system = tmp_path / "system"
    system.mkdir()
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"{Path(__file__).name}::test_antmaze_env_writes_into_the_session_temp_dir"],
                           cwd=Path(__file__).parent, env={**CHILD_ENV, "TMPDIR": str(system), "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
    assert "1 passed" in child.stdout
    assert not list(system.rglob("ant_maze*.xml")) and not list(system.glob("cql-tests-*"))
