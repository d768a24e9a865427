"""The training env of an online run: one step at a time with its failures caught (a failed step ends its
episode as truncated), success read from the env's info, and its whole state taken and put back mid-episode so
that --resume steps on exactly as the stopped run would have.
"""
import copy
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from algorithms.common.config import ConfigError, RunFault

# Tasks that end in success or failure: D4RL / Minari names and their Gymnasium-Robotics env ids.
GOAL_TASKS = ("antmaze", "maze2d", "pointmaze", "pen", "door", "hammer", "relocate", "adroithand")
SUCCESS_KEYS = ("success", "is_success", "goal_achieved")


def is_goal_task(*names: Optional[str]) -> bool:
    """Whether any of the names (dataset, env id) is a goal task, by the leading word of a part of its path
    (Minari ids: D4RL/antmaze/..., file paths)."""
    words = [word for name in names if name for word in name.lower().replace("\\", "/").split("/")]
    return any(word.startswith(GOAL_TASKS) for word in words)


def step_success(reward: float, info: Dict[str, Any], sparse_reward: bool) -> Optional[bool]:
    """Whether a step reached the goal: the env's info['success'] (or is_success, goal_achieved);
    for antmaze-like sparse tasks without it, a positive raw reward; None if the step cannot tell."""
    for key in SUCCESS_KEYS:
        if key in info:
            return bool(np.any(info[key]))
    return reward > 0 if sparse_reward else None


def _mujoco_warning(message: str) -> None:
    """MuJoCo's warnings as a line on stderr (not stdout and MUJOCO_LOG.TXT), less the deprecation notice its
    compiler prints for every HalfCheetah model made: 258 lines from one 48-member stack's evaluators."""
    if "settotalmass" not in message:
        print(f"MuJoCo: {message.strip()}", file=sys.stderr)


try:  # the trainer and every evaluation worker import this module
    import mujoco
    mujoco.set_mju_user_warning(_mujoco_warning)
except ImportError:  # an env without MuJoCo
    pass

# MuJoCo at an unstable state ("Nan, Inf or huge value in QACC ...") prints a warning, resets the simulation
# and goes on: the step returns a finite observation of a fresh simulation. Only these counters tell it.
_MUJOCO_INSTABILITY = ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC")


@dataclass
class EnvStep:
    """One step of a training env (step_env). A failed step has `error` (its one-line reason), no
    next_obs, and ends its episode as truncated; an ended episode's reset observation is reset_obs."""

    next_obs: Optional[np.ndarray]
    reward: Any
    terminated: bool
    truncated: bool
    success: Optional[bool] = None  # step_success: None if the env tells none
    reset_obs: Optional[np.ndarray] = None
    error: Optional[str] = None


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def reset_env(env: gym.Env, seed: Optional[int] = None) -> np.ndarray:
    """The first observation of a new episode (seeded: the action space too); a non-finite one raises."""
    obs = env.reset(seed=seed)[0] if seed is not None else env.reset()[0]
    if seed is not None:
        env.action_space.seed(seed)
    if not np.isfinite(obs).all():
        raise ValueError(f"reset gave a non-finite observation ({obs})")
    return obs


def step_env(env: gym.Env, action: np.ndarray, sparse_reward: bool) -> EnvStep:
    """One step of a training env and, at an episode's end, its reset; the same in the trainer and in an
    env worker. A step that raises, gives a non-finite observation or reward, or makes MuJoCo find its
    simulation unstable is a failed step: the episode ends there, as truncated (not terminal). A failed
    reset raises: there is no observation to go on from."""
    mujoco = sys.modules.get("mujoco")
    data = getattr(env.unwrapped, "data", None)
    counters = []
    if mujoco is not None and isinstance(data, mujoco.MjData):
        counters = [(name, data.warning[getattr(mujoco.mjtWarning, name)]) for name in _MUJOCO_INSTABILITY]
        for _, counter in counters:  # counted per step; the counters are no part of the simulation's state
            counter.number = 0
    try:
        next_obs, reward, terminated, truncated, info = env.step(action)
        unstable = [name for name, counter in counters if counter.number]
        if unstable:
            error = f"MuJoCo found the simulation unstable ({unstable[0][7:]}: Nan, Inf or huge value)"
        elif not np.isfinite(next_obs).all():
            error = f"non-finite observation ({' '.join(str(next_obs).split())})"
        elif not np.isfinite(reward):
            error = f"non-finite reward ({reward})"
        else:
            error = None
            result = EnvStep(next_obs, reward, bool(terminated), bool(truncated),
                             step_success(float(reward), info, sparse_reward))
    except Exception as e:  # any env may raise anything in step
        error = one_line(e)
    if error is not None:
        result = EnvStep(None, 0.0, False, True, error=error)
    if result.terminated or result.truncated:
        try:
            result.reset_obs = reset_env(env)
        except Exception as e:
            raise RuntimeError(f"reset failed ({one_line(e)})") from None
    return result


_SIMULATOR_SKIP = ("spec", "_np_random", "action_space", "observation_space")  # restored apart, or fixed


def is_plain(value: Any) -> bool:
    """Whether a value is plain data a checkpoint stores as it is: numbers, text, numeric arrays that own their
    memory (not views into a simulator), and lists, tuples and text-keyed dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str, np.bool_, np.number)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf" and value.base is None
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def env_state(env: gym.Env) -> Optional[Dict[str, Any]]:
    """Everything that decides the training env's next steps, mid-episode, as plain data (a checkpoint loads it
    without unpickling); None if it cannot be taken.

    Pickling a Gymnasium MuJoCo env does not keep its state (EzPickle rebuilds it from the constructor's
    arguments), so the parts are taken one by one: each wrapper's plain scalars (TimeLimit's elapsed steps,
    ...), the env's and the action space's generators, the env's plain attributes (an AntMaze goal, a classic
    env's state vector) and MuJoCo's full integration state (mj_getState, mjSTATE_INTEGRATION: replays bit for
    bit). An env that is not MuJoCo and keeps other objects cannot be saved.
    """
    base = env.unwrapped
    wrappers = []
    layer = env
    while isinstance(layer, gym.Wrapper):
        wrappers.append({k: v for k, v in vars(layer).items() if type(v) in (bool, int, float)})
        layer = layer.env
    space = env.action_space
    attributes = {k: v for k, v in vars(base).items() if k not in _SIMULATOR_SKIP}
    plain = {k: copy.deepcopy(v) for k, v in attributes.items() if is_plain(v)}
    state: Dict[str, Any] = {"wrappers": wrappers, "np_random": copy.deepcopy(getattr(base, "_np_random", None)),
                             "action_space": copy.deepcopy(getattr(space, "_np_random", None)), "attributes": plain}
    mujoco = sys.modules.get("mujoco")
    if mujoco is not None and isinstance(getattr(base, "data", None), mujoco.MjData):
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(base.model, spec))
        mujoco.mj_getState(base.model, base.data, physics, spec)
        state["mujoco"] = physics
    elif len(plain) < len(attributes):
        return None
    return state


def set_env_state(env: gym.Env, state: Dict[str, Any]) -> None:
    """Puts an env made as the saved one was made into the state env_state took."""
    base = env.unwrapped
    layer = env
    for attributes in state["wrappers"]:
        if not isinstance(layer, gym.Wrapper):
            raise ConfigError("field 'resume': the training env's wrappers differ from the checkpoint's")
        for key, value in attributes.items():
            setattr(layer, key, value)
        layer = layer.env
    vars(base).update(state["attributes"])
    if "mujoco" in state:
        import mujoco

        mujoco.mj_setState(base.model, base.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
    base._np_random = state["np_random"]
    env.action_space._np_random = state["action_space"]


@dataclass
class TrainingEnv:
    """A run's training env and its episode in progress (raw observations). step() steps it (step_env) and keeps
    the step as last_step, (obs, action, reward, next obs, terminated, truncated), or None for a failed step, which
    ends the episode as truncated and is counted: errors_in_a_row failures in a row stop the run (a RunFault), as
    does at once an observation of a shape other than the observation space's (check_shape)."""

    env: gym.Env
    seed: int  # the run's, for messages
    last_good_checkpoint: Callable[[], str] = lambda: ""  # the end of a message that stops the run
    obs: Optional[np.ndarray] = None  # the current observation; None: reset first
    episode_return: float = 0.0
    episode_length: int = 0
    episode_success: bool = False
    last_step: Optional[Tuple[np.ndarray, np.ndarray, Any, np.ndarray, bool, bool]] = None
    errors: int = 0  # failed steps (step_env) ...
    errors_in_a_row: int = 0  # ... and the latest of them in a row

    def new_episode(self, obs: Optional[np.ndarray]) -> None:
        self.obs, self.episode_return, self.episode_length, self.episode_success = obs, 0.0, 0, False

    def fault(self, what: str) -> RunFault:
        return RunFault(f"the training env of seed {self.seed} {what}" + self.last_good_checkpoint())

    def check_shape(self, obs: Optional[np.ndarray], when: str) -> None:
        """A RunFault if an observation's shape is not the one the env's observation space declares (the shape
        the networks and the replay ring were made for): the env changed mid-run, no step of it can be kept."""
        expected = self.env.observation_space.shape
        if obs is not None and np.shape(obs) != expected:
            env_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
            raise self.fault(f"({env_id}) gave an observation of shape {np.shape(obs)} {when}, expected {expected} "
                             f"(its observation space)")

    def reset(self, seed: int) -> None:
        """A new episode, the env and its action space seeded with `seed`."""
        try:
            obs = reset_env(self.env, seed)
        except Exception as e:  # any env may raise anything
            raise self.fault(f"failed: {one_line(e)}") from None
        self.check_shape(obs, f"at its reset with seed {seed}")
        self.new_episode(obs)

    def step(self, action: np.ndarray, sparse_reward: bool, iteration: int, errors_in_a_row: int
             ) -> Tuple[EnvStep, Optional[Tuple[float, int, bool]]]:
        """The step, and the (return, length, success) of the episode it ended (None while the episode goes on)."""
        try:
            result = step_env(self.env, action, sparse_reward)
        except RuntimeError as e:  # the reset after an episode's end
            raise self.fault(f"failed: {e}") from None
        self.check_shape(result.next_obs, f"in iteration {iteration}")
        self.check_shape(result.reset_obs, f"at its reset after iteration {iteration}")
        if result.error is not None:
            self.errors += 1
            self.errors_in_a_row += 1
            if self.errors_in_a_row >= errors_in_a_row:
                raise self.fault(f"failed {self.errors_in_a_row} steps in a row (the last in iteration "
                                 f"{iteration}: {result.error}; env_errors_in_a_row {errors_in_a_row})")
            if self.errors == 1:
                tqdm.write(f"warning: the training env of seed {self.seed} failed in iteration {iteration} "
                           f"({result.error}): the episode ends there as truncated, the step is not stored; "
                           f"later failures are counted in train/env_errors", file=sys.stderr)
            self.last_step = None
        else:
            self.errors_in_a_row = 0
            self.last_step = (self.obs, action, result.reward, result.next_obs, result.terminated, result.truncated)
            self.episode_success = self.episode_success or bool(result.success)
            self.episode_return += float(result.reward)
            self.episode_length += 1
            self.obs = result.next_obs
        if not (result.terminated or result.truncated):
            return result, None
        ended = (self.episode_return, self.episode_length, self.episode_success)
        self.new_episode(result.reset_obs)
        return result, ended
