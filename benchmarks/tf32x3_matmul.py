"""fp32-accurate tensor-core matmuls for the critics (Triton tf32x3) against cuBLAS fp32 and TF32: a probe.

    python benchmarks/tf32x3_matmul.py                # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/tf32x3_matmul.py --check   # the kernel's math on the CPU

The critics' hidden layers make three products per update and layer at the penalty's 1 + 3n actions per state
(7936 rows at CORL's shapes), for 2 members (one run) or 32 (a 16-seed stack): forward x @ W, input gradient
g @ W^T and weight gradient x^T @ g (a reduction over the rows, split into slices for one run's few output
tiles). The kernel keeps fp32's accuracy with TF32 tensor cores: each operand is a high TF32 part plus a
low one, and tl.dot(..., input_precision="tf32x3") adds the three products that matter. Times are per call,
from CUDA-graph replays; errors are relative to float64. Measured on an H200 (README, "Speed"), this kernel
is 1.1-1.4x cuBLAS fp32 per product, but inside the compiled update (as a custom op, for the critics' wide
matmuls on at least 1024 rows) it gained next to nothing (one run 1174 against 1166 updates/s, 16 seeds 2267
against 2291 seed-updates/s) and took ~190 MiB more GPU memory: the scripts keep cuBLAS.
"""
import argparse
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def ensemble_matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, a_batches, stride_ab, stride_am, stride_ak,
                           stride_bb, stride_bk, stride_bn, stride_cs, stride_cb, stride_cm, stride_cn,
                           K_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of member `member`'s product over slice `split` of K."""
    tile, member, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = (tile // tl.cdiv(N, BLOCK_N)) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tl.cdiv(N, BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = a_ptr + (member % a_batches).to(tl.int64) * stride_ab  # members share an input cyclically
    b_base = b_ptr + member.to(tl.int64) * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + member * N + cols, mask=cols < N, other=0.0)[None, :]
    c = c_ptr + split.to(tl.int64) * stride_cs + member.to(tl.int64) * stride_cb
    tl.store(c + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def ensemble_matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, splits: int = 1,
                    precision: str = "tf32x3", tile: Tuple[int, int, int, int, int] = (128, 64, 32, 4, 3)
                    ) -> torch.Tensor:
    """c[e] = a[e % len(a)] @ b[e] (+ bias[e]) for a (inputs, M, K), b (members, K, N), any strides; K in
    `splits` slices summed afterwards in a fixed order. tile: block M, N, K, warps, pipeline stages."""
    members, k, n = b.shape
    m = a.shape[1]
    block_m, block_n, block_k, warps, stages = tile
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    c = torch.empty((splits, members, m, n), device=a.device, dtype=torch.float32)
    bias = None if bias is None else bias.reshape(members, n).contiguous()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), members, splits)
    ensemble_matmul_kernel[grid](
        a, b, c, c if bias is None else bias, m, n, k, a.shape[0], *a.stride(), *b.stride(), *c.stride(),
        K_PER_SPLIT=k_per_split, HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return c[0] if splits == 1 else c.sum(0)


def products(members: int, rows: int, width: int, device: str) -> Dict[str, Tuple[Callable, Callable, torch.Tensor]]:
    """name -> (cuBLAS call, kernel call given splits, float64 reference) for one hidden layer's products."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(members, rows, width, device=device, generator=gen)
    w = torch.randn(members, width, width, device=device, generator=gen) / width ** 0.5
    bias = torch.randn(members, 1, width, device=device, generator=gen)
    g = torch.randn(members, rows, width, device=device, generator=gen)
    return {
        "forward x @ W + b": (lambda: torch.bmm(x, w) + bias, lambda s, **kw: ensemble_matmul(x, w, bias, **kw),
                              x.double() @ w.double() + bias.double()),
        "input grad g @ W^T": (lambda: torch.bmm(g, w.transpose(1, 2)),
                               lambda s, **kw: ensemble_matmul(g, w.transpose(1, 2), **kw),
                               g.double() @ w.double().transpose(1, 2)),
        # cuBLAS: one mm per member for few members, as EnsembleLinear does (its batched form is slow there)
        "weight grad x^T @ g": (lambda: (torch.stack([x[e].T @ g[e] for e in range(members)]) if members <= 2
                                         else torch.bmm(x.transpose(1, 2), g)),
                                lambda s, **kw: ensemble_matmul(x.transpose(1, 2), g, splits=s, **kw),
                                x.double().transpose(1, 2) @ g.double()),
    }


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def replay_us(call: Callable[[], torch.Tensor], calls: int = 20, rounds: int = 5) -> float:
    """Microseconds per call: `calls` calls captured in one CUDA graph, best of `rounds` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles here), on a side stream as graphs want
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="errors only, small shapes (works interpreted)")
    args = parser.parse_args()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1":
        device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
        for members, rows in ((2, 300), (4, 130)):
            for name, (_, kernel, want) in products(members, rows, 64, device).items():
                error = relative_error(kernel(3, tile=(32, 32, 16, 4, 2)), want)
                print(f"members {members}, rows {rows}, {name}: relative error {error:.1e}")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for members, splits in ((2, 16), (32, 1)):
        print(f"\n{members} members (one run: 2, a 16-seed stack: 32), 7936 rows, 256 wide; us per call "
              f"(relative error vs float64)")
        print("| product | cuBLAS fp32 | cuBLAS TF32 | Triton tf32x3 | Triton fp32 (ieee) |\n|---|---|---|---|---|")
        for name, (cublas, kernel, want) in products(members, 7936, 256, "cuda").items():
            cells = []
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                cells.append(f"{replay_us(cublas):.1f} ({relative_error(cublas(), want):.0e})")
            torch.backends.cuda.matmul.allow_tf32 = False
            for precision in ("tf32x3", "ieee"):
                call = lambda: kernel(splits, precision=precision)  # noqa: E731, B023 (called at once)
                cells.append(f"{replay_us(call):.1f} ({relative_error(call(), want):.0e})")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
