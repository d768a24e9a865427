"""Checks the CQL YAML configs under configs/ (GitHub issue 4).

* every config parses with the script it belongs to, and lists only fields of that script's
  TrainConfig, each with a value of the field's type;
* every ``env`` is a known D4RL dataset, the Minari port of one, or a dataset file shipped in the
  repository (configs/offline/cql/quickstart.yaml, made by tools/make_dataset.py);
* a sample of configs carries CORL's published hyperparameters (values written out below,
  taken from corl-team/CORL configs/{offline,finetune}/cql/...);
* every ``*_minari.yaml`` has exactly the hyperparameters of its D4RL twin, and every
  ``<task>/<level>_v0_minari.yaml`` (Minari's MuJoCo locomotion data, no D4RL twin) those of CORL's
  config of the nearest D4RL level (simple, medium -> medium; expert -> expert).
"""

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import pytest
import yaml

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common import data
from algorithms.common.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG_ROOTS = {
    "offline": REPO / "configs" / "offline" / "cql",
    "finetune": REPO / "configs" / "finetune" / "cql",
}
MODULES = {"offline": offline_cql, "finetune": finetune_cql}
INF = math.inf

# --------------------------------------------------------------------------------------
# What should be there: CORL's CQL benchmark, plus a Minari twin for antmaze/maze2d/adroit.
# --------------------------------------------------------------------------------------
LOCOMOTION = ["halfcheetah", "hopper", "walker2d"]
LOCOMOTION_SETS = ["random", "medium", "medium_replay", "medium_expert", "expert", "full_replay"]
ANTMAZE_SETS = ["umaze", "umaze_diverse", "medium_play", "medium_diverse", "large_play", "large_diverse"]
MAZE2D_SETS = ["umaze", "medium", "large", "umaze_dense", "medium_dense", "large_dense"]
ADROIT = ["pen", "door", "hammer", "relocate"]
ADROIT_SETS = ["human", "cloned", "expert"]
# Minari's mujoco/<task>/<level>-v0 and the D4RL level whose CORL hyperparameters they take: simple and
# medium are each the rollouts of one partly trained policy, as D4RL's medium is; expert is expert.
# Ant: CORL has no CQL config for it; halfcheetah's are its shared locomotion values.
MUJOCO_MINARI_TASKS = ["halfcheetah", "hopper", "walker2d", "ant"]
MUJOCO_MINARI_NEAREST = {"simple": "medium", "medium": "medium", "expert": "expert"}
MUJOCO_MINARI_IDS = {f"mujoco/{t}/{level}-v0" for t in MUJOCO_MINARI_TASKS for level in MUJOCO_MINARI_NEAREST}


def _expected_files():
    offline = {f"{t}/{d}_v2.yaml" for t in LOCOMOTION for d in LOCOMOTION_SETS}
    with_minari = (
        [f"antmaze/{d}_v2" for d in ANTMAZE_SETS]
        + [f"maze2d/{d}_v1" for d in MAZE2D_SETS]
        + [f"{t}/{d}_v1" for t in ADROIT for d in ADROIT_SETS]
    )
    offline |= {f"{stem}{suffix}.yaml" for stem in with_minari for suffix in ("", "_minari")}
    finetune_stems = [f"antmaze/{d}_v2" for d in ANTMAZE_SETS] + [f"{t}/cloned_v1" for t in ADROIT]
    finetune = {f"{stem}{suffix}.yaml" for stem in finetune_stems for suffix in ("", "_minari")}
    offline |= {f"{t}/{level}_v0_minari.yaml" for t in MUJOCO_MINARI_TASKS for level in MUJOCO_MINARI_NEAREST}
    offline.add("quickstart.yaml")  # the shipped dataset made by tools/make_dataset.py (issue 5)
    return {"offline": offline, "finetune": finetune}


EXPECTED_FILES = _expected_files()

# Episode limit of each Minari dataset's (evaluation) environment: AntMaze_UMaze-v4 700,
# AntMaze_Medium/Large-v4 1000, PointMaze_UMaze/Medium/Large-v3 300/600/800,
# AdroitHandPen-v1 100 (as recorded in the Minari datasets), Door/Hammer/Relocate 200.
MINARI_EPISODE_STEPS = {
    "D4RL/antmaze/umaze-v1": 700,
    "D4RL/antmaze/umaze-diverse-v1": 700,
    "D4RL/antmaze/medium-play-v1": 1000,
    "D4RL/antmaze/medium-diverse-v1": 1000,
    "D4RL/antmaze/large-play-v1": 1000,
    "D4RL/antmaze/large-diverse-v1": 1000,
    "D4RL/pointmaze/umaze-v2": 300,
    "D4RL/pointmaze/medium-v2": 600,
    "D4RL/pointmaze/large-v2": 800,
    "D4RL/pointmaze/umaze-dense-v2": 300,
    "D4RL/pointmaze/medium-dense-v2": 600,
    "D4RL/pointmaze/large-dense-v2": 800,
    **{f"D4RL/pen/{d}-v2": 100 for d in ADROIT_SETS},
    **{f"D4RL/{t}/{d}-v2": 200 for t in ("door", "hammer", "relocate") for d in ADROIT_SETS},
    **{dataset: 1000 for dataset in MUJOCO_MINARI_IDS},  # Gymnasium's v5 locomotion envs
}


def _all_configs():
    found = []
    for kind, root in CONFIG_ROOTS.items():
        for path in sorted(root.rglob("*.yaml")):
            found.append(pytest.param(kind, path, id=f"{kind}/{path.relative_to(root)}"))
    return found


ALL_CONFIGS = _all_configs()
MINARI_CONFIGS = [p for p in ALL_CONFIGS if p.values[1].stem.endswith("_minari")
                  and not p.values[1].stem.endswith("_v0_minari")]
MUJOCO_MINARI_CONFIGS = [p for p in ALL_CONFIGS if p.values[1].stem.endswith("_v0_minari")]


def _load(path: Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def _field_types(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def _split_optional(annotation):
    """(base type, whether None is allowed) for X, Optional[X] and X | None."""
    union_types = (typing.Union,) + ((types.UnionType,) if hasattr(types, "UnionType") else ())
    if typing.get_origin(annotation) in union_types:
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return annotation, False


def _type_problem(value, annotation):
    """None if a YAML value fits a field's annotation, else a description of the mismatch."""
    base, optional = _split_optional(annotation)
    if value is None:
        return None if optional else "None for a non-Optional field"
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    else:
        return f"field type {annotation} is not a scalar a config can set"
    return None if ok else f"{type(value).__name__} {value!r} for a {base.__name__} field"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


# --------------------------------------------------------------------------------------
# 0. inventory
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["offline", "finetune"])
def test_config_inventory(kind):
    root = CONFIG_ROOTS[kind]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}
    missing = sorted(EXPECTED_FILES[kind] - present)
    extra = sorted(present - EXPECTED_FILES[kind])
    assert not missing and not extra, f"missing: {missing}; unexpected: {extra}"


# --------------------------------------------------------------------------------------
# 1. every config parses, and lists only TrainConfig fields with values of their types
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path", ALL_CONFIGS)
def test_config_parses(kind, path):
    module = MODULES[kind]
    config = module.parse_config(["--config_path", str(path)])
    assert isinstance(config, module.TrainConfig)
    for key, value in _load(path).items():
        if key == "name":  # a script may decorate the run name; the rest must arrive unchanged
            continue
        assert _same(getattr(config, key), value), f"{key}: parsed {getattr(config, key)!r}, file {value!r}"


@pytest.mark.parametrize("kind,path", ALL_CONFIGS)
def test_config_keys_and_types(kind, path):
    fields = _field_types(MODULES[kind].TrainConfig)
    data = _load(path)
    unknown = sorted(set(data) - set(fields))
    assert not unknown, f"keys that TrainConfig does not have: {unknown}"
    problems = {k: _type_problem(v, fields[k]) for k, v in data.items()}
    problems = {k: p for k, p in problems.items() if p is not None}
    assert not problems, problems


@pytest.mark.parametrize("kind,path", ALL_CONFIGS)
def test_config_leaves_machine_settings_to_the_script(kind, path):
    data = _load(path)
    assert "device" not in data and "checkpoints_path" not in data


# --------------------------------------------------------------------------------------
# 2. every env is a D4RL dataset with sane reference scores, or the Minari port of one
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path", ALL_CONFIGS)
def test_env_resolves(kind, path):
    env = _load(path)["env"]
    if env.endswith(".hdf5"):  # a dataset shipped in the repository (the quickstart)
        assert (REPO / env).is_file(), f"{env}: not in the repository"
    elif env in data.D4RL_DATASETS:
        url, ref_min, ref_max = data.D4RL_DATASETS[env]
        assert url.startswith("http") and url.endswith(".hdf5")
        assert math.isfinite(ref_min) and math.isfinite(ref_max) and ref_max > ref_min
        assert not path.stem.endswith("_minari"), "a *_minari.yaml must name a Minari dataset"
    else:
        assert env in set(data.MINARI_EQUIVALENTS.values()) | MUJOCO_MINARI_IDS, f"{env!r} is neither D4RL nor Minari"
        assert path.stem.endswith("_minari"), "a Minari dataset belongs in a *_minari.yaml"


# --------------------------------------------------------------------------------------
# 3. CORL's published hyperparameters (corl-team/CORL configs/.../cql/...), written out
# --------------------------------------------------------------------------------------
_SHARED = dict(
    seed=0, batch_size=256, buffer_size=10_000_000, discount=0.99, alpha_multiplier=1.0,
    use_automatic_entropy_tuning=True, backup_entropy=False, qf_lr=3e-4,
    soft_target_update_rate=5e-3, target_update_period=1, cql_n_actions=10,
    cql_importance_sample=True, cql_temp=1.0, cql_clip_diff_max=INF, orthogonal_init=True,
    bc_steps=0, project="CORL", load_model="",
)
PUBLISHED = [
    (
        "offline", "hopper/medium_v2.yaml",
        dict(_SHARED, env="hopper-medium-v2", group="cql-hopper-medium-v2-multiseed-v0",
             cql_alpha=10.0, policy_lr=3e-5, q_n_hidden_layers=3, reward_scale=1.0,
             reward_bias=0.0, normalize=True, normalize_reward=True, cql_lagrange=False,
             cql_target_action_gap=-1.0, max_timesteps=1_000_000, cql_max_target_backup=False,
             cql_clip_diff_min=-INF, n_episodes=10, eval_freq=5_000),
    ),
    (  # Minari's simple level takes CORL's hopper-medium-v2 values (normalize_reward on)
        "offline", "hopper/simple_v0_minari.yaml",
        dict(_SHARED, env="mujoco/hopper/simple-v0", group="cql-mujoco-hopper-simple-v0-multiseed-v0",
             cql_alpha=10.0, policy_lr=3e-5, q_n_hidden_layers=3, reward_scale=1.0,
             reward_bias=0.0, normalize=True, normalize_reward=True, cql_lagrange=False,
             cql_target_action_gap=-1.0, max_timesteps=1_000_000, cql_max_target_backup=False,
             cql_clip_diff_min=-INF, n_episodes=10, eval_freq=5_000, max_episode_steps=1000),
    ),
    (  # CORL's walker2d-expert-v2 values
        "offline", "walker2d/expert_v0_minari.yaml",
        dict(_SHARED, env="mujoco/walker2d/expert-v0", group="cql-mujoco-walker2d-expert-v0-multiseed-v0",
             cql_alpha=10.0, policy_lr=3e-5, q_n_hidden_layers=3, reward_scale=1.0,
             reward_bias=0.0, normalize=True, normalize_reward=False, cql_lagrange=False,
             cql_target_action_gap=-1.0, max_timesteps=1_000_000, cql_max_target_backup=False,
             cql_clip_diff_min=-INF, n_episodes=10, eval_freq=5_000, max_episode_steps=1000),
    ),
    (
        "offline", "antmaze/umaze_v2.yaml",
        dict(_SHARED, env="antmaze-umaze-v2", group="cql-antmaze-umaze-v2-multiseed-v0",
             cql_alpha=5.0, policy_lr=1e-4, q_n_hidden_layers=5, reward_scale=10.0,
             reward_bias=-5.0, normalize=False, normalize_reward=True, cql_lagrange=True,
             cql_target_action_gap=0.8, max_timesteps=1_000_000, cql_max_target_backup=True,
             cql_clip_diff_min=-200.0, n_episodes=100, eval_freq=50_000),
    ),
    (
        "finetune", "antmaze/umaze_v2.yaml",
        dict(_SHARED, env="antmaze-umaze-v2", group="cql-antmaze-umaze-v2-multiseed-v0",
             cql_alpha=5.0, cql_alpha_online=5.0, policy_lr=1e-4, q_n_hidden_layers=5,
             reward_scale=10.0, reward_bias=-5.0, normalize=False, normalize_reward=True,
             cql_lagrange=True, cql_target_action_gap=0.8, offline_iterations=1_000_000,
             online_iterations=1_000_000, cql_max_target_backup=True, cql_clip_diff_min=-200.0,
             n_episodes=100, eval_freq=50_000),
    ),
    (
        "offline", "pen/cloned_v1.yaml",
        dict(_SHARED, env="pen-cloned-v1", group="cql-pen-cloned-v1-multiseed-v0",
             cql_alpha=1.0, policy_lr=1e-4, q_n_hidden_layers=3, reward_scale=1.0,
             reward_bias=0.0, normalize=True, normalize_reward=False, cql_lagrange=False,
             cql_target_action_gap=-1.0, max_timesteps=1_000_000, cql_max_target_backup=False,
             cql_clip_diff_min=-INF, n_episodes=10, eval_freq=5_000),
    ),
    (
        "finetune", "pen/cloned_v1.yaml",
        dict(_SHARED, env="pen-cloned-v1", group="cql-pen-cloned-v1-multiseed-v0",
             cql_alpha=1.0, cql_alpha_online=1.0, policy_lr=1e-4, q_n_hidden_layers=3,
             reward_scale=1.0, reward_bias=0.0, normalize=False, normalize_reward=False,
             cql_lagrange=False, cql_target_action_gap=0.8, offline_iterations=1_000_000,
             online_iterations=1_000_000, cql_max_target_backup=True, cql_clip_diff_min=-200.0,
             n_episodes=10, eval_freq=5_000),
    ),
    (
        "offline", "maze2d/umaze_v1.yaml",
        dict(_SHARED, env="maze2d-umaze-v1", group="cql-maze2d-umaze-v1-multiseed-v0",
             cql_alpha=10.0, policy_lr=3e-5, q_n_hidden_layers=3, reward_scale=1.0,
             reward_bias=0.0, normalize=True, normalize_reward=False, cql_lagrange=True,
             cql_target_action_gap=5.0, max_timesteps=1_000_000, cql_max_target_backup=False,
             cql_clip_diff_min=-INF, n_episodes=100, eval_freq=5_000),
    ),
]


@pytest.mark.parametrize(
    "kind,relpath,expected", [pytest.param(*p, id=f"{p[0]}/{p[1]}") for p in PUBLISHED]
)
def test_published_hyperparameters(kind, relpath, expected):
    path = CONFIG_ROOTS[kind] / relpath
    data = _load(path)
    config = MODULES[kind].parse_config(["--config_path", str(path)])
    assert data.get("name") == "CQL"
    for key, want in expected.items():
        assert key in data, f"{relpath}: {key} is not set"
        assert _same(data[key], want), f"{relpath}: {key} = {data[key]!r}, CORL has {want!r}"
        assert _same(getattr(config, key), want), f"{relpath}: parsed {key} = {getattr(config, key)!r}"


# --------------------------------------------------------------------------------------
# 4. Minari variants: same hyperparameters as the D4RL twin, Minari env, episode limit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path", MINARI_CONFIGS)
def test_minari_variant_matches_d4rl_twin(kind, path):
    twin_path = path.with_name(path.stem[: -len("_minari")] + ".yaml")
    assert twin_path.exists(), f"no D4RL twin {twin_path.name}"
    minari, d4rl = _load(path), _load(twin_path)

    assert minari["env"] == data.MINARI_EQUIVALENTS[d4rl["env"]]
    assert minari.get("max_episode_steps") == MINARI_EPISODE_STEPS[minari["env"]]

    ignored = {"env", "max_episode_steps"}
    assert set(minari) - ignored == set(d4rl) - ignored
    differing = {k: (minari[k], d4rl[k]) for k in set(minari) - ignored if not _same(minari[k], d4rl[k])}
    assert not differing, differing


@pytest.mark.parametrize("kind,path", MUJOCO_MINARI_CONFIGS)
def test_mujoco_minari_config_has_the_nearest_d4rl_levels_hyperparameters(kind, path):
    task, level = path.parent.name, path.stem[: -len("_v0_minari")]
    twin_task = task if task != "ant" else "halfcheetah"
    nearest = CONFIG_ROOTS[kind] / twin_task / f"{MUJOCO_MINARI_NEAREST[level]}_v2.yaml"
    minari, d4rl = _load(path), _load(nearest)
    assert minari["env"] == f"mujoco/{task}/{level}-v0"
    assert minari["group"] == f"cql-mujoco-{task}-{level}-v0-multiseed-v0"
    assert minari.get("max_episode_steps") == MINARI_EPISODE_STEPS[minari["env"]]
    ignored = {"env", "group", "max_episode_steps"}
    assert set(minari) - ignored == set(d4rl) - ignored
    differing = {k: (minari[k], d4rl[k]) for k in set(minari) - ignored if not _same(minari[k], d4rl[k])}
    assert not differing, differing


# --------------------------------------------------------------------------------------
# 5. parse_config is strict, so the checks above mean something. The parsing is algorithms/common/config.py's,
#    one for both scripts: these run once, through the offline script's TrainConfig and checks; each script's
#    wiring (its parse_config and main) is checked once at the end.
# --------------------------------------------------------------------------------------
parse_config = offline_cql.parse_config  # strict.parse_config(argv, offline TrainConfig, offline check_config)


@pytest.mark.parametrize(
    "key,value",
    [("no_such_field", 1), ("cql_alpha", "ten"), ("normalize", "maybe"), ("q_n_hidden_layers", 2.5)],
)
def test_parse_config_rejects_bad_keys_and_types(key, value, tmp_path):
    data = _load(CONFIG_ROOTS["offline"] / "antmaze" / "umaze_v2.yaml")
    data[key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        parse_config(["--config_path", str(bad)])
    message = str(info.value).strip()
    assert message and "\n" not in message


# One typing rule for both sources: a command-line value is read as YAML reads a scalar.
ERROR = "a one-line ConfigError"
SAME_EITHER_WAY = [  # (field, text on the command line or in a YAML file, the value both give, or ERROR)
    ("normalize", "yes", True), ("normalize", "off", False), ("normalize", "1", ERROR), ("normalize", "maybe", ERROR),
    ("batch_size", "1_000", 1000), ("batch_size", "1e3", 1000), ("batch_size", "2.5", ERROR),
    ("batch_size", "1e400", ERROR), ("batch_size", "true", ERROR),
    ("discount", "0.9", 0.9), ("discount", "1", 1.0), ("cql_clip_diff_max", ".inf", math.inf),
    ("cql_clip_diff_max", "inf", math.inf), ("qf_lr", "3e-4", 3e-4), ("qf_lr", "nan", ERROR), ("qf_lr", ".nan", ERROR),
    ("checkpoint_freq", "null", None), ("checkpoint_freq", "~", None), ("checkpoint_freq", "none", None),
    ("name", "null", ERROR), ("load_model", "None", ERROR),
]


@pytest.mark.parametrize("key,text,expected", SAME_EITHER_WAY, ids=[f"{k}={t}" for k, t, _ in SAME_EITHER_WAY])
def test_command_line_values_are_typed_as_yaml_types_them(key, text, expected, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{key}: {text}\n")
    for argv in ([f"--{key}={text}"], ["--config_path", str(yaml_file)]):
        if expected == ERROR:
            with pytest.raises(ConfigError, match=f"field '{key}' expects") as info:
                parse_config(argv)
            assert "\n" not in str(info.value), argv
        else:
            value = getattr(parse_config(argv), key)
            assert value == expected and type(value) is type(expected), (argv, value)


def test_a_string_field_keeps_command_line_text(tmp_path):
    """--name=5 is the name "5"; in a YAML file `name: 5` is a number, which a string field refuses."""
    assert parse_config(["--name=5"]).name == "5"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: 5\n")
    with pytest.raises(ConfigError, match="field 'name' expects a string, got 5"):
        parse_config(["--config_path", str(yaml_file)])


# YAML that is valid but ambiguous or of the wrong kind: a one-line ConfigError naming the file (and the key).
BAD_YAML = [  # (what, file contents, expected message after "config file <path>: ")
    ("key twice", "batch_size: 8\nseed: 1\nbatch_size: 16\n", r"key 'batch_size' given twice \(lines 1 and 3\)"),
    ("key twice in a flow mapping", "{seed: 1, seed: 2}\n", r"key 'seed' given twice \(lines 1 and 1\)"),
    ("key merged and set again", "<<: {batch_size: 8}\nbatch_size: 16\n",
     r"key 'batch_size' given twice \(lines 1 and 2\)"),
    ("key twice in a nested mapping", "name: {a: 1, a: 2}\n", r"key 'a' given twice \(lines 1 and 1\)"),
    ("two documents", "seed: 1\n---\nseed: 2\n", r"not valid YAML \(expected a single document in the stream\)"),
    ("python tag", "name: !!python/object:os.system {}\n", r"not valid YAML \(could not determine a constructor"),
    ("tab indentation", "seed:\t1\n\tbatch_size: 2\n", r"not valid YAML \("),
    ("not UTF-8", b"name: caf\xe9\n", r"not UTF-8 text \(byte 9\)"),
    ("integer key", "1: x\n", r"unknown key '1'"),
    ("null key", "null: x\n", r"unknown key 'None'"),
    ("unhashable key", "? [a]\n: 1\n", r"not valid YAML \(while constructing a mapping\)"),
    ("mapping for a string", "name: {a: 1}\n", r"field 'name' expects a string, got \{'a': 1\}"),
    ("list for an integer", "batch_size: [8]\n", r"field 'batch_size' expects an integer, got \[8\]"),
    ("date for an integer", "seed: 2020-01-01\n", r"field 'seed' expects an integer, got datetime.date"),
    ("binary for a string", "name: !!binary aGVsbG8=\n", r"field 'name' expects a string, got b'hello'"),
    ("NUL in a string", 'log_dir: "runs\\0x"\n', r"field 'log_dir' expects a string without NUL characters"),
    ("infinite float", "qf_lr: .inf\n", r"field 'qf_lr' expects a finite number within float32's range"),
    ("integer past int64", f"batch_size: {2**64}\n", r"field 'batch_size' must be at most 1048576"),
]


@pytest.mark.parametrize("what,text,message", BAD_YAML, ids=[b[0] for b in BAD_YAML])
def test_bad_yaml_is_a_one_line_error_naming_the_file(what, text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        parse_config(["--config_path", str(path)])
    error = str(info.value)
    assert "\n" not in error and re.search(message, error), error
    assert error.startswith(f"config file {path}: ") or "must be at most" in error, error  # limits: after parsing


def test_yaml_merges_without_a_repeat_are_read(tmp_path):
    """A merge of a mapping written in place is YAML that means one thing: read as SafeLoader reads it. (Anchors
    and aliases are refused: tests/common/test_config_hostile.py.)"""
    path = tmp_path / "c.yaml"
    path.write_text("\ufeff<<: {batch_size: 8}\nseed: 3\nbc_steps: 3\n")  # with a byte order mark
    config = parse_config(["--config_path", str(path)])
    assert config.batch_size == 8 and config.seed == 3 and config.bc_steps == 3


@pytest.mark.parametrize("kind,path", [p for p in ALL_CONFIGS if "hopper/medium_v2" in p.id or "umaze_v2" in p.id])
def test_shipped_config_with_a_key_repeated_is_refused(kind, path, tmp_path):
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    repeated = tmp_path / path.name
    repeated.write_text("\n".join(lines + [lines[first]]) + "\n")
    key, where = lines[first].split(":")[0], f"lines {first + 1} and {len(lines) + 1}"
    with pytest.raises(ConfigError, match=f"key '{key}' given twice \\({where}\\)"):
        MODULES[kind].parse_config(["--config_path", str(repeated)])


# --------------------------------------------------------------------------------------
# 6. each script's wiring: its main parses with its own TrainConfig and checks, bad input is exit code 2
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["offline", "finetune"])
def test_main_refuses_bad_yaml_and_its_own_fields_in_one_line_exit_2(kind, tmp_path, capsys):
    module = MODULES[kind]
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nseed: 1\nbatch_size: 16\n")
    other = "eval_seed" if kind == "offline" else "max_timesteps"  # the other script's own field
    for argv, message in [(["--config_path", str(path)],
                           f"error: config file {path}: key 'batch_size' given twice (lines 1 and 3)"),
                          ([f"--{other}=3"], f"error: command line: unknown option '--{other}'")]:
        with pytest.raises(SystemExit) as stop:
            module.main(argv)
        assert stop.value.code == 2 and capsys.readouterr().err.strip() == message
    # Each script's own fields: with their types, and its own checks.
    own = "eval_seed" if kind == "finetune" else "bc_steps"
    path.write_text(f"<<: {{batch_size: 8}}\nseed: 3\n{own}: 3\n")
    config = module.parse_config(["--config_path", str(path)])
    assert isinstance(config, module.TrainConfig) and (config.batch_size, getattr(config, own)) == (8, 3)
    with pytest.raises(ConfigError, match="^fields 'cql_clip_diff_min' \\(1.0\\) > 'cql_clip_diff_max' \\(0.0\\)$"):
        module.parse_config(["--cql_clip_diff_min=1", "--cql_clip_diff_max=0"])
