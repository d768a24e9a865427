"""On a CUDA GPU (skipped elsewhere, CI included): the default cuda path, torch.compile + the update
replayed as a CUDA graph, drops a non-finite update with on_nonfinite=skip inside the graph, for both
scripts, one run and a seed stack. Run on a GPU machine with `python -m pytest -q tests/cuda/test_cuda.py`."""
import numpy as np
import pytest
import torch

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as offline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STATE, ACTION, BATCH = 11, 3, 64


def dataset(n: int = 4000) -> dict:
    rng = np.random.default_rng(0)
    return {"observations": rng.standard_normal((n, STATE)).astype(np.float32),
            "actions": rng.uniform(-0.99, 0.99, (n, ACTION)).astype(np.float32),
            "rewards": rng.standard_normal(n).astype(np.float32),
            "next_observations": rng.standard_normal((n, STATE)).astype(np.float32),
            "terminals": (rng.random(n) < 0.05).astype(np.float32)}


def setup(module, seeds):
    """A trainer on cuda as train() makes it (capturable fused Adam), its buffer, and its UpdateStep."""
    cuda = torch.device("cuda")
    config = module.TrainConfig(on_nonfinite="skip", batch_size=BATCH, cql_n_actions=4)
    torch.manual_seed(0)
    trainer = module.CQL(config, STATE, ACTION, 1.0, cuda, capturable=True, seeds=seeds)
    data = dataset()
    if module is offline:
        buffer = offline.ReplayBuffer(offline.OfflineData(**data, make_env=None, ref_min_score=None,
                                                          ref_max_score=None, is_locomotion=False, source="test"), cuda)
        rewards = buffer.rewards
    else:
        buffer = finetune.ReplayBuffer(len(data["rewards"]) + 100, STATE, ACTION, cuda, trainer.run_shape)
        buffer.load_dataset(data)
        rewards = buffer.storage["rewards"]
    return trainer, rewards, trainer.update_step(buffer, BATCH, compile=True, cudagraphs=True)


def trainer_state(trainer) -> list:
    tensors = [*trainer.actor.parameters(), *trainer.critic.parameters(), *trainer.target_critic.parameters(),
               trainer.log_alpha, trainer.log_alpha_prime]
    for state in trainer.optimizer.state.values():
        tensors += [state["exp_avg"], state["exp_avg_sq"], state["step"]]
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("seeds", [None, [0, 1, 2]], ids=["one run", "stack of 3"])
@pytest.mark.parametrize("module", [offline, finetune], ids=["offline", "finetune"])
def test_a_non_finite_update_is_dropped_inside_the_cuda_graph(module, seeds):
    trainer, rewards, step = setup(module, seeds)
    for _ in range(12):  # eager warm-up, capture, replays
        step()
    assert step.graphs, "the update was not captured as a CUDA graph"
    step.take_run_means(12)
    before = trainer_state(trainer)
    good_rewards = rewards.clone()
    rewards[..., : good_rewards.shape[-1] // 2] = float("nan")  # the replayed graph samples these in place;
    step()  # a batch of 64 misses all of them with probability 2^-64
    rewards.copy_(good_rewards)
    assert trainer.found_inf.item() == 1.0
    hit = trainer_state(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, hit)), "the skipped update changed a weight or Adam state"
    step()
    assert trainer.found_inf.item() == 0.0
    after = trainer_state(trainer)
    assert any(not torch.equal(a, b) for a, b in zip(hit, after)), "the update after the skipped one did nothing"
    assert all(t.isfinite().all() for t in after)
    means = step.take_run_means(2)
    assert [m["skipped_updates"] for m in means] == [1] * (len(seeds) if seeds else 1)
    assert all(np.isfinite(v) for m in means for v in m.values())
