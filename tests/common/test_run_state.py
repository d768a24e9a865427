"""Both scripts' RunState: a checkpoint's run entry as a dataclass that keeps the checkpoints' keys, so
checkpoints written before it (dict literals) load, and what it writes is what they wrote."""
import numpy as np
import pytest
import torch

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as offline
from algorithms.common.online import new_progress

COMMON = {"rng": {"torch": torch.get_rng_state()}, "metric_sum": torch.arange(3.0), "window": 7,
          "skipped_updates": torch.tensor(2.0), "metrics_rows": 12, "pending_evaluations": {40: {"w": torch.ones(2)}}}
ONLINE = {"goal_task": True, "last_score": 41.5, "eval_returns": [1.0, 2.0],
          "episode": (np.arange(3.0), 5.0, 4, False), "env": {"wrappers": []}}
OFFLINE = {"scores": {20: 3.5}, "last_return": 9.0}


@pytest.mark.parametrize("module, own", [(finetune, ONLINE), (offline, OFFLINE)], ids=["finetune", "offline"])
@pytest.mark.parametrize("stack", [None, ["a-0-x", "a-1-y"]], ids=["one run", "stack"])
def test_a_run_entry_of_the_old_dict_layout_round_trips_with_the_same_keys(module, own, stack):
    entry = {**COMMON, **own, **({"stack": stack} if stack else {})}
    state = module.RunState.from_dict(entry)
    assert state.window == 7 and state.stack == stack and state.pending_evaluations is entry["pending_evaluations"]
    again = state.to_dict()
    assert set(again) == set(entry)  # "stack" only in a stack's checkpoints, as before
    for key, value in entry.items():
        if key == "episode":
            assert again[key][0] is value[0] and again[key][1:] == value[1:]
        else:
            assert again[key] is value, key


@pytest.mark.parametrize("module", [finetune, offline], ids=["finetune", "offline"])
def test_a_run_entry_without_the_newer_keys_gets_a_fresh_runs_values(module):
    old = {k: v for k, v in COMMON.items() if k not in ("skipped_updates", "pending_evaluations")}
    state = module.RunState.from_dict(old)
    assert state.skipped_updates == 0.0 and state.pending_evaluations == {} and state.stack is None
    assert "skipped_updates" in state.to_dict()  # written from now on


def test_finetune_checkpoint_gives_progress_and_pending_evaluations_of_either_layout():
    weights = {"w": torch.zeros(1)}
    progress = {"iteration": 30, "train_episodes": 2, "train_successes": 1, "eval_success_rates": [0.5],
                "scores": [1.0], "online_transitions": 10}
    old = {"progress": progress, "pending_evaluations": {30: weights}, "run": {**COMMON, **ONLINE}}
    del old["run"]["pending_evaluations"]  # checkpoints before 2026-12 kept them at the top level
    state = finetune.RunState.from_checkpoint(old)
    assert state.pending_evaluations == {30: weights} and state.rng is not None
    assert state.progress == {k: v for k, v in progress.items() if k != "online_transitions"}
    assert state.progress["scores"] is not progress["scores"]  # a copy: the run appends to its own
    loaded = finetune.RunState.from_checkpoint({"progress": progress, "run": None})  # load_model only
    assert loaded.rng is None and loaded.pending_evaluations == {} and loaded.progress["iteration"] == 30
    assert finetune.RunState().progress == new_progress() and finetune.RunState().episode[0] is None
