"""
bench/bench_memory.py: what a training step and an evaluation of each config cost on a GPU, found
without one: the peak memory of the step (eager and compiled) and of evaluation, measured on fake
tensors, and a roofline model of the step's time and MFU.

    python bench/bench_memory.py                                  # every configs/*.json
    python bench/bench_memory.py --config configs/paper_300m.json --gpu_gib 79.6   # one config, nvidia-smi's size
    python bench/bench_memory.py --tokens 0.8 12.8   # and the model's hours of 0.8B and 12.8B training tokens

Reads the configs (train.py's TrainConfig files); writes nothing. Runs on the CPU in about half a
minute per config: no tensor here holds data. Exit code 1 if a config does not fit.

What is measured. For each config, at its batch_size, block_size, grad_accum and eval_batch_size
and the vocabulary of its preset (the 128,256 ids of Llama 3 for 150M and 300M), the GPT is built,
trained and evaluated on fake tensors (torch's FakeTensorMode: shapes, dtypes and storages, no
data) on the CPU device, under the memory tracker PyTorch provides
(torch.distributed._tools.mem_tracker.MemTracker), which adds up the bytes of every storage alive
after each operation and keeps the peak:
    step        a warm-up step (it creates AdamW's state, and compiles), then two optimizer steps of
                min(grad_accum, 2) micro-steps each (from the second micro-step on, the gradients
                of the earlier ones are held while the next backward runs): forward, loss,
                backward, gradient clipping, fused AdamW, zero_grad, as train.py runs them.
                Parameters, gradients, optimizer state, activations and temporaries all count.
    evaluation  one forward of eval_batch_size windows under no_grad with per-token losses (what
                train.py's evaluation runs, through the compiled model when training is compiled),
                with the parameters and AdamW's state of the run resident.
The step runs the model's CUDA code path: bfloat16 autocast (on the CPU device; its casts are the
same for this model's operations: matmuls in bfloat16, embedding, residual stream, norms and loss
in float32) and causal attention through one F.scaled_dot_product_attention(is_causal=True) call,
as model.causal_attention does on CUDA (the CPU's blocked kernel is swapped out: on the CPU device
SDPA's fused flash kernel then saves what CUDA's does, the output and its log-sum-exp). RMSNorm
keeps the CPU path's hand-written function: it saves what CUDA's fused F.rms_norm saves (one
float32 tensor of the input's size and the per-row rstd), where F.rms_norm on the CPU is composite
and would save one more.

What is an estimate, and why.
  * compiled: torch.compile(model) with a backend that is inductor's front half: the forward and
    backward graphs dynamo captures, with inductor's decompositions, split by the partitioner
    inductor uses (min-cut rematerialization: what is saved for the backward and what is
    recomputed there), run op by op on fake tensors under the tracker. What the compiled step
    saves between forward and backward is therefore measured; its temporaries are not: inductor
    fuses chains of operations into one kernel that never writes the intermediate tensors, which
    this run materializes one by one, so the compiled figure is an upper estimate of that part
    (inductor's own memory planning is not run: it needs the GPU to compile kernels).
  * document and megadoc masks: measured with causal attention, whose kernel saves the same
    tensors as flex_attention's (query, key, value, output, log-sum-exp); the BlockMask they add is
    measured on its own (printed; under 1 MiB at these shapes). FlexAttention has no backward on the
    CPU, so the flex path itself cannot run here.
  * not counted: the CUDA context and the kernels' code (typically several hundred MiB), cuBLAS and
    attention workspaces, the caching allocator's rounding and fragmentation, NCCL's buffers under
    torchrun. The goal
    leaves 10% of the GPU for them: every peak must be under 90% of --gpu_gib (default 74.5 GiB,
    the 80 GB of an H100 counted in 10^9 bytes; nvidia-smi shows 79.6 GiB).
  * time and MFU: a model; no GPU was measured. Each operation is timed as max(FLOPs / (75% of
    the peak), bytes read and written / memory bandwidth), the per-operation roofline of PyTorch's
    own cost model (torch.utils._runtime_estimation), on an H100 SXM by default (--peak_tflops 989,
    --hbm_tbps 3.35), with FLOPs from torch.utils.flop_counter (attention: 2 matmuls forward and 5
    backward over half the T x T scores, causal). eager: every operation of one micro-step (x
    grad_accum) and of the optimizer step, each its own kernel whose inputs and outputs go through
    memory. compiled: the compiled graphs' matmuls and attention kernels as in eager, and
    everything else fused: a tensor goes through memory once each way only where a matmul or
    attention kernel produces or reads it or where a graph takes or returns it (what the forward
    saves for the backward among them), the intermediates between never (inductor fuses most such
    chains, not all: the figure is optimistic there), plus the eager optimizer step. bound: the
    matmuls and attention at 75% of the peak and nothing else. MFU is evaluate.training_flops per
    token x tokens/s over the peak (the model's FLOPs: the loss's recomputed logits and the
    attention backward's recomputed scores cost time, not FLOPs).
"""
import contextlib
import functools
import glob
import operator
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import model as model_module  # noqa: E402
import train  # noqa: E402
from evaluate import training_flops  # noqa: E402
from model import GPT, PRESETS, document_ids  # noqa: E402

GIB = 2 ** 30


class Tracker(MemTracker):
    """MemTracker that also sees the operations a torch.compile'd graph runs (dynamo otherwise
    falls back to eager under a dispatch mode)."""

    @classmethod
    def ignore_compile_internals(cls):
        return True


@contextlib.contextmanager
def cuda_code_path():
    """model.causal_attention as it runs on CUDA: SDPA's fused causal kernel, in one call."""
    cpu_kernel = model_module.causal_attention
    model_module.causal_attention = lambda q, k, v, enable_gqa=False: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=enable_gqa)
    try:
        yield
    finally:
        model_module.causal_attention = cpu_kernel


def compile_backend(graphs):
    """torch.compile's graphs as inductor partitions them, run op by op (see the docstring); each
    is appended to `graphs` as (kind, GraphModule), kind "forward", "backward" or "inference"."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"), inference_compiler=keep("inference"),
                        decompositions=select_decomp_table(),
                        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))


# -----------------------------------------------------------------------------
# the roofline model of a step's time

aten = torch.ops.aten
# FLOPs of the attention kernels: matmuls over half the T x T scores (causal), forward and backward
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: 2, aten._scaled_dot_product_flash_attention_for_cpu_backward: 5}
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}   # with ATTENTION: what a compiler leaves as its own kernels


def tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def tensor_bytes(tree):
    """Bytes the tensors of `tree` occupy (a broadcast tensor: its storage, read once)."""
    return sum(t.untyped_storage().nbytes() if 0 in t.stride() else t.numel() * t.element_size() for t in tensors(tree))


def op_flops(func, args, kwargs, out):
    packet = func.overloadpacket
    if packet in ATTENTION:
        q, k = args[1:3] if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward else args[:2]
        B, H, T, D = q.shape
        return ATTENTION[packet] * 2 * B * H * T * k.size(2) * D / 2
    return flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0


class Roofline(TorchDispatchMode):
    """The model's seconds of every operation run under it, one kernel each: max(FLOPs / (75% of
    the peak), bytes read and written / bandwidth), summed; and the compute of the matmuls and
    attention alone (the bound)."""

    def __init__(self, peak_flops, bandwidth):
        super().__init__()
        self.peak, self.bandwidth = peak_flops, bandwidth
        self.seconds = self.compute_seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name.startswith("prim::"):
            return out
        written = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info and arg.alias_info.is_write]
        compute = op_flops(func, args, kwargs, out) / (0.75 * self.peak)
        self.compute_seconds += compute
        self.seconds += max(compute, tensor_bytes((args, kwargs, out, written)) / self.bandwidth)
        return out


def fused_seconds(gm, peak_flops, bandwidth):
    """The model's seconds of one graph of a compiled step: every matmul and attention kernel as in
    Roofline, and everything else fused: a tensor goes through memory only where a matmul or
    attention kernel produces or needs it, or where the graph takes or returns it (the tensors
    saved for the backward among them); the intermediates of the fused operations never do."""
    def is_alias(n):   # views and tuple items are the tensor they come from
        return n.op == "call_function" and (n.target is operator.getitem or
                                            (isinstance(n.target, torch._ops.OpOverload) and n.target.is_view))

    def base(n):
        while is_alias(n):
            n = n.args[0]
        return n

    def kind(n):
        if n.op == "call_function" and not is_alias(n):
            return "kernel" if n.target.overloadpacket in MATMULS or n.target.overloadpacket in ATTENTION else "fused"
        return n.op   # placeholder, output, or an alias

    seconds, written, read = 0.0, set(), set()
    for n in gm.graph.nodes:
        if kind(n) in ("kernel", "output"):
            written.update(b for b in map(base, n.all_input_nodes) if kind(b) == "fused")
        if kind(n) == "kernel":
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            compute = op_flops(n.target, args, kwargs, n.meta["val"]) / (0.75 * peak_flops)
            seconds += max(compute, tensor_bytes((args, kwargs, n.meta["val"])) / bandwidth)
        elif kind(n) == "fused":
            read.update(a for a in n.all_input_nodes if kind(base(a)) in ("kernel", "placeholder"))
    moved = sum(tensor_bytes(n.meta["val"]) for n in written | read)
    return seconds + moved / bandwidth


# -----------------------------------------------------------------------------
# one config


def fake_run(cfg, model_cfg, compiled, peak_flops, bandwidth):
    """On fake tensors, eager or compiled: {"step", "evaluation": peak bytes, "seconds": the model's
    seconds of one optimizer step (grad_accum micro-steps), "bound": its matmuls' and attention's
    compute alone, "block_mask": the bytes of a document mask's BlockMask}."""
    micro_steps = min(cfg.grad_accum, 2)
    B, T = cfg.batch_size, model_cfg.block_size
    results, graphs = {}, []
    with cuda_code_path(), FakeTensorMode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global hooks on modules")   # the tracker's own hooks
        torch.manual_seed(0)
        model = GPT(model_cfg)
        optimizer = torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr, fused=True)
        tokens = torch.randint(0, model_cfg.vocab_size, (micro_steps, B, T + 1))
        eval_tokens = torch.randint(0, model_cfg.vocab_size, (cfg.eval_batch_size, T + 1))
        torch._dynamo.reset()   # each config compiles afresh (not as a recompilation of the one before)
        run = torch.compile(model, backend=compile_backend(graphs), dynamic=False) if compiled else model
        precision = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

        def backward(micro, after_backward):
            x, y = tokens[micro, :, :-1], tokens[micro, :, 1:]
            with precision():
                _, loss = run(x, y, doc_ids=document_ids(x, 0), mask_kind="causal")
                (loss / micro_steps).backward()
            after_backward()

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def step(after_backward=lambda: None):
            for micro in range(micro_steps):
                backward(micro, after_backward)
            optimizer_step()

        @torch.no_grad()
        def evaluation(after_backward=None):
            x, y = eval_tokens[:, :-1], eval_tokens[:, 1:]
            model.eval()
            with precision():
                run(x, y, doc_ids=document_ids(x, 0), mask_kind="causal", reduction="none")
            model.train()

        step()
        evaluation()   # warm-up: AdamW's state exists, every graph is compiled
        for name, work, repeats in (("step", step, 2), ("evaluation", evaluation, 1)):
            tracker = Tracker()
            tracker.track_external(model, optimizer, tokens, eval_tokens)
            with tracker:   # (its per-module statistics, which are not used, allow one forward each)
                for _ in range(repeats):
                    work(tracker.reset_mod_stats)
            results[name] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

        # time: one micro-step, grad_accum times, and one optimizer step
        micro, update = Roofline(peak_flops, bandwidth), Roofline(peak_flops, bandwidth)
        with micro:
            backward(0, lambda: None)
        with update:
            optimizer_step()
        if compiled:
            micro.seconds = sum(fused_seconds(gm, peak_flops, bandwidth) for kind, gm in graphs if kind != "inference")
        results["seconds"] = cfg.grad_accum * micro.seconds + update.seconds
        results["bound"] = cfg.grad_accum * micro.compute_seconds + update.compute_seconds
        x = tokens[0, :, :-1]
        mask = model.build_mask("document", document_ids(x, 0), None, B, T, x.device, "flex")
        results["block_mask"] = tensor_bytes(mask.as_tuple())
    return results


def main(argv=None):
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--config", nargs="+", default=sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))),
                    help="train.py config files (default: every configs/*.json)")
    ap.add_argument("--gpu_gib", type=float, default=80e9 / GIB, help="the GPU's memory in GiB (default: 80 GB)")
    ap.add_argument("--headroom", type=float, default=0.1, help="the share of the GPU left free (goal)")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for the model (H100 SXM)")
    ap.add_argument("--hbm_tbps", type=float, default=3.35, help="memory bandwidth in TB/s (H100 SXM)")
    ap.add_argument("--tokens", type=float, nargs="*", default=[], help="training token counts (in billions) to "
                    "print the model's hours of, at each config's compiled MFU")
    args = ap.parse_args(argv)
    configs = []
    try:
        for path in args.config:
            cfg = train.load_config(["--config", path])
            configs.append((path, cfg, train.model_config(cfg, PRESETS[cfg.model]["vocab_size"])))
    except (ValueError, KeyError) as e:
        cli.fail(e)
    limit = (1 - args.headroom) * args.gpu_gib
    peak, bandwidth = args.peak_tflops * 1e12, args.hbm_tbps * 1e12
    print(f"Peak GPU memory in GiB, measured on fake tensors (goal: under {limit:.1f} GiB, {1 - args.headroom:.0%} of "
          f"{args.gpu_gib:.1f}); a model's step time and MFU on {args.peak_tflops:g} TFLOP/s and {args.hbm_tbps:g} TB/s")
    print(f"{'config':<16} {'step':>13} {'vocab':>7} | {'memory: step':>12} {'compiled':>8} {'eval':>6} {'compiled':>8} "
          f"{'fits':>4} | {'model: step s':>13} {'compiled':>8} {'MFU':>5} {'compiled':>8} {'bound':>5}")
    failed, hours = False, []
    for path, cfg, model_cfg in configs:
        eager, comp = (fake_run(cfg, model_cfg, compiled, peak, bandwidth) for compiled in (False, True))
        peaks = [eager["step"], comp["step"], eager["evaluation"], comp["evaluation"]]
        fits = max(peaks) + eager["block_mask"] < limit * GIB
        failed |= not fits
        flops = training_flops(vars(model_cfg), cfg.batch_size * cfg.grad_accum * model_cfg.block_size)
        utilization = [flops / seconds / peak for seconds in (eager["seconds"], comp["seconds"], eager["bound"])]
        print(f"{os.path.basename(path):<16} {f'{cfg.grad_accum} x {cfg.batch_size} x {model_cfg.block_size}':>13} "
              f"{model_cfg.vocab_size:>7} | " + " ".join(f"{p / GIB:>{w}.2f}" for p, w in zip(peaks, (12, 8, 6, 8))) +
              f" {'yes' if fits else 'NO':>4} | {eager['seconds']:>13.3f} {comp['seconds']:>8.3f} "
              + " ".join(f"{u:>{w}.1%}" for u, w in zip(utilization, (5, 8, 5))))
        per_token = training_flops(vars(model_cfg), 1) / (utilization[1] * peak) / 3600
        hours.append(f"{os.path.basename(path)}: " + ", ".join(f"{b:g}B tokens {b * 1e9 * per_token:.2f} h"
                                                                for b in args.tokens))
    print(f"step: grad_accum x batch_size x block_size; memory: eager, and compiled (torch.compile's partitioned "
          f"graphs op by op: an upper estimate); the document and megadoc masks add their BlockMask (counted in "
          f"'fits'; {eager['block_mask'] / 2 ** 20:.2f} MiB at batch {cfg.batch_size} x {model_cfg.block_size}). "
          f"model (no GPU was measured): eager = every "
          f"operation through memory, compiled = all but matmuls and attention fused, bound = matmuls and attention "
          f"at 75% of the peak alone")
    if args.tokens:
        print("hours of training on one such GPU at the compiled model's MFU: " + "; ".join(hours))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
