"""Does splitting fp32 matmuls into TF32 parts (3xTF32) pay for the CQL update? Accuracy and speed.

    python benchmarks/precision_split.py   (cuda only)

Each fp32 operand x is split into hi = x with its 13 low mantissa bits cleared (exactly a TF32
number) and lo = x - hi; then a @ b ~ a_hi @ b_hi + a_hi @ b_lo + a_lo @ b_hi on TF32 tensor cores,
fp32-accurate (the dropped lo @ lo term is ~2^-22 relative). "three": three cuBLAS bmm calls;
"cat": one bmm with the parts concatenated along K ([a_hi|a_hi|a_lo] @ [b_hi;b_lo;b_hi]). Every
layer of the critics and actor goes through the split (forward and backward, the ensemble layer's
batched weight gradient); "fp32" is the same layer code with plain fp32 matmuls, the reference for
the ratio; "plain-tf32" is that with TF32 allowed (not fp32-accurate: what --tf32 does). Rows give
the gradients' largest relative difference (all gradients as one vector) from the fp32 update on
the same batches and weights, and compile + CUDA-graph updates/s, CORL's default shapes.

Measured on one NVIDIA H200, 2026-12-01 (updates/s; seed-updates/s for 16 seeds):
  one run:   fp32 671, three 466 (err 3.1e-6), cat 693 (3.1e-6), plain-tf32 1253
  16 seeds:  fp32 2271, three 1048 (1.4e-5), cat 1706 (1.7e-5), plain-tf32 4955
The split costs what TF32 saves through cuBLAS (the parts are extra passes over memory, and
the 3x-wide K of "cat" runs at TF32 rate), so it was not made a layer of the scripts; doing the
split inside one kernel (Triton's tl.dot(..., input_precision="tf32x3")) is the direction left.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import algorithms.offline.cql as cql  # noqa: E402
from benchmarks.update_speed import synthetic_data  # noqa: E402

MODE = "fp32"
ORIG = cql.EnsembleLinear
ORIG_LINEAR = nn.Linear.forward


def split(x):
    hi = (x.view(torch.int32) & -8192).view(torch.float32)
    return hi, x - hi


def bmm3(a, b):
    if MODE == "fp32":
        return torch.bmm(a, b)
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    if MODE == "cat":
        return torch.bmm(torch.cat([a_hi, a_hi, a_lo], -1), torch.cat([b_hi, b_lo, b_hi], -2))
    return torch.bmm(a_hi, b_hi) + (torch.bmm(a_hi, b_lo) + torch.bmm(a_lo, b_hi))


class Ens3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        members, inputs = weight.shape[0], x.shape[0]
        if inputs == 1:
            x = x.expand(members, -1, -1)
        elif inputs < members:
            x = x.repeat(members // inputs, 1, 1)
        y = bmm3(x, weight)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        members, inputs = weight.shape[0], x.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = bmm3(grad_y, weight.transpose(1, 2))
            if inputs < members:
                grad_x = grad_x.unflatten(0, (members // inputs, inputs)).sum(0)
        if ctx.needs_input_grad[1]:
            per_member_x = x.repeat(members // inputs, 1, 1) if inputs < members else x
            if inputs == 1 and members > 1:
                per_member_x = x.expand(members, -1, -1)
            grad_weight = bmm3(per_member_x.transpose(1, 2), grad_y)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(1, keepdim=True)
        return grad_x, grad_weight, grad_bias


def linear_forward(self, x):
    if MODE == "fp32":
        return ORIG_LINEAR(self, x)
    shape = x.shape
    y = Ens3.apply(x.reshape(1, -1, shape[-1]), self.weight.T[None], self.bias[None, None])
    return y.reshape(*shape[:-1], -1)


def make(n_seeds, capturable):
    torch.manual_seed(0)
    return cql.CQL(cql.TrainConfig(), 17, 6, 1.0, torch.device("cuda"), capturable=capturable,
                   seeds=list(range(n_seeds)) if n_seeds else None)


def grads_error(mode, n_seeds, updates=10):
    global MODE
    plain, fast = make(n_seeds, False), make(n_seeds, False)
    buffer = cql.ReplayBuffer(synthetic_data(100_000, 17, 6), torch.device("cuda"))
    worst = 0.0
    for _ in range(updates):
        with torch.no_grad():
            for p, q in zip(list(plain.actor.parameters()) + list(plain.critic.parameters())
                            + list(plain.target_critic.parameters()) + [plain.log_alpha],
                            list(fast.actor.parameters()) + list(fast.critic.parameters())
                            + list(fast.target_critic.parameters()) + [fast.log_alpha]):
                q.copy_(p)
        batch = buffer.sample(256, plain.run_shape)
        noise = plain.draw_noise(256)
        res = []
        for trainer, m, tf in ((plain, "fp32", False), (fast, mode, mode != "fp32")):
            MODE = m
            torch.backends.cuda.matmul.allow_tf32 = tf
            total, _ = trainer.losses(batch, noise, False)
            trainer.optimizer.zero_grad(set_to_none=True)
            total.backward()
            params = list(trainer.actor.parameters()) + list(trainer.critic.parameters()) + [trainer.log_alpha]
            res.append(torch.cat([p.grad.flatten() for p in params]))
            trainer.optimizer.step()
        worst = max(worst, float((res[1] - res[0]).norm() / res[0].norm()))
    MODE = "fp32"
    torch.backends.cuda.matmul.allow_tf32 = False
    return worst


def speed(mode, n_seeds, updates=2000):
    global MODE
    MODE = mode
    torch.backends.cuda.matmul.allow_tf32 = mode not in ("fp32",) or TF32
    torch._dynamo.reset()
    buffer = cql.ReplayBuffer(synthetic_data(1_000_000, 17, 6), torch.device("cuda"))
    trainer = make(n_seeds, True)
    step = cql.UpdateStep(trainer, buffer, 256, compile=True, cudagraphs=True)
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(updates):
        step()
    torch.cuda.synchronize()
    ups = updates / (time.perf_counter() - t)
    MODE = "fp32"
    torch.backends.cuda.matmul.allow_tf32 = False
    return ups


TF32 = False
if __name__ == "__main__":
    cql.EnsembleLinear = Ens3
    nn.Linear.forward = linear_forward
    for n_seeds in (0, 16):
        for mode in ("fp32", "three", "cat"):
            err = grads_error(mode, n_seeds)
            ups = speed(mode, n_seeds)
            print(f"seeds {n_seeds} {mode:6s} rel grad err {err:.2e}  {ups:8.1f} upd/s "
                  f"{ups * max(n_seeds, 1):8.1f} seed-upd/s", flush=True)
        TF32 = True
        ups = speed("fp32", n_seeds)
        TF32 = False
        print(f"seeds {n_seeds} plain-tf32 {ups:8.1f} upd/s {ups * max(n_seeds, 1):8.1f} seed-upd/s", flush=True)
