"""The layout of the code: the finetune script against CORL's finetune script, the two scripts' shared copies,
what imports what, and how large each part may grow.

* initialisation: CORL finetune's scheme (every layer of actor and critics orthogonal with gain
  sqrt(2), zero biases; without orthogonal_init only the output layers change, xavier with gain
  1e-2), in one run and in a seed stack; the offline script keeps CORL offline's scheme;
* evaluation seeded from the run's seed, as CORL's eval_actor(..., seed=config.seed); eval_seed fixes it;
* eval/success_rate only in the online phase, offline_iter / online_iter 0-based;
* the networks and loss machinery that both scripts carry (one file per algorithm variant) are the same text;
  everything else they share lives once in algorithms/common;
* algorithms/common imports no script and has no import cycle; tools/ and scripts/ take their helpers from
  algorithms/common and a script only for its algorithm;
* size budgets of the scripts, the common modules and the copies; both scripts run as a file from any
  directory and as a module.
"""
import ast
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, metrics_rows

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common import evaluation
from algorithms.common.config import ConfigError
from tools.rollouts import random_transitions, write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]
S, A = 7, 3
SQRT2 = math.sqrt(2.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


# ------------------------------------------------------------------ initialisation
def layers(trainer, run=None):
    """(name, W as (fan_out, fan_in), bias, is output layer) of every layer of the actor and of each critic;
    for a stack, of run `run`. The critics' first layer is the combined [s, a] matrix."""
    out = []
    if run is None:
        linears = [m for m in trainer.actor.net if isinstance(m, torch.nn.Linear)]
        actor = [(lin.weight, lin.bias) for lin in linears]
    else:
        actor = [(w[run].T, b[run, 0]) for w, b in zip(trainer.actor.weights, trainer.actor.biases)]
    for i, (w, b) in enumerate(actor):
        out.append((f"actor layer {i}", w.detach(), b.detach(), i == len(actor) - 1))
    n_seeds = 1 if run is None else len(trainer.seeds)
    weights, biases = list(trainer.critic.weights), list(trainer.critic.biases)
    for critic in range(2):
        member = critic * n_seeds + (run or 0)  # critic-major: member c * n_seeds + i is critic c of run i
        for i, (w, b) in enumerate(zip(weights, biases)):
            out.append((f"critic {critic} layer {i}", w[member].T.detach(), b[member, 0].detach(),
                        i == len(weights) - 1))
    return out


def build(module, seeds=None, **overrides):
    torch.manual_seed(0)
    config = module.TrainConfig(q_n_hidden_layers=2, **overrides)
    return module.CQL(config, S, A, 1.0, torch.device("cpu"), seeds=seeds)


def xavier_bound(w, gain):
    fan_out, fan_in = w.shape
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("seeds", [None, [3, 8]], ids=["one run", "stack"])
def test_finetune_orthogonal_init_is_corl_finetune_scheme(seeds):
    trainer = build(finetune_cql, seeds)
    for run in ([None] if seeds is None else range(len(seeds))):
        for name, w, b, _ in layers(trainer, run):
            singular = torch.linalg.svdvals(w.double())
            torch.testing.assert_close(singular, torch.full_like(singular, SQRT2), rtol=0, atol=1e-5, msg=name)
            assert torch.count_nonzero(b) == 0, name
    # The target critics start as copies of the critics.
    for got, want in zip(trainer.target_critic.parameters(), trainer.critic.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("seeds", [None, [3, 8]], ids=["one run", "stack"])
def test_finetune_without_orthogonal_init_changes_only_the_output_layers(seeds):
    trainer = build(finetune_cql, seeds, orthogonal_init=False)
    for run in ([None] if seeds is None else range(len(seeds))):
        for name, w, b, last in layers(trainer, run):
            fan_in = w.shape[1]
            default_bound = 1.0 / math.sqrt(fan_in)  # PyTorch's nn.Linear default, weight and bias
            assert b.abs().max() <= default_bound and torch.count_nonzero(b) == b.numel(), name  # bias untouched
            if last:  # xavier-uniform, gain 1e-2
                assert w.abs().max() <= xavier_bound(w, 1e-2), name
                assert float(w.std()) == pytest.approx(xavier_bound(w, 1e-2) / math.sqrt(3), rel=0.15), name
            else:  # PyTorch's default, not orthogonal
                assert default_bound / 2 < w.abs().max() <= default_bound, name
                singular = torch.linalg.svdvals(w.double())
                assert float(singular.max() / singular.min()) > 1.1, name  # orthogonal: all equal


def test_offline_keeps_corl_offline_scheme():
    """CORL offline: critics orthogonal, gain sqrt(2) inside and 1e-2 at the output, zero biases; the actor
    never orthogonal (CORL does not pass orthogonal_init on): default layers, a 1e-2 xavier output, zero bias."""
    trainer = build(offline_cql)
    for name, w, b, last in layers(trainer):
        if name.startswith("critic"):
            singular = torch.linalg.svdvals(w.double())
            torch.testing.assert_close(singular, torch.full_like(singular, 1e-2 if last else SQRT2),
                                       rtol=1e-5, atol=0, msg=name)
            assert torch.count_nonzero(b) == 0, name
        elif last:
            assert w.abs().max() <= xavier_bound(w, 1e-2) and torch.count_nonzero(b) == 0, name
        else:
            assert w.abs().max() <= 1.0 / math.sqrt(w.shape[1]) and torch.count_nonzero(b) == b.numel(), name


def test_finetune_init_gives_corl_finetune_initial_q_and_log_std_spread():
    """With CORL finetune's init the critics' initial Q values spread by O(0.1-1) and the actor's log-std
    varies across states; CORL offline's 1e-2 output layers keep both nearly constant."""
    gen = torch.Generator().manual_seed(5)
    obs, actions = torch.randn(256, S, generator=gen), torch.rand(256, A, generator=gen) * 2 - 1
    spread = {}
    for label, module in (("finetune", finetune_cql), ("offline", offline_cql)):
        trainer = build(module)
        with torch.no_grad():
            q = trainer.critic(obs, actions)
            log_std = trainer.actor.mean_log_std(obs)[1]
        spread[label] = (float(q.std()), float(log_std.std()))
    assert spread["finetune"][0] > 0.1 and spread["offline"][0] < 0.02, spread
    assert spread["finetune"][1] > 0.1 and spread["offline"][1] < 0.02, spread


# ------------------------------------------------------------------ evaluation seeding
class SeedEchoEnv(gym.Env):
    """One-step episodes whose reward is a draw of the env's random generator at reset: an episode's
    return tells which seed its reset had."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.start = float(self.np_random.uniform())
        return np.array([self.start]), {}

    def step(self, action):
        return np.array([self.start]), self.start, True, False, {}


ECHO_ENV = "SeedEchoParityTest-v0"
if ECHO_ENV not in gym.registry:
    gym.register(ECHO_ENV, entry_point=SeedEchoEnv, max_episode_steps=5)


def echo_return(seed: int, n_episodes: int) -> float:
    """The mean return of episodes seeded seed, seed + 1, ...: what CORL's seeding gives here."""
    return float(np.mean([gym.utils.seeding.np_random(seed + i)[0].uniform() for i in range(n_episodes)]))


def eval_means(summary_or_dir):
    rows = metrics_rows(summary_or_dir)
    return [r["eval_return_mean"] for r in rows if "eval_return_mean" in r]


def echo_run(tmp_path, *extra):
    config = finetune_cql.parse_config([f"--env={ECHO_ENV}", "--offline_iterations=0", "--online_iterations=8",
                                        "--warmup_steps=8", "--eval_freq=4", "--log_freq=4", "--n_episodes=3",
                                        "--cql_alpha_online=0", "--batch_size=4", "--wandb_mode=disabled",
                                        f"--log_dir={tmp_path}", *extra])
    return finetune_cql.train(config)


def test_evaluation_is_seeded_from_the_run_seed_as_corl(tmp_path):
    one = echo_run(tmp_path / "one", "--seed=5")
    assert eval_means(one["run_dir"]) == pytest.approx([echo_return(5, 3)] * 2)  # each evaluation: the same starts
    echo_run(tmp_path / "stack", "--seeds=0,1")
    dirs = sorted(Path(tmp_path / "stack").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    assert [eval_means(d) for d in dirs] == [pytest.approx([echo_return(s, 3)] * 2) for s in (0, 1)]
    assert echo_return(0, 3) != pytest.approx(echo_return(1, 3))  # runs of different seeds: different starts


def test_eval_seed_fixes_the_episodes_of_every_run(tmp_path):
    echo_run(tmp_path, "--seeds=0,1", "--eval_seed=9")
    for run_dir in Path(tmp_path).iterdir():
        assert eval_means(run_dir) == pytest.approx([echo_return(9, 3)] * 2)


# ------------------------------------------------------------------ success rate online only, 0-based counters
class ScriptedGoalEnv(gym.Env):
    """Observation [step, episode]; episode k of this instance ends by a known pattern: k % 3 == 0 terminates at
    step 5 with info['success'] True (at that step only); k % 3 == 1 never terminates (the registered time limit
    of 8 truncates it); k % 3 == 2 terminates at step 3. Raw reward: 0.1 * step. (tests/finetune/test_finetune.py
    has the same task.)"""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode, self.t = -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return np.array([0.0, self.episode]), {}

    def step(self, action):
        self.t += 1
        kind = self.episode % 3
        terminated = (kind == 0 and self.t == 5) or (kind == 2 and self.t == 3)
        info = {"success": kind == 0 and self.t == 5}
        return np.array([float(self.t), self.episode]), 0.1 * self.t, terminated, False, info


GOAL_ENV = "ScriptedGoalLayoutTest-v0"
if GOAL_ENV not in gym.registry:
    gym.register(GOAL_ENV, entry_point=ScriptedGoalEnv, max_episode_steps=8)


def test_success_rate_is_logged_in_the_online_phase_only(tmp_path):
    arrays = random_transitions(GOAL_ENV, 64, seed=0)
    path = write_d4rl_hdf5(tmp_path / "goal.hdf5", arrays, {"env_id": GOAL_ENV})
    config = finetune_cql.parse_config([f"--env={path}", "--offline_iterations=16", "--online_iterations=16",
                                        "--eval_freq=8", "--log_freq=8", "--n_episodes=2", "--batch_size=8",
                                        "--cql_n_actions=2", "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
    summary = finetune_cql.train(config)
    rows = metrics_rows(summary["run_dir"])
    evals = [r for r in rows if "eval_return_mean" in r]
    assert [r["step"] for r in evals] == [8, 16, 24, 32]
    assert ["eval/success_rate" in r for r in evals] == [False, False, True, True]
    assert ["eval/regret" in r for r in evals] == [False, False, True, True]
    assert [r.get("offline_iter", r.get("online_iter")) for r in evals] == [7, 15, 7, 15]
    assert any("train/is_success" in r for r in rows)  # a goal task: training episodes report success


# ------------------------------------------------------------------ the two scripts' shared copies
SCRIPTS = {"offline": ROOT / "algorithms/offline/cql.py", "finetune": ROOT / "algorithms/finetune/cql.py"}


def definitions(path: Path) -> dict:
    """name -> source (with its decorators) of every top-level function, class and assignment, and of every
    method (Class.method)."""
    text = path.read_text()
    lines = text.splitlines()

    def source(node) -> str:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(lines[first - 1:node.end_lineno])

    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = source(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = source(node)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = source(item)
    return out


# Copied on purpose (one file per algorithm variant, read top to bottom) and meant to stay the same text: the
# networks and the loss machinery around them, and the scripts' one-line main. Everything else the two scripts
# share is in algorithms/common, once. (The byte-identical definitions of 2026-12, found with the ast; parse_config
# is each script's own wrapper: finetune's also names the fields it no longer has.)
SHARED = [
    "TanhGaussianActor", "ActorStack.__init__", "ActorStack.mean_log_std", "ActorStack.member", "EnsembleCritic",
    "METRIC_NAMES", "CQL.draw_noise", "CQL.fuse_critic_layers", "CQL.update_step", "CQL.update_target",
    "CQL.parameters_finite", "CQL.load_state_dict", "CQL._run_layout", "CQL.load_run_state_dicts", "main",
]


def identical_definitions() -> list:
    """The definitions that are the same text in both scripts; a method of an identical class is not listed
    apart (it is part of its class)."""
    offline, finetune = definitions(SCRIPTS["offline"]), definitions(SCRIPTS["finetune"])
    same = {name for name in offline if finetune.get(name) == offline[name]}
    return sorted(name for name in same if name.split(".")[0] == name or name.split(".")[0] not in same)


def test_shared_definitions_are_identical_copies():
    offline, finetune = definitions(SCRIPTS["offline"]), definitions(SCRIPTS["finetune"])
    for name in SHARED:
        assert name in offline and name in finetune, name
        assert offline[name] == finetune[name], f"{name} differs between the two scripts"
    # No other copy: a definition both scripts need belongs in algorithms/common (or, if it is CQL, in SHARED).
    assert identical_definitions() == sorted(SHARED), "a new copy in both scripts: move it to algorithms/common"
    # Deliberately different: each script's init_linear is its CORL script's scheme.
    assert offline["init_linear"] != finetune["init_linear"]


# ------------------------------------------------------------------ what imports what
COMMON = ROOT / "algorithms/common"


def imported_modules(path: Path) -> set:
    """Every module path.py imports (`import a.b`: a.b; `from a.b import c`: a.b and a.b.c, as c may be a module),
    at any depth of the file (imports inside functions too); relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_common_imports_no_script_and_has_no_import_cycle():
    modules = {f"algorithms.common.{p.stem}": p for p in sorted(COMMON.glob("*.py")) if p.stem != "__init__"}
    assert set(modules) >= {f"algorithms.common.{m}" for m in ("config", "data", "runs", "evaluation", "fast",
                                                               "envs")}
    graph = {}
    for name, path in modules.items():
        imports = imported_modules(path)
        scripts = sorted(m for m in imports if m.startswith(("algorithms.offline", "algorithms.finetune")))
        assert not scripts, f"{name} imports a script: {scripts}"
        graph[name] = {m for m in imports if m in modules and m != name}
    done, path = set(), []

    def visit(module: str) -> None:  # depth first: a module met again on the current path closes a cycle
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def common_names() -> set:
    """The top-level names that algorithms/common's modules define (what a tool may take from there)."""
    return {name.split(".")[0] for p in COMMON.glob("*.py") for name in definitions(p)}


def script_uses(path: Path) -> dict:
    """alias -> attribute names that path.py takes from a script it imports (`import algorithms.finetune.cql as
    finetune`: finetune.X), and the names it imports from a script directly (alias "")."""
    tree = ast.parse(path.read_text())
    aliases, uses = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(("algorithms.offline", "algorithms.finetune")):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("algorithms.offline",
                                                                                  "algorithms.finetune")):
            uses.setdefault("", set()).update(alias.name for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.setdefault(node.value.id, set()).add(node.attr)
    return uses


@pytest.mark.parametrize("path", sorted([*ROOT.glob("tools/*.py"), *ROOT.glob("scripts/*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_take_helpers_from_common_and_a_script_only_for_its_algorithm(path):
    helpers = common_names()
    for alias, names in script_uses(path).items():
        taken = sorted(names & helpers)
        assert not taken, f"{path.name} takes {taken} from a script ({alias or 'from-import'}): take them from " \
                          f"algorithms.common"


def test_make_dataset_takes_its_helpers_from_common():
    """tools/make_dataset.py drives the finetune script's train() (the learner is SAC through it), and takes the
    config parsing, limits, atomic writes, checkpoint files, device, score and env helpers from algorithms.common."""
    path = ROOT / "tools/make_dataset.py"
    tree = ast.parse(path.read_text())
    common_aliases, from_common = set(), set()  # `from algorithms.common import config as strict`; `from ... import x`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("algorithms.common"):
            for alias in node.names:
                if node.module == "algorithms.common":  # a module of it
                    common_aliases.add(alias.asname or alias.name)
                else:
                    from_common.add(alias.name)
        elif isinstance(node, ast.Import):
            common_aliases.update(a.asname for a in node.names if a.name.startswith("algorithms.common") and a.asname)
    via_alias = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id in common_aliases}
    taken = from_common | via_alias
    for name in ("parse_config", "ConfigError", "MAX_STEPS", "write_atomic", "checkpoint_files", "resolve_device",
                 "normalized_score", "action_bound", "is_gym_id"):
        assert name in taken, f"tools/make_dataset.py does not take {name} from algorithms.common"
    from_finetune = script_uses(path).get("finetune", set())
    assert "train" in from_finetune  # the learner
    assert not from_finetune & (taken | common_names()), sorted(from_finetune & (taken | common_names()))


# ------------------------------------------------------------------ budgets
BUDGETS = {"algorithms/offline/cql.py": 1000, "algorithms/finetune/cql.py": 1500}
COMMON_MODULE_BUDGET = 700  # lines of each algorithms/common module
SHARED_BUDGET = 400  # lines of the definitions both scripts carry as the same text, counted once


def test_line_budgets():
    over = {}
    for relative, budget in BUDGETS.items():
        lines = len((ROOT / relative).read_text().splitlines())
        if lines > budget:
            over[relative] = (lines, budget)
    for path in sorted(COMMON.glob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > COMMON_MODULE_BUDGET:
            over[str(path.relative_to(ROOT))] = (lines, COMMON_MODULE_BUDGET)
    assert not over, f"over budget (lines, budget): {over}"
    offline = definitions(SCRIPTS["offline"])
    shared = sum(len(offline[name].splitlines()) for name in identical_definitions())
    assert shared <= SHARED_BUDGET, f"{shared} lines are copied in both scripts (budget {SHARED_BUDGET})"


# ------------------------------------------------------------------ both scripts run as a file and as a module
@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_scripts_run_as_a_file_from_another_directory_and_as_a_module(script, tmp_path):
    env = {k: v for k, v in CHILD_ENV.items() if k != "PYTHONPATH"}  # the file finds its repository by itself
    runs = {"file": ([sys.executable, str(SCRIPTS[script]), "--help"], tmp_path),  # side by side: --help takes
            "module": ([sys.executable, "-m", f"algorithms.{script}.cql", "--help"], ROOT)}  # seconds of imports
    children = {how: subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for how, (argv, cwd) in runs.items()}
    outputs = {how: child.communicate(timeout=300) for how, child in children.items()}  # (stdout, stderr)
    for how, (out, err) in outputs.items():
        assert children[how].returncode == 0, (how, err[-2000:])
        assert "usage:" in out and "--config_path" in out, (how, out[-2000:])
        assert "--seeds" in out and "--env" in out, how
        assert "runs in one process" in out, how  # the field comments: pyrallis's help page
    assert ("--offline_iterations" in outputs["file"][0]) == (script == "finetune")
    assert outputs["file"][0] == outputs["module"][0]


@pytest.mark.parametrize("module", [offline_cql, finetune_cql], ids=["offline", "finetune"])
def test_equal_episode_returns_with_normalize_reward_is_a_one_line_dataset_error(module, tmp_path, capsys):
    arrays = random_transitions("Hopper-v4", 300, seed=1, max_episode_steps=50)
    arrays["rewards"][:] = 0.0  # every episode returns 0: no return range to rescale by
    path = write_d4rl_hdf5(tmp_path / "flat.hdf5", arrays, {"env_id": "Hopper-v4"})
    with pytest.raises(SystemExit) as stop:
        module.main([f"--env={path}", "--normalize_reward=true", "--wandb_mode=disabled", f"--log_dir={tmp_path}",
                     "--batch_size=8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "every episode has return 0.0" in err and "normalize_reward false" in err, err


def test_background_evaluation_of_an_env_without_a_spec_is_a_config_error():
    """The common Evaluator (both scripts build theirs from it)."""
    env = SeedEchoEnv()  # built directly: no spec to rebuild it from in a worker process
    actor = offline_cql.TanhGaussianActor(1, 1, 1.0)
    with pytest.raises(ConfigError, match="field 'background_eval': the eval env has no Gymnasium spec"):
        evaluation.Evaluator(env, SeedEchoEnv, 2, offline_cql.evaluate, (0, np.zeros(1), np.ones(1)), actor, True)
