"""torch.compile of one training step on CPU: graph breaks, ops per step, and time per sample, ours vs RecBole SASRec.

    python -m benchmarks.bench_compile                                 # counts for h64-text and paper-mm
    python -m benchmarks.bench_train_step --compile --previous '' --cases h64-text paper-mm
                                                                       # CPU-ms per sample, eager vs compiled
    pytest benchmarks/bench_compile.py --benchmark-only                # eager vs compiled step (h64-text, batch 64)

Counts per training step (fwd + bwd of the loss; the optimizer step is not included):
    graph breaks      torch._dynamo.explain of the loss (fullgraph=True compiles only with 0)
    ops per step      leaf events of torch.profiler over one fwd + bwd: the aten / registered ops that do work
                      (eager: every kernel; compiled: the ops the generated code still calls - GEMMs, our
                      torch.ops.mmm4rec.* - plus inductor's fused C++ kernels)
    fused kernels     kernels inductor generated for the forward and backward graphs (compiled only)
On a GPU each dispatched op and each fused kernel is one kernel launch; CUDA graphs (mode="reduce-overhead")
replay the whole compiled step as one launch.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.bench_train_step import CASES, build, build_sasrec, make_batch


def launched_ops(loss_fn, batch) -> int:
    """Leaf events of one fwd + bwd under torch.profiler: the ops that do work (an op that only calls other ops is
    not counted), plus inductor's fused C++ kernels (recorded with cpp.enable_kernel_profile)."""
    from torch.profiler import ProfilerActivity, profile
    loss_fn(*batch).backward()                               # warm (compiles once when compiled)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_fn(*batch).backward()
    skip = ("ProfilerStep", "autograd::engine", "Torch-Compiled Region", "## ", "CompiledFunction")
    return sum(1 for e in prof.events() if not e.cpu_children and not e.name.startswith(skip))


def graph_breaks(loss_fn, batch) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(loss_fn)(*batch).graph_break_count


def compile_loss(loss_fn, batch, fullgraph: bool):
    """(compiled loss, fused kernels inductor generated for its forward and backward graphs)."""
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics
    inductor_config.cpp.enable_kernel_profile = True         # fused kernels show up in torch.profiler
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(loss_fn, fullgraph=fullgraph, dynamic=True)
    compiled(*batch).backward()
    return compiled, metrics.generated_kernel_count


def rows(case_name: str, batch_size: int, device: str = "cpu"):
    import mmm4rec.model as now
    case = CASES[case_name]
    batch = tuple(t.to(device) for t in make_batch(case["items"], batch_size))
    out = []
    variants = [("MMM4Rec (ours)", lambda: build(now, case, device=device), True)]
    try:
        import recbole  # noqa: F401
        variants.append(("RecBole SASRec", lambda: build_sasrec(case, device=device), False))
    except ImportError:
        print("recbole not installed: no SASRec rows")
    for name, make, fullgraph in variants:
        model, _ = make()
        eager_ops = launched_ops(model.loss, batch)
        breaks = graph_breaks(model.loss, batch)
        compiled, kernels = compile_loss(model.loss, batch, fullgraph and breaks == 0)
        compiled_ops = launched_ops(compiled, batch)
        out.append((case_name, name, breaks, eager_ops, compiled_ops, kernels))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["h64-text", "paper-mm"], choices=sorted(CASES))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (ops counted on the host: each launches kernels)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.device}, batch {a.batch_size}; per training step (loss fwd + bwd)")
    print("| case | model | graph breaks | ops per step, eager | ops per step, compiled | of which fused kernels |")
    print("|---|---|---|---|---|---|")
    for case in a.cases:
        for r in rows(case, a.batch_size, a.device):
            print("| " + " | ".join(str(v) for v in r) + " |", flush=True)
    return 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_train_step_h64(benchmark, compiled):
    import mmm4rec.model as now
    case = CASES["h64-text"]
    model, opt = build(now, case)
    batch = make_batch(case["items"], 64)
    loss = torch.compile(model.loss, fullgraph=True, dynamic=True) if compiled else model.loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss(*batch).backward()
        opt.step()
    step()                                   # compiles outside the timing
    benchmark(step)


if __name__ == "__main__":
    raise SystemExit(main())
