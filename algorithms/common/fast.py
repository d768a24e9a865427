"""The speed mechanics under the scripts' readable math, each switchable and checked against the plain path in
the tests: the ensemble matmul (every critic of every run of a stack in one batched matmul), the views that
give each run of a stack its own one-run state dict, the graph-captured update step, and Adam's step compiled.

Nothing here knows the algorithm: a script passes its update function, its phases, its metric names and the
layout of its stacked parameters.
"""
import ctypes
import logging
import os
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from algorithms.common.config import ConfigError

PER_MEMBER_GRAD_UP_TO = 2  # ensemble members up to which EnsembleLinear's weight gradient goes member by member


class EnsembleLinear(torch.autograd.Function):
    """y[e] = x[e % len(x)] @ weight[e] + bias[e] for every member e: x shared by all members when
    its first dim is 1, one x per member, or (seed stacks, members ordered critic-major) one x per seed.
    bias may be None. With weight_rows k, only the first k rows of each member reach the weight and bias
    gradients (the rest, policy rows of EnsembleCritic's one pass, pass their gradient to x only).

    The same as torch.baddbmm, but faster on a GPU: bmm then a bias add (that torch.compile fuses
    with the following relu), as baddbmm first copies the bias into every output row and then runs
    a slower accumulating kernel (1.4x the time of bmm + add at the critics' shapes on an H100); and
    for a few members the weight gradient is one plain matmul per member: cuBLAS runs the batched
    x^T @ grad_y of 2 members, a reduction over all batch rows, with a small-tile kernel 4-6x slower
    (benchmarks/critic_matmul.py); with many members (seed stacks) the batched form fills the GPU.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                weight_rows: Optional[int] = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.weight_rows = weight_rows
        members, inputs = weight.shape[0], x.shape[0]
        if inputs == 1:
            x = x.expand(members, -1, -1)
        elif inputs < members:
            x = x.repeat(members // inputs, 1, 1)  # member e reads x[e % inputs]
        y = torch.bmm(x, weight)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        members, inputs = weight.shape[0], x.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_y, weight.transpose(1, 2))
            if inputs < members:  # the members that share an input add their gradients
                grad_x = grad_x.unflatten(0, (members // inputs, inputs)).sum(0)
        if ctx.weight_rows is not None:
            x, grad_y = x[:, :ctx.weight_rows], grad_y[:, :ctx.weight_rows]
        if ctx.needs_input_grad[1] and members <= PER_MEMBER_GRAD_UP_TO:
            grad_weight = torch.stack([x[e % inputs].T @ grad_y[e] for e in range(members)])
        elif ctx.needs_input_grad[1]:
            per_member_x = x.repeat(members // inputs, 1, 1) if inputs < members else x
            grad_weight = torch.bmm(per_member_x.transpose(1, 2), grad_y)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(1, keepdim=True)
        return grad_x, grad_weight, grad_bias, None


# A stack's parameters as one-run tensors: (part, one-run name, stacked tensor, view of run i). A script
# lists its networks' parameters in its one-run trainer's order (see CQL._run_layout); part is a state-dict
# entry ("actor", ...), name its key inside it, or "" for a tensor that is the entry itself.
RunLayout = List[Tuple[str, str, torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]]


def _adam_indices(layout: RunLayout, optimizer: torch.optim.Optimizer
                  ) -> List[Tuple[int, int, torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]]:
    """(index in a one-run optimizer state, index in the stack's, stacked parameter, view of run i) of every
    trained parameter: those of the layout that the optimizer steps, in the layout's (the one-run) order."""
    stacked_index = {id(p): k for k, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    trained = [(tensor, view) for _, _, tensor, view in layout if id(tensor) in stacked_index]
    return [(j, stacked_index[id(tensor)], tensor, view) for j, (tensor, view) in enumerate(trained)]


def run_state_dict(layout: RunLayout, optimizer: torch.optim.Optimizer, run: int) -> Dict[str, Any]:
    """Run `run` of a stack as a one-run trainer's state dict (copies): its parts and its optimizer state."""
    state: Dict[str, Any] = {part: {} for part, name, _, _ in layout if name}
    for part, name, tensor, view in layout:
        if name:
            state[part][name] = view(tensor.detach(), run).clone()
        else:
            state[part] = view(tensor.detach(), run).clone()
    adam = optimizer.state_dict()
    adam_state = adam["state"]
    run_adam = {j: {key: v.clone() if key == "step" else view(v, run).clone() for key, v in adam_state[k].items()}
                for j, k, _, view in _adam_indices(layout, optimizer) if k in adam_state}
    state["optimizer"] = {"state": run_adam, "param_groups": adam["param_groups"]}
    return state


def load_run_state_dicts(layout: RunLayout, optimizer: torch.optim.Optimizer, states: List[Dict[str, Any]]) -> None:
    """Loads one one-run state dict per run of the stack into the stacked tensors and optimizer (a RuntimeError
    or KeyError for one that does not fit)."""
    def gather(tensor: torch.Tensor, view: Callable, values: List[torch.Tensor]) -> torch.Tensor:
        stacked = torch.empty_like(tensor)
        for i, value in enumerate(values):
            target = view(stacked, i)
            if target.shape != value.shape:
                raise RuntimeError(f"size mismatch: {tuple(value.shape)} in a checkpoint, {tuple(target.shape)} here")
            target.copy_(value)
        return stacked

    with torch.no_grad():
        for part, name, tensor, view in layout:
            values = [s[part][name] if name else s[part] for s in states]
            tensor.copy_(gather(tensor, view, [torch.as_tensor(v).to(tensor.device) for v in values]))
    adam = optimizer.state_dict()
    adam["state"] = {}
    for j, k, tensor, view in _adam_indices(layout, optimizer):
        runs = [s["optimizer"]["state"].get(j) for s in states]
        if any(r is None for r in runs):
            if any(r is not None for r in runs):
                raise RuntimeError(f"optimizer state of parameter {j} is in some run states only")
            continue
        adam["state"][k] = {key: runs[0][key].clone() if key == "step" else
                            gather(tensor, view, [r[key].to(tensor.device) for r in runs]) for key in runs[0]}
    optimizer.load_state_dict(adam)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's capturable/fused/foreach flags: Adam takes the
    saved run's with its state, but a CPU checkpoint may go on under CUDA graphs, a "stop" run's with
    on_nonfinite "skip", a compiled step's without, and back; step counts move where this flavour keeps them."""
    flavour = [(group["capturable"], group["fused"], group["foreach"]) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (capturable, fused, foreach) in zip(optimizer.param_groups, flavour):
        group["capturable"], group["fused"], group["foreach"] = capturable, fused, foreach
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            if "step" in param_state:
                param_state["step"] = param_state["step"].to(param.device if capturable or fused else "cpu")


def compiled_adam_step(optimizer: torch.optim.Adam) -> Callable[[], Any]:
    """Adam's step as foreach Adam under torch.compile, which fuses it into a few kernels: one run's step of
    CQL takes 12 us instead of fused Adam's 68 (H200), 8% more updates/s. Fused Adam stays where it pays or is
    needed: a stack (at 16 seeds 59 us against 101, but 1% faster for 12 MiB more GPU memory per seed), and
    a step that must read found_inf (on_nonfinite "skip")."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, True
    # Dynamo says once that it leaves Optimizer.step's profiler range out: nothing a user can act on
    logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)
    return torch.compile(optimizer.step)


# glibc's malloc hands large freed blocks back to the OS: a block above its mmap threshold (dynamic, from 128 KiB
# up to 32 MiB) is unmapped when freed, and free memory above the trim threshold (twice that) at the heap's top is
# returned. An update on the CPU allocates and frees tens of MiB of activations and gradients (a critic layer's
# output is 8 MiB at CORL's shapes), so each update page-faulted them in again: ~15k page faults and a quarter of
# its CPU time in the kernel (benchmarks/finetune_phases.py, docs/speed.md). Kept for reuse, peak memory the same.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 1 << 30
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own settings, when a user gives them


def keep_freed_host_memory(device: torch.device) -> bool:
    """For a run on the CPU under glibc: malloc keeps freed memory for the next update instead of returning it to
    the OS (mallopt of the mmap and trim thresholds; the math is untouched). Not where the device is a GPU, the C
    library has no mallopt, or MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set them. Returns whether it did."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return mallopt(m_trim_threshold, TRIM_THRESHOLD) == 1 and mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1


class RunStreams:
    """Each run's own random stream on the training device, for its batches and noise: run k of a --seeds stack
    draws exactly what the run with seed k draws alone (a stack of one). starts: on the CPU, each run's CPU
    stream right after its networks were made (where a lone run's global stream stands when it starts to
    draw); on a GPU each stream starts from its seed, as a lone run's device stream does."""

    def __init__(self, device: torch.device, seeds: List[int], starts: List[torch.Tensor], stacked: bool):
        self.device, self.stacked = device, stacked
        self.generators = [torch.Generator(device) for _ in seeds]
        for generator, seed, start in zip(self.generators, seeds, starts):
            if device.type == "cpu":
                generator.set_state(start)
            else:
                generator.manual_seed(seed)

    def draw(self, sample: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """sample(*args, generator=, device=) of each run, stacked on a leading run dim for a stack."""
        draws = [sample(*args, generator=generator, device=self.device) for generator in self.generators]
        return torch.stack(draws) if self.stacked else draws[0]

    def randn(self, *shape: int) -> torch.Tensor:
        return self.draw(torch.randn, shape)

    def rand(self, *shape: int) -> torch.Tensor:
        return self.draw(torch.rand, shape)

    def randint(self, high: Union[int, Sequence[int]], *shape: int) -> torch.Tensor:
        """Integers in [0, high); a stack's high may be a list, one for each run."""
        highs = [high] * len(self.generators) if isinstance(high, int) else high
        draws = [torch.randint(0, h, shape, generator=g, device=self.device) for g, h in zip(self.generators, highs)]
        return torch.stack(draws) if self.stacked else draws[0]

    def states(self) -> List[torch.Tensor]:
        return [generator.get_state() for generator in self.generators]

    def resume(self, checkpoints: List[Dict[str, Any]]) -> None:
        """Each run's stream from its checkpoint's 'streams' entry; a checkpoint written before runs had streams
        of their own holds the global ones: a lone run's go on from them, a stack's runs from their seeds (they
        drew from one stream then)."""
        for generator, checkpoint in zip(self.generators, checkpoints):
            if checkpoint.get("stream") is not None:
                generator.set_state(checkpoint["stream"].cpu())
            elif not self.stacked:
                rng = checkpoint["run"]["rng"]
                generator.set_state((rng["torch"] if self.device.type == "cpu" else
                                     rng["cuda"][self.device.index or 0]).cpu())
            else:
                generator.manual_seed(checkpoint["config"]["seed"] + 1_000_003 * checkpoint["total_it"])


class UpdateStep:
    """Calls update(phase) for the next phase, and adds its metrics to a device-side running sum.

    update(phase) draws a batch, updates and returns the metrics (device tensors of shape run_shape) by name;
    next_phase() counts the update and says its phase (a hashable tuple: behaviour cloning or not, ...). With
    cudagraphs (cuda only) the whole update, from sampling to the optimizer step and the metric sum, is
    recorded once per phase after a few eager updates, then replayed: one launch instead of hundreds; what
    changes during a run must then be a device tensor written in place. With found_inf (on_nonfinite "skip": a
    device scalar update sets to 1 for a non-finite update) a skipped update adds nothing to the sums and one
    to `skipped_updates`; the means are over the updates kept.
    """

    WARMUP = 3  # eager updates before capture: lazy init of Adam state, cuBLAS and compilation

    def __init__(self, update: Callable[[Hashable], Dict[str, torch.Tensor]], next_phase: Callable[[], Hashable],
                 metric_names: Tuple[str, ...], run_shape: Tuple[int, ...], optimizer: torch.optim.Optimizer,
                 device: torch.device, cudagraphs: bool = False, found_inf: Optional[torch.Tensor] = None,
                 generators: Sequence[torch.Generator] = ()):
        self.update, self.next_phase, self.optimizer, self.found_inf = update, next_phase, optimizer, found_inf
        self.generators = generators  # the runs' own streams (RunStreams): a captured graph advances them
        self.cudagraphs = cudagraphs and device.type == "cuda"
        self.metric_names: List[str] = list(metric_names)
        self.metric_sum = torch.zeros(len(self.metric_names), *run_shape, device=device)
        self.skipped_updates = torch.zeros((), device=device)  # skipped updates in the window (all runs')
        self.graphs: Dict[Hashable, Any] = {}
        self.eager_updates: Dict[Hashable, int] = {}

    def _update(self, phase: Hashable) -> None:
        metrics = self.update(phase)
        values = torch.stack([metrics[name] for name in self.metric_names])
        if self.found_inf is None:
            self.metric_sum += values
            return
        self.metric_sum += torch.where(self.found_inf.bool(), 0.0, values)  # not a product: NaN * 0 is NaN
        self.skipped_updates += self.found_inf

    def __call__(self) -> None:
        phase = self.next_phase()
        if not self.cudagraphs:
            return self._update(phase)
        graph = self.graphs.get(phase)
        if graph is not None:
            return graph.replay()
        if self.eager_updates.get(phase, 0) < self.WARMUP:  # on a side stream, as CUDA graphs want
            self.eager_updates[phase] = self.eager_updates.get(phase, 0) + 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._update(phase)
            torch.cuda.current_stream().wait_stream(stream)
            return None
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self._update(phase)
        self.graphs[phase] = graph
        graph.replay()  # capture records without running: this replay is the update itself
        return None

    def take_means(self, updates: int) -> Dict[str, float]:
        """Mean of each metric over the last `updates` updates; the one host sync per log interval."""
        return self.take_run_means(updates)[0]

    def run_metric_sum(self, run: int) -> torch.Tensor:
        """Run `run`'s metric sums (a view): the whole sum for a one-run trainer."""
        return self.metric_sum if self.metric_sum.dim() == 1 else self.metric_sum[:, run]

    def take_run_means(self, updates: int) -> List[Dict[str, float]]:
        """take_means for each run: one dict for a one-run trainer, one per seed for a stack. With
        found_inf: means over the updates not skipped, and skipped_updates, their count."""
        sums = self.metric_sum.reshape(len(self.metric_names), -1)
        if self.found_inf is None:
            means = (sums / updates).T.tolist()
            self.metric_sum.zero_()
            return [dict(zip(self.metric_names, run)) for run in means]
        kept = (updates - self.skipped_updates).clamp(min=1)  # none kept: the sums are 0 and the loop stops
        rows = torch.cat([sums / kept, self.skipped_updates.expand(1, sums.shape[1])]).T.tolist()
        self.metric_sum.zero_()
        self.skipped_updates.zero_()
        return [{**dict(zip(self.metric_names, run)), "skipped_updates": int(run[-1])} for run in rows]


# ---- Whether torch.compile can build its kernels here. Inductor compiles generated code with a host compiler at
# run time, and PyTorch's CUDA runtime Docker images had none until December 2025 (pytorch issue #116696): without
# one the first compiled call dies deep inside Inductor. The lookups mirror torch's and Triton's (torch 2.9-2.13,
# Triton 3.x): on cuda, Triton builds each kernel's launcher stub with $CC, else gcc, else clang on PATH, plus the
# C headers (triton/runtime/build.py); on the CPU, Inductor's C++ backend takes $CXX, else g++ (clang++ on macOS),
# when `<it> --version` runs (torch/_inductor/cpp_builder.py).
FIX = "install one (apt-get install {package}) or set --compile=false"


def _c_compiler() -> Optional[str]:
    """Triton's choice: $CC (used as given), else gcc, else clang on PATH; None when there is none."""
    cc = os.environ.get("CC")
    if cc is not None:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("clang")


def _cxx_compiler() -> Optional[str]:
    """Inductor's choice for CPU kernels: $CXX, else g++ (clang++ on macOS), if `<it> --version` runs."""
    cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    path = shutil.which(cxx)
    if path is None:
        return None
    try:
        subprocess.run([path, "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def c_compiler_problem(device: Optional[str] = None) -> Optional[str]:
    """None when torch.compile can build its kernels for `device` ("cuda", "cpu", a torch.device or its
    str, e.g. "cuda:0"); else one line naming what is missing and the fix. device None checks both the
    cuda (C compiler) and the cpu (C++ compiler) needs."""
    kind = None if device is None else str(device).split(":", 1)[0]
    if kind in (None, "cuda") and _c_compiler() is None:
        if "CC" in os.environ:
            return (f"torch.compile needs a C compiler, and CC={os.environ['CC']!r} is not one on PATH: "
                    "unset CC or point it at gcc or clang, " + FIX.format(package="gcc"))
        return "torch.compile needs a C compiler (gcc or clang) on PATH: " + FIX.format(package="gcc")
    if kind in (None, "cpu") and _cxx_compiler() is None:
        if "CXX" in os.environ:
            return (f"torch.compile on the CPU needs a C++ compiler, and CXX={os.environ['CXX']!r} does not run: "
                    "unset CXX or point it at g++, " + FIX.format(package="g++"))
        return "torch.compile on the CPU needs a C++ compiler (g++) on PATH: " + FIX.format(package="g++")
    return None


def resolve_compile(setting: Optional[bool], device: torch.device) -> bool:
    """The compile field: None is on for cuda where torch.compile can build its kernels (else off, with one line
    saying why); true where it cannot is a ConfigError naming what is missing and the fix."""
    wanted = device.type == "cuda" if setting is None else setting
    problem = c_compiler_problem(device.type) if wanted else None
    if problem and setting is None:
        tqdm.write(f"note: not compiling the update ({problem})", file=sys.stderr)
        return False
    if problem:
        raise ConfigError(f"field 'compile': {problem}")
    return wanted
