"""The CQL update of both scripts against a plain re-derivation of CORL's formulas, in float64.

The reference below reads the weights out of the trainer and recomputes every quantity with
per-critic Python loops and textbook formulas (no ensemble batching, no fused critic pass), so
an error in the fast code's batching, slicing, detaching or bookkeeping shows up as a mismatch.
Every test runs on the offline script and on the finetune script (its losses are a copy, with a
penalty weight that changes at the offline-to-online switch and a penalty-free SAC branch, tested
at the end); mutating one term of the reference makes the comparison fail (test_a_mutated_term_fails).
"""
import copy
import math

import pytest
import torch
from conftest import fast_losses, trainer_grads

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql

MODULES = {"offline": offline_cql, "finetune": finetune_cql}

S, A, B, N = 5, 3, 16, 4  # state dim, action dim, batch, cql_n_actions

VARIANTS = {
    "default": {},
    "no_importance_sample": {"cql_importance_sample": False},
    "lagrange": {"cql_lagrange": True, "cql_target_action_gap": 0.3},
    "max_target_backup": {"cql_max_target_backup": True, "backup_entropy": True},
    "clipped": {"cql_clip_diff_min": -0.05, "cql_clip_diff_max": 0.05},
    "backup_entropy_temp": {"backup_entropy": True, "cql_temp": 0.5},
    "fixed_alpha": {"use_automatic_entropy_tuning": False, "alpha_multiplier": 0.2},
    "lagrange_no_is_clipped": {"cql_lagrange": True, "cql_importance_sample": False, "cql_clip_diff_max": 0.1},
}


@pytest.fixture(params=list(MODULES))
def cql(request):
    """The script under test: each test runs on both."""
    return MODULES[request.param]


def make_trainer(overrides: dict, bc_steps: int = 0, module=offline_cql):
    torch.manual_seed(0)
    config = module.TrainConfig(cql_n_actions=N, q_n_hidden_layers=2, bc_steps=bc_steps, **overrides)
    trainer = module.CQL(config, S, A, max_action=1.0, device=torch.device("cpu"))
    # Perturb every weight so that targets, critics and scalars all differ from their initial values.
    with torch.no_grad():
        if module is finetune_cql and config.orthogonal_init:  # its sqrt(2)-gain layers: back to the scale below
            for p in trainer.actor.net.parameters():
                p.mul_(0.3)
        for p in trainer.actor.parameters():  # small: keeps |u| where the plain log(1 - tanh^2) is exact
            p.add_(0.05 * torch.randn_like(p))
        for p in trainer.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for p in trainer.target_critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
        trainer.log_alpha.fill_(-0.4)
        trainer.log_alpha_prime.fill_(0.7)
    for module in (trainer.actor, trainer.critic, trainer.target_critic):
        module.double()
    trainer.log_alpha.data = trainer.log_alpha.data.double()
    trainer.log_alpha_prime.data = trainer.log_alpha_prime.data.double()
    return trainer


def make_batch():
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, S, generator=g, dtype=torch.float64)
    actions = torch.rand(B, A, generator=g, dtype=torch.float64) * 1.8 - 0.9
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    next_obs = torch.randn(B, S, generator=g, dtype=torch.float64)
    dones = (torch.rand(B, generator=g) < 0.3).double()
    return obs, actions, rewards, next_obs, dones


# ---------------------------------------------------------------- plain reference
def plain_q(trainer, e, params, obs, act):
    """Critic e on one (state, action) batch, layer by layer from its own slice of the weights."""
    weights, biases = params
    x = torch.cat([obs, act], dim=-1)
    for layer in range(len(weights)):
        x = x @ weights[layer][e] + biases[layer][e][0]
        if layer < len(weights) - 1:
            x = torch.clamp(x, min=0.0)
    return x[..., 0]


def plain_actor(actor_params, obs, eps):
    """Tanh-Gaussian sample and log-prob by the change-of-variables formula."""
    *layers, mult, offset = actor_params
    x = obs
    for i in range(0, len(layers), 2):
        x = x @ layers[i].T + layers[i + 1]
        if i < len(layers) - 2:
            x = torch.clamp(x, min=0.0)
    mean, raw = x[..., :A], x[..., A:]
    log_std = torch.clamp(mult * raw + offset, -20.0, 2.0)
    if eps.dim() == 3:
        mean, log_std = mean[:, None], log_std[:, None]
    std = torch.exp(log_std)
    u = mean + std * eps
    normal_logp = -((u - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    logp = (normal_logp - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    return torch.tanh(u), logp, mean, log_std


def plain_losses(trainer, batch, noise, bc=False, penalty=True, mutation=None):
    """CORL's CQL losses written out plainly; returns each loss w.r.t. its own leaves.

    The penalty weight is config.cql_alpha (offline) or the finetune trainer's cql_alpha, the weight
    of the current phase; penalty False is the finetune script's plain SAC critic loss. mutation
    names one term to get wrong on purpose (see MUTATIONS): the comparison must then fail.
    """
    c = trainer.config
    weight = getattr(trainer, "cql_alpha", c.cql_alpha)  # finetune: cql_alpha or cql_alpha_online
    obs, actions, rewards, next_obs, dones = batch
    actor_p = [p.detach().clone().requires_grad_() for p in trainer.actor.net.parameters()]
    actor_p += [trainer.actor.log_std_multiplier.detach().clone().requires_grad_(),
                trainer.actor.log_std_offset.detach().clone().requires_grad_()]
    critic_p = ([w.detach().clone().requires_grad_() for w in trainer.critic.weights],
                [b.detach().clone().requires_grad_() for b in trainer.critic.biases])
    target_p = ([w.detach() for w in trainer.target_critic.weights], [b.detach() for b in trainer.target_critic.biases])
    log_alpha = trainer.log_alpha.detach().clone().requires_grad_()
    log_alpha_prime = trainer.log_alpha_prime.detach().clone().requires_grad_()

    new_actions, log_pi, mean, log_std = plain_actor(actor_p, obs, noise["policy"])
    if c.use_automatic_entropy_tuning:
        alpha_loss = -(log_alpha * (log_pi + (-A)).detach()).mean()
        alpha = torch.exp(log_alpha) * c.alpha_multiplier
    else:
        alpha_loss = torch.zeros((), dtype=torch.float64)
        alpha = torch.tensor(c.alpha_multiplier, dtype=torch.float64)
    frozen = ([w.detach() for w in critic_p[0]], [b.detach() for b in critic_p[1]])
    if bc:
        u_data = torch.atanh(actions)
        std = torch.exp(log_std)
        data_logp = (-((u_data - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
                     - torch.log(1 - actions ** 2)).sum(-1)
        policy_loss = (alpha.detach() * log_pi - data_logp).mean()
    else:
        worse = torch.maximum if mutation == "max_over_critics" else torch.minimum
        q_new = worse(plain_q(trainer, 0, frozen, obs, new_actions), plain_q(trainer, 1, frozen, obs, new_actions))
        entropy_sign = -1.0 if mutation == "entropy_sign" else 1.0
        policy_loss = (entropy_sign * alpha.detach() * log_pi - q_new).mean()

    with torch.no_grad():
        next_a, next_logp, _, _ = plain_actor(actor_p, next_obs, noise["next"])
        if c.cql_max_target_backup:
            nxt = next_obs[:, None].expand(B, N, S)
            tq = torch.minimum(plain_q(trainer, 0, target_p, nxt, next_a), plain_q(trainer, 1, target_p, nxt, next_a))
            idx = tq.argmax(-1)
            target_q = tq[torch.arange(B), idx]
            next_logp = next_logp[torch.arange(B), idx]
        else:
            target_q = torch.minimum(plain_q(trainer, 0, target_p, next_obs, next_a),
                                     plain_q(trainer, 1, target_p, next_obs, next_a))
        if c.backup_entropy:
            target_q = target_q - alpha * next_logp
        not_done = 1.0 if mutation == "no_done_mask" else 1 - dones
        td_target = rewards + not_done * c.discount * target_q
        cur_a, cur_logp, _, _ = plain_actor(actor_p, obs, noise["cql_current"])
        nxt_a, nxt_logp, _, _ = plain_actor(actor_p, next_obs, noise["cql_next"])

    rep_obs = obs[:, None].expand(B, N, S)
    out = {"policy_loss": policy_loss, "alpha_loss": alpha_loss, "log_pi": log_pi.mean(),
           "alpha": alpha.detach(), "average_target_q": target_q.mean()}
    diffs, critic_loss = [], 0.0
    for e, tag in ((0, "1"), (1, "2")):
        q_pred = plain_q(trainer, e, critic_p, obs, actions)
        qf_loss = ((q_pred - td_target) ** 2).mean()
        q_rand = plain_q(trainer, e, critic_p, rep_obs, noise["cql_random"])
        q_cur = plain_q(trainer, e, critic_p, rep_obs, cur_a)
        q_nxt = plain_q(trainer, e, critic_p, rep_obs, nxt_a)
        std_q = torch.cat([q_rand, q_pred[:, None], q_nxt, q_cur], 1).std(1)
        if c.cql_importance_sample:
            random_log_density = 0.0 if mutation == "no_random_density" else A * math.log(0.5)
            cat = torch.cat([q_rand - random_log_density, q_nxt - nxt_logp, q_cur - cur_logp], 1)
        else:
            cat = torch.cat([q_rand, q_pred[:, None], q_nxt, q_cur], 1)
        ood = torch.log(torch.exp(cat / c.cql_temp).sum(1)) * c.cql_temp
        diff = torch.clamp(ood - q_pred, c.cql_clip_diff_min, c.cql_clip_diff_max).mean()
        diffs.append(diff)
        out.update({f"qf{tag}_loss": qf_loss, f"average_qf{tag}": q_pred.mean(), f"cql_std_q{tag}": std_q.mean(),
                    f"cql_q{tag}_rand": q_rand.mean(), f"cql_q{tag}_current_actions": q_cur.mean(),
                    f"cql_q{tag}_next_actions": q_nxt.mean(), f"cql_qf{tag}_diff": diff})
        critic_loss = critic_loss + qf_loss
    if mutation == "offline_weight_online":  # the switch ignored: the offline weight kept
        weight = c.cql_alpha
    if c.cql_lagrange:
        alpha_prime = torch.clamp(torch.exp(log_alpha_prime), 0.0, 1e6)
        mins = [alpha_prime.detach() * weight * (d - c.cql_target_action_gap) for d in diffs]
        half = -0.5 if mutation != "lagrange_sign" else 0.5
        alpha_prime_loss = (alpha_prime * weight * (diffs[0].detach() - c.cql_target_action_gap)
                            + alpha_prime * weight * (diffs[1].detach() - c.cql_target_action_gap)) * half
    else:
        alpha_prime = torch.zeros((), dtype=torch.float64)
        mins = [d * weight for d in diffs]
        alpha_prime_loss = torch.zeros((), dtype=torch.float64)
    if penalty:
        critic_loss = critic_loss + mins[0] + mins[1]
    else:  # plain SAC: TD errors only; the trainer reports every penalty metric as 0
        alpha_prime_loss = torch.zeros((), dtype=torch.float64)
        out = {k: v for k, v in out.items() if not k.startswith("cql_")}
        mins = [torch.zeros((), dtype=torch.float64)] * 2
        alpha_prime = torch.zeros((), dtype=torch.float64)
    out.update(cql_min_qf1_loss=mins[0], cql_min_qf2_loss=mins[1], alpha_prime=alpha_prime.detach(),
               alpha_prime_loss=alpha_prime_loss)

    def grads(loss, leaves):
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in leaves]
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True), leaves)]

    gradients = {
        "actor": grads(policy_loss, actor_p),
        "critic": grads(critic_loss, critic_p[0] + critic_p[1]),
        "log_alpha": grads(alpha_loss, [log_alpha]),
        "log_alpha_prime": grads(alpha_prime_loss, [log_alpha_prime]),
    }
    return {k: v.detach() for k, v in out.items()}, gradients


def double_noise(trainer):
    torch.manual_seed(2)
    return {k: v.double() for k, v in trainer.draw_noise(B).items()}


def compare(trainer, batch, noise, label, bc=False, penalty=True, mutation=None):
    """Fast losses, metrics and gradients against the plain reference; returns the fast metrics and grads."""
    total, metrics = fast_losses(trainer, batch, noise, bc=bc, penalty=penalty)
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    expected, expected_grads = plain_losses(trainer, batch, noise, bc=bc, penalty=penalty, mutation=mutation)
    assert set(expected) <= set(metrics)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-9, atol=1e-10, msg=f"{label}: {name}")
    got = trainer_grads(trainer)
    for group, grads in expected_grads.items():
        for i, (g, ref) in enumerate(zip(got[group], grads)):
            torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10, msg=f"{label}: grad {group}[{i}]")
    return metrics, got


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_losses_and_gradients_match_plain_computation(cql, variant):
    trainer = make_trainer(VARIANTS[variant], module=cql)
    metrics, got = compare(trainer, make_batch(), double_noise(trainer), variant)
    # The variant switches really change the computation (guards against a switch being ignored).
    if variant == "clipped":
        assert abs(float(metrics["cql_qf1_diff"])) <= 0.05 + 1e-12
    if variant.startswith("lagrange"):
        assert float(metrics["alpha_prime"]) == pytest.approx(math.exp(0.7))
        assert any(g.abs().sum() > 0 for g in got["log_alpha_prime"])
    else:
        assert float(metrics["alpha_prime"]) == 0.0


def test_behaviour_cloning_policy_loss_matches_plain_computation(cql):
    """The warm-up's log-likelihood is of the dataset actions (CORL's log_prob scores a fresh sample
    instead: a bug not copied, see the README)."""
    trainer = make_trainer({}, bc_steps=10, module=cql)
    compare(trainer, make_batch(), double_noise(trainer), "bc", bc=True)


# ------------------------------------------------------------------ finetune only: the switch, plain SAC
SWITCH = {"cql_alpha": 10.0, "cql_alpha_online": 2.0}


@pytest.mark.parametrize("variant", ["default", "lagrange", "max_target_backup"])
def test_finetune_switch_weights_the_penalty_by_cql_alpha_online(variant):
    """After the switch the penalty (and, Lagrange, alpha's loss) weighs by cql_alpha_online."""
    trainer = make_trainer({**VARIANTS[variant], **SWITCH}, module=finetune_cql)
    batch, noise = make_batch(), double_noise(trainer)
    before, _ = compare(trainer, batch, noise, f"{variant}, offline")
    trainer.cql_alpha = trainer.config.cql_alpha_online  # what train() does at the switch
    after, _ = compare(trainer, batch, noise, f"{variant}, online")
    ratio = after["cql_min_qf1_loss"] / before["cql_min_qf1_loss"]
    torch.testing.assert_close(ratio, torch.tensor(0.2, dtype=torch.float64), rtol=1e-9, atol=0)
    with pytest.raises(AssertionError):  # a switch that keeps the offline weight is caught
        compare(trainer, batch, noise, "switch ignored", mutation="offline_weight_online")


@pytest.mark.parametrize("variant", ["default", "max_target_backup", "fixed_alpha"])
def test_finetune_plain_sac_branch_matches_plain_computation(variant):
    """cql_alpha_online 0 without Lagrange: the penalty is not computed (CQL.phase), the critic loss is
    the TD error alone, and every penalty metric reads 0."""
    trainer = make_trainer({**VARIANTS[variant], "cql_alpha_online": 0.0}, module=finetune_cql)
    trainer.cql_alpha = 0.0
    assert trainer.phase(1)[2] is False  # the penalty is skipped from here on
    metrics, _ = compare(trainer, make_batch(), double_noise(trainer), variant, penalty=False)
    for name in ("cql_q1_rand", "cql_qf1_diff", "cql_min_qf2_loss", "cql_std_q1", "alpha_prime_loss"):
        assert float(metrics[name]) == 0.0, name


# Each mutation gets one term of the reference wrong, in a variant where that term matters.
MUTATIONS = {
    "entropy_sign": {},
    "max_over_critics": {},
    "no_done_mask": {},
    "no_random_density": {},
    "lagrange_sign": VARIANTS["lagrange"],
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_mutated_term_fails(cql, mutation):
    """The tolerances above are tight enough to catch a wrong sign or a missing term."""
    trainer = make_trainer(MUTATIONS[mutation], module=cql)
    batch, noise = make_batch(), double_noise(trainer)
    compare(trainer, batch, noise, "unmutated")  # the same inputs agree without the mutation
    with pytest.raises(AssertionError):
        compare(trainer, batch, noise, mutation, mutation=mutation)


def test_finetune_plain_sac_reference_catches_a_penalty_left_on():
    """A SAC phase that still added the penalty (weight 1 here) would not pass the SAC comparison."""
    trainer = make_trainer({"cql_alpha": 1.0}, module=finetune_cql)
    batch, noise = make_batch(), double_noise(trainer)
    total, _ = fast_losses(trainer, batch, noise, penalty=True)
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    _, sac_grads = plain_losses(trainer, batch, noise, penalty=False)
    critic = trainer_grads(trainer)["critic"]
    assert max(float((g - ref).abs().max()) for g, ref in zip(critic, sac_grads["critic"])) > 1e-3


@pytest.mark.parametrize("variant", ["default", "lagrange"])
def test_one_update_equals_four_separate_adam_steps_and_polyak_target(cql, variant, monkeypatch):
    """train(): one Adam over four groups == CORL's four optimizers; then the soft target update."""
    trainer = make_trainer(VARIANTS[variant], module=cql)
    reference = copy.deepcopy(trainer)
    batch, noise = make_batch(), double_noise(trainer)
    monkeypatch.setattr(trainer, "draw_noise", lambda batch_size: noise)
    before = trainer.log_alpha_prime.detach().clone()
    trainer.train(batch)

    _, grads = plain_losses(reference, batch, noise)
    c = reference.config
    groups = {
        "actor": (list(reference.actor.net.parameters()) + [reference.actor.log_std_multiplier,
                                                           reference.actor.log_std_offset], c.policy_lr),
        "critic": (list(reference.critic.weights) + list(reference.critic.biases), c.qf_lr),
        "log_alpha": ([reference.log_alpha], c.policy_lr),
        "log_alpha_prime": ([reference.log_alpha_prime], c.qf_lr),
    }
    for name, (params, lr) in groups.items():
        if name == "log_alpha_prime" and not c.cql_lagrange:
            continue  # CORL never steps alpha' without the Lagrange variant
        optimizer = torch.optim.Adam(params, lr=lr)
        for p, g in zip(params, grads[name]):
            p.grad = g.clone()
        optimizer.step()
    with torch.no_grad():
        for t, p in zip(reference.target_critic.parameters(), reference.critic.parameters()):
            t.copy_((1 - c.soft_target_update_rate) * t + c.soft_target_update_rate * p)

    for (name, got), want in zip(trainer.actor.state_dict().items(), reference.actor.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)
    for module in ("critic", "target_critic"):
        for got, want in zip(getattr(trainer, module).parameters(), getattr(reference, module).parameters()):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=module)
    torch.testing.assert_close(trainer.log_alpha, reference.log_alpha)
    torch.testing.assert_close(trainer.log_alpha_prime, reference.log_alpha_prime)
    alpha_prime_moved = not torch.equal(trainer.log_alpha_prime.detach(), before)
    assert alpha_prime_moved == (variant == "lagrange")


def test_tanh_gaussian_log_prob_is_change_of_variables(cql):
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(64, A, generator=g, dtype=torch.float64)
    log_std = torch.randn(64, A, generator=g, dtype=torch.float64) * 0.5 - 0.5
    u = mean + log_std.exp() * torch.randn(64, A, generator=g, dtype=torch.float64)
    got = cql.TanhGaussianActor.tanh_log_prob(mean, log_std, u)
    # density of a = tanh(u): N(u; mean, std) / |da/du|, with da/du = 1 - tanh(u)^2
    std = log_std.exp()
    normal_density = torch.exp(-((u - mean) ** 2) / (2 * std ** 2)) / (std * math.sqrt(2 * math.pi))
    want = torch.log(normal_density / (1 - torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Stable for large |u|, where 1 - tanh(u)^2 underflows in float32.
    big = torch.tensor([[12.0, -15.0, 0.0]])
    value = cql.TanhGaussianActor.tanh_log_prob(torch.zeros(1, 3), torch.zeros(1, 3), big)
    assert torch.isfinite(value).all()


def test_actor_log_prob_of_its_own_sample_equals_sample_log_prob(cql):
    torch.manual_seed(4)
    actor = cql.TanhGaussianActor(S, A, max_action=1.0).double()
    obs = torch.randn(32, S, dtype=torch.float64)
    actions, logp = actor(obs, torch.randn(32, A, dtype=torch.float64))
    torch.testing.assert_close(actor.log_prob(obs, actions), logp, rtol=1e-6, atol=1e-6)
    assert torch.equal(actor.act(obs), torch.tanh(actor.mean_log_std(obs)[0]))
