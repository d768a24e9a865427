"""The twin critics' weight gradient: one batched matmul, or one plain matmul per critic.

    python benchmarks/critic_matmul.py --device cuda

The weight gradient of a critic layer is x^T @ grad_out, a reduction over CORL's CQL batch of
256 states x (1 + 3 x 10) actions = 7936 rows. Profiling the update showed cuBLAS running the
batched form (bmm over the 2 critics) with a small-tile kernel at a fraction of the GPU's rate;
a plain matmul per critic can split the reduction over the rows. Each form is timed as a CUDA
graph replay (no launch overhead in the number) for each layer shape of the default critic.
"""
import argparse

import torch


def timed_us(fn, repeats: int = 200) -> float:
    """GPU microseconds per call, from a CUDA graph of the call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256 * 31)
    parser.add_argument("--members", type=int, default=2, help="2 critics, or 2 x seeds in a seed stack")
    args = parser.parse_args()
    device = torch.device("cuda")
    m = args.members
    print(f"weight gradient x^T @ g of {m} critics over {args.rows} rows (us per call, fp32, TF32 off)")
    for fan_in, fan_out in [(23, 256), (256, 256), (256, 1)]:
        x = torch.randn(m, args.rows, fan_in, device=device)
        g = torch.randn(m, args.rows, fan_out, device=device)
        out = torch.empty(m, fan_in, fan_out, device=device)

        def batched(x=x, g=g, out=out):  # called in this iteration: bind its tensors
            torch.bmm(x.transpose(1, 2), g, out=out)

        def per_critic(x=x, g=g, out=out):
            for e in range(m):
                torch.mm(x[e].T, g[e], out=out[e])

        reference = torch.bmm(x.double().transpose(1, 2), g.double())
        batched()
        err_b = float((out.double() - reference).norm() / reference.norm())
        per_critic()
        err_p = float((out.double() - reference).norm() / reference.norm())
        t_b, t_p = timed_us(batched), timed_us(per_critic)
        print(f"  {fan_in:>3}->{fan_out:<3}  bmm {t_b:7.1f}  mm per critic {t_p:7.1f}  ({t_b / t_p:4.1f}x)  "
              f"rel. error vs float64: {err_b:.1e} / {err_p:.1e}")


if __name__ == "__main__":
    main()
