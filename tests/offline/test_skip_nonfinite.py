"""on_nonfinite=skip, in both scripts: an update whose loss or a gradient is non-finite is dropped.

* the dropped update leaves actor, critics, target critics, alphas and Adam's moments and step
  counts as they were, bit for bit, and the next update is the one a trainer that never saw the
  bad batch makes; a non-finite gradient under a finite loss, and a non-finite loss with finite
  gradients, are caught too;
* with no bad batch, skip makes the updates of stop (fused instead of foreach Adam: float rounding);
  the target update is the plain lerp bit for bit;
* in a seed stack one run's bad batch drops the update of every run;
* the window's metric means are over the updates kept, and it counts the ones dropped;
* a run with a bad batch goes on to the end, its window's metrics row counts skipped_updates=1 and
  averages the other updates; resume keeps the count; a window of only bad updates stops (exit 3).
"""
import copy
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    finetune_run_args,
    metrics_rows,
    nan_rewards,
    offline_run_args,
    poison_batch_at_updates,
    update_inputs,
)

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as offline
from algorithms.common import runs
from algorithms.common.runs import load_state_file

S, A, B, N = 5, 3, 16, 4  # state dim, action dim, batch, cql_n_actions
MODULES = {"offline": offline, "finetune": finetune}
KINDS = list(MODULES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


# ------------------------------------------------------------------ the trainer
def make(module, seeds=None, **overrides):
    torch.manual_seed(0)
    config = module.TrainConfig(cql_n_actions=N, q_n_hidden_layers=2, batch_size=B,
                                **{"on_nonfinite": "skip", **overrides})
    return module.CQL(config, S, A, 1.0, torch.device("cpu"), seeds=seeds)


def draw(gen: torch.Generator, runs=()):
    """A batch and the noise of one update, (*runs, B, ...)."""
    return update_inputs(gen, (S, A, B, N), runs)


def update(trainer, batch, noise):
    return trainer.apply_update(batch, noise, *trainer.phase(1))  # CQL update, then the target update


def state(trainer) -> dict:
    """Copies of everything an update may change: weights, targets, alphas, Adam's moments and steps."""
    full = trainer.state_dict()
    return copy.deepcopy({k: full[k] for k in ("actor", "critic", "target_critic", "log_alpha", "log_alpha_prime")}
                         | {"adam": full["optimizer"]["state"]})


def assert_states(want: dict, got: dict, rtol: float = 0.0, atol: float = 0.0, where: str = "") -> None:
    if isinstance(want, dict):
        assert set(want) == set(got), where
        for key in want:
            assert_states(want[key], got[key], rtol, atol, f"{where}/{key}")
    else:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False, msg=where)


def spoil_losses(trainer, bad: str, monkeypatch):
    """losses() then return, for "gradient only", a finite total whose gradient to log_alpha is NaN
    (d sqrt(0 * p)/dp = inf * 0); for "loss only", a NaN total whose gradients are all finite."""
    losses = trainer.losses

    def spoiled(*args):
        total, metrics = losses(*args)
        if bad == "gradient only":
            return total + (trainer.log_alpha * 0.0).sqrt().sum(), metrics
        return total + torch.tensor(float("nan")), metrics

    monkeypatch.setattr(trainer, "losses", spoiled)


@pytest.mark.parametrize("bad", ["batch", "gradient only", "loss only"])
@pytest.mark.parametrize("kind", KINDS)
def test_skipped_update_changes_nothing_and_the_next_is_the_update_without_the_bad_batch(kind, bad, monkeypatch):
    module = MODULES[kind]
    a, b = make(module), make(module)  # b never sees the bad batch
    gen = torch.Generator().manual_seed(1)
    first, bad_update, third = draw(gen), draw(gen), draw(gen)
    for trainer in (a, b):
        update(trainer, *first)  # Adam has moments and a step count to keep
    before = state(a)
    if bad == "batch":  # NaN rewards: NaN loss and gradients
        metrics = update(a, nan_rewards(bad_update[0]), bad_update[1])
        assert not math.isfinite(metrics["qf1_loss"])
    else:
        spoil_losses(a, bad, monkeypatch)
        metrics = update(a, *bad_update)
        monkeypatch.undo()
        assert all(torch.isfinite(v).all() for v in metrics.values())
    assert a.found_inf.item() == 1.0
    assert_states(before, state(a))  # bit for bit: weights, targets, alphas, exp_avg, exp_avg_sq, step
    update(a, *third)
    update(b, *third)
    assert a.found_inf.item() == 0.0
    assert_states(state(b), state(a))


@pytest.mark.parametrize("kind", KINDS)
def test_skip_without_bad_batches_makes_the_updates_of_stop(kind):
    module = MODULES[kind]
    skip, stop = make(module), make(module, on_nonfinite="stop")
    assert [g["fused"] for g in skip.optimizer.param_groups] == [True] * 4
    assert not any(g["fused"] for g in stop.optimizer.param_groups)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        batch, noise = draw(gen)
        got, want = update(skip, batch, noise), update(stop, batch, noise)
        assert skip.found_inf.item() == 0.0
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    # Fused Adam (skip) and the default one (stop) round the same formula differently: ~1 ulp a step.
    assert_states(state(stop), state(skip), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_target_update_with_skip_is_the_plain_lerp_bit_for_bit_or_nothing(kind):
    trainer = make(MODULES[kind])
    with torch.no_grad():
        for p in trainer.critic.parameters():
            p.add_(torch.randn_like(p))
    targets = [t.detach().clone() for t in trainer.target_critic.parameters()]
    trainer.found_inf.fill_(1.0)
    trainer.update_target()
    assert all(torch.equal(t, want) for t, want in zip(trainer.target_critic.parameters(), targets))
    torch._foreach_lerp_(targets, [p.detach() for p in trainer.critic.parameters()],
                         trainer.config.soft_target_update_rate)
    trainer.found_inf.zero_()
    trainer.update_target()
    assert all(torch.equal(t, want) for t, want in zip(trainer.target_critic.parameters(), targets))


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_runs_state_goes_on_with_skip(kind):
    """load_model / resume of a checkpoint made with on_nonfinite=stop: Adam stays fused and can skip."""
    module = MODULES[kind]
    stop, skip = make(module, on_nonfinite="stop"), make(module)
    gen = torch.Generator().manual_seed(3)
    update(stop, *draw(gen))
    skip.load_state_dict(copy.deepcopy(stop.state_dict()))
    assert [g["fused"] for g in skip.optimizer.param_groups] == [True] * 4
    before = state(skip)
    batch, noise = draw(gen)
    update(skip, nan_rewards(batch), noise)
    assert skip.found_inf.item() == 1.0
    assert_states(before, state(skip))


@pytest.mark.parametrize("kind", KINDS)
def test_one_runs_bad_batch_skips_the_update_of_every_run_of_a_stack(kind):
    module = MODULES[kind]
    a, b = make(module, seeds=[3, 7]), make(module, seeds=[3, 7])
    gen = torch.Generator().manual_seed(4)
    first, bad_update, third = draw(gen, (2,)), draw(gen, (2,)), draw(gen, (2,))
    for trainer in (a, b):
        update(trainer, *first)
    before = state(a)
    metrics = update(a, nan_rewards(bad_update[0], run=1), bad_update[1])
    assert math.isfinite(metrics["qf1_loss"][0]) and not math.isfinite(metrics["qf1_loss"][1])
    assert a.found_inf.item() == 1.0
    assert_states(before, state(a))  # run 0 too: the runs stay in lockstep
    update(a, *third)
    update(b, *third)
    assert_states(state(b), state(a))


class Batches:
    """A stand-in replay buffer for UpdateStep: random batches."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(5)

    def sample(self, batch_size: int, runs=(), streams=None):  # its own generator, not the runs' streams
        return draw(self.gen, runs)[0]


@pytest.mark.parametrize("seeds", [None, [3, 7]], ids=["one run", "2-seed stack"])
@pytest.mark.parametrize("kind", KINDS)
def test_window_means_are_over_the_updates_kept(kind, seeds, monkeypatch):
    module = MODULES[kind]
    poison_batch_at_updates(module, monkeypatch, {2}, run=0 if seeds else None)
    seen = []  # each update's metrics, as apply_update returns them
    poisoned = module.CQL.apply_update
    monkeypatch.setattr(module.CQL, "apply_update", lambda self, *args: seen.append(poisoned(self, *args)) or seen[-1])
    step = make(module, seeds=seeds).update_step(Batches(), B)
    for _ in range(4):
        step()
    means = step.take_means(4) if seeds is None else step.take_run_means(4)
    kept = [seen[0], seen[2], seen[3]]
    for run, row in enumerate([means] if seeds is None else means):
        assert row["skipped_updates"] == 1
        for name in module.METRIC_NAMES:
            want = sum(m[name] if seeds is None else m[name][run] for m in kept).item() / 3
            assert row[name] == pytest.approx(want, rel=1e-6, abs=1e-7), (run, name)
    assert step.skipped_updates.item() == 0 and not step.metric_sum.any()  # the next window starts empty


# ------------------------------------------------------------------ whole runs
def args(kind: str, hopper_hdf5: Path, root: Path, seeds=None) -> list:
    """60 updates, metrics logged every 20, checkpoints every 20 (finetune: the switch at 20)."""
    base = offline_run_args(hopper_hdf5, root, updates=60) if kind == "offline" else \
        finetune_run_args(hopper_hdf5, root, offline=20, online=40)
    return base + ["--log_freq=20", "--checkpoint_freq=20", "--on_nonfinite=skip"] + \
        ([f"--seeds={seeds}"] if seeds else [])


def training_rows(run_dir: Path) -> list:
    return [row for row in metrics_rows(run_dir) if "qf1_loss" in row]


@pytest.mark.parametrize("seeds", [None, "2"], ids=["one run", "2-seed stack"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_drops_a_bad_batch_and_goes_on_to_the_end(kind, seeds, hopper_hdf5, tmp_path, monkeypatch):
    module = MODULES[kind]
    poison_batch_at_updates(module, monkeypatch, {45}, run=1 if seeds else None)  # a stack: run 1's batch only
    module.main(args(kind, hopper_hdf5, tmp_path, seeds))  # returns: no SystemExit
    run_dirs = sorted(tmp_path.iterdir())
    assert len(run_dirs) == (2 if seeds else 1)
    for run_dir in run_dirs:  # every run of a stack dropped the update
        logged = training_rows(run_dir)
        assert [(row["step"], row["skipped_updates"]) for row in logged] == [(20, 0), (40, 0), (60, 1)]
        assert all(math.isfinite(v) for row in logged for v in row.values()), logged
        final = load_state_file(run_dir / "checkpoint_60.pt")
        for part in ("actor", "critic", "target_critic"):
            assert all(torch.isfinite(v).all() for v in final[part].values()), part
        assert torch.isfinite(final["log_alpha"]) and torch.isfinite(final["log_alpha_prime"])


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_window_keeps_the_skipped_count(kind, hopper_hdf5, tmp_path, monkeypatch):
    """A run stopped at its checkpoint of update 30, after the dropped update 25, resumes to the rows and
    weights of an uninterrupted run: the row of updates 21..40 still counts skipped_updates=1."""
    module = MODULES[kind]
    poison_batch_at_updates(module, monkeypatch, {25})
    module.main(args(kind, hopper_hdf5, tmp_path / "a") + ["--checkpoint_freq=30"])
    (reference,) = (tmp_path / "a").iterdir()

    class Killed(BaseException):
        pass

    write_atomic = runs.write_atomic

    def dies_after_checkpoint_30(path, write, mode="wb"):
        write_atomic(path, write, mode)
        if path.name == "checkpoint_30.pt":
            raise Killed()

    monkeypatch.setattr(runs, "write_atomic", dies_after_checkpoint_30)
    with pytest.raises(Killed):
        module.main(args(kind, hopper_hdf5, tmp_path / "b") + ["--checkpoint_freq=30"])
    monkeypatch.setattr(runs, "write_atomic", write_atomic)
    (killed,) = (tmp_path / "b").iterdir()
    module.main([f"--resume={killed}"])
    assert [row["skipped_updates"] for row in training_rows(killed)] == [0, 1, 0]
    assert metrics_rows(killed) == metrics_rows(reference)  # every row once, the same values, in the same order
    want = load_state_file(reference / "checkpoint_60.pt")
    got = load_state_file(killed / "checkpoint_60.pt")
    for part in ("actor", "critic", "target_critic"):
        for name in want[part]:
            assert torch.equal(want[part][name], got[part][name]), (part, name)


@pytest.mark.parametrize("kind", KINDS)
def test_a_window_of_only_bad_updates_stops_with_exit_3(kind, hopper_hdf5, tmp_path, monkeypatch, capsys):
    module = MODULES[kind]
    poison_batch_at_updates(module, monkeypatch, set(range(21, 41)))
    with pytest.raises(SystemExit) as exit_info:
        module.main(args(kind, hopper_hdf5, tmp_path))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's
    steps = "updates" if kind == "offline" else "iterations"
    message = (rf"error: every update in {steps} 21\.\.40 had a non-finite loss or gradient \(on_nonfinite=skip\); "
               r"last good checkpoint: .*checkpoint_20\.pt$")
    assert exit_info.value.code == 3 and len(err) == 1 and re.match(message, err[0]), err
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in runs.checkpoint_files(run_dir)] == ["checkpoint_20.pt"]
