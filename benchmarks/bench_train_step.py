"""CPU cost of one MMM4Rec training step per sample: the model now vs a previous commit, in one run, same threads.

    python -m benchmarks.bench_train_step                                    # hidden 64 and paper width, vs a4d5b78
    python -m benchmarks.bench_train_step --cases h64-text --threads 2 --rounds 5

A step = zero_grad, full-softmax CE loss (fwd), backward, NAdam step, on a fixed random batch of right-padded
histories (max_len 20, lengths uniform in 1..20).  CPU-ms per sample = process CPU time of the step (all threads) /
batch size; wall ms per step is printed beside it.  Each variant runs alone in a fresh process (as in training), the
variants alternating over rounds (A B A B ...), and the median over rounds is reported, so a machine shared with
other work biases every variant alike.  --in-process measures them interleaved in one process instead (the models
then evict each other's memory: this inflated MMM4Rec's CPU time by up to 1.7x next to SASRec).

"RecBole SASRec" (when recbole is installed): RecBole's SASRec with its default settings (2 layers, 2 heads, inner
256, dropout 0.5, CE over all items) at the case's hidden size, on the same item ids (no features, no time).

"previous" is the package at --previous (default a4d5b78, before issue 15/12): in the default one-process-per-variant
mode the whole of mmm4rec/ and mmm4rec_kernels/ at that commit (git archive into a temp dir, imported first by the
worker process); with --in-process only mmm4rec/model/ at that commit, on the current mmm4rec_kernels.  Both use backend=torch, path=quadratic and the same
sizes; with_id=True in both (the official setting).

Cases (name: sizes, items, features):
    h64-text   hidden 64, headdim 16, d_state 16, G 8, FFN 64; 1,349 items; 384-d text only (ML-100k-like)
    h64-mm     the same with 384-d images for every item
    paper-mm   the official fine-tune width (hidden 256, 8 heads x 64, d_state 64); 4,385 items; 768-d text + image
    paper-text the official width, text only
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "h64-text": dict(sizes=dict(hidden_size=64, headdim=16, d_state=16, ngroups=8, ffn_inner=64), items=1349,
                     text=384, image=None),
    "h64-mm": dict(sizes=dict(hidden_size=64, headdim=16, d_state=16, ngroups=8, ffn_inner=64), items=1349,
                   text=384, image=384),
    "paper-mm": dict(sizes={}, items=4385, text=768, image=768),
    "paper-text": dict(sizes={}, items=4385, text=768, image=None),
}


# the current package with the native CPU kernels off (MMM4REC_NATIVE_CPU=0): what they contribute
NOW_TORCH_PATH = "now, torch path"
# a variant name + this suffix: its loss under torch.compile (inductor; fullgraph=True for ours, as the Trainer does)
COMPILED = ", compiled"
# ... with mode="reduce-overhead": CUDA graphs replay the compiled step (GPU only)
CUDA_GRAPHS = ", compiled + CUDA graphs"


def load_previous_model(commit: str):
    """mmm4rec/model at `commit` as an importable package (module object), or None if git cannot provide it."""
    tmp = tempfile.mkdtemp(prefix="mmm4rec_prev_")
    pkg = os.path.join(tmp, "mmm4rec_model_prev")
    os.makedirs(pkg)
    try:
        for name in ("__init__.py", "config.py", "layers.py", "mmm4rec.py"):
            src = subprocess.check_output(["git", "-C", ROOT, "show", f"{commit}:mmm4rec/model/{name}"],
                                          stderr=subprocess.DEVNULL)
            with open(os.path.join(pkg, name), "wb") as f:
                f.write(src)
    except (OSError, subprocess.CalledProcessError):
        print(f"previous version {commit} not available through git: measuring the current model only")
        return None
    return import_package_from(tmp, "mmm4rec_model_prev")


def import_package_from(directory: str, name: str):
    """Import the package directory/name as the top-level module `name` (registered in sys.modules; its own
    submodules then import from that directory), whatever sys.path holds."""
    init = os.path.join(directory, name, "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_batch(num_items: int, b: int, L: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (b,), generator=g)
    valid = torch.arange(L)[None, :] < lengths[:, None]
    items = torch.randint(1, num_items + 1, (b, L), generator=g) * valid
    times = (1.6e9 + torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 86400, 1)) * valid
    return items, times, lengths, torch.randint(1, num_items + 1, (b,), generator=g)


def build(package, case: dict, seed: int = 0, device: str = "cpu"):
    """CPU: backend torch, path quadratic (what the CPU runs); CUDA: backend and path auto (Triton)."""
    torch.manual_seed(seed)
    kernels = dict(backend="torch", path="quadratic") if device == "cpu" else dict(backend="auto", path="auto")
    cfg = package.MMM4RecConfig(**case["sizes"], with_id=True, **kernels)
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(case["items"] + 1, case["text"], generator=g)
    image = None if case["image"] is None else torch.randn(case["items"] + 1, case["image"], generator=g)
    model = package.MMM4Rec(cfg, case["items"], text, image).to(device).train()
    return model, torch.optim.NAdam(model.parameters(), lr=1e-4, weight_decay=0.005)


class SASRecStep(torch.nn.Module):
    """RecBole's SASRec behind our loss(items, times, lengths, target) signature (times unused)."""

    def __init__(self, num_items: int, hidden: int, max_len: int = 20, device: str = "cpu"):
        super().__init__()
        from mmm4rec.recbole import import_recbole_models
        import_recbole_models()          # RecBole's import turns anomaly detection on for the process: undone here
        from recbole.model.sequential_recommender.sasrec import SASRec
        assert not torch.is_anomaly_enabled()

        class Catalogue:                                              # what SequentialRecommender asks the dataset
            def num(self, field):
                return num_items + 1

        config = dict(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list",
                      ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_", MAX_ITEM_LIST_LENGTH=max_len,
                      device=device, n_layers=2, n_heads=2, hidden_size=hidden, inner_size=256,
                      hidden_dropout_prob=0.5, attn_dropout_prob=0.5, hidden_act="gelu", layer_norm_eps=1e-12,
                      initializer_range=0.02, loss_type="CE")
        self.sasrec = SASRec(config, Catalogue())

    def loss(self, items, times, lengths, target):
        s = self.sasrec
        return s.calculate_loss({s.ITEM_SEQ: items, s.ITEM_SEQ_LEN: lengths, s.POS_ITEM_ID: target})


def build_sasrec(case: dict, seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    model = SASRecStep(case["items"], case["sizes"].get("hidden_size", 256), device=device).to(device).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, opt, batch):
    if getattr(model, "cudagraphs", False):
        torch.compiler.cudagraph_mark_step_begin()   # the previous step's graph outputs may be overwritten
    opt.zero_grad(set_to_none=True)
    model.loss(*batch).backward()
    opt.step()


def measure(variants: dict, batch, rounds: int, steps: int):
    """{name: (cpu_ms_per_sample, wall_ms_per_step)} medians over interleaved rounds, all in this process."""
    b = len(batch[0])
    cpu, wall = {k: [] for k in variants}, {k: [] for k in variants}
    for model, opt in variants.values():                              # warm-up
        step(model, opt, batch)
    for _ in range(rounds):
        for name, (model, opt) in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                step(model, opt, batch)
            cpu[name].append((time.process_time() - c0) * 1e3 / (steps * b))
            wall[name].append((time.perf_counter() - w0) * 1e3 / steps)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in variants}


def checkout_previous_package(commit: str) -> str:
    """mmm4rec/ and mmm4rec_kernels/ at `commit` (git archive) in a temp dir, for a worker process to import first."""
    tmp = tempfile.mkdtemp(prefix="mmm4rec_prev_pkg_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "mmm4rec", "mmm4rec_kernels"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return tmp


def build_variant(name: str, case: dict, previous_commit: str, whole_package: bool = False, device: str = "cpu"):
    """whole_package (worker processes): 'previous' imports the model AND the kernels at previous_commit."""
    if name.endswith(CUDA_GRAPHS):
        model, opt = build_variant(name[:-len(CUDA_GRAPHS)], case, previous_commit, whole_package, device)
        model.loss = torch.compile(model.loss, fullgraph=True, dynamic=False, mode="reduce-overhead")
        model.cudagraphs = True
        return model, opt
    if name.endswith(COMPILED):
        model, opt = build_variant(name[:-len(COMPILED)], case, previous_commit, whole_package, device)
        if name.startswith("RecBole"):             # RecBole's SASRec is compiled as it is (graph breaks allowed)
            model.loss = torch.compile(model.loss, dynamic=True)
        else:                                      # ours as the Trainer's --compile does it (fullgraph)
            from mmm4rec.train import compile_loss
            model.loss = compile_loss(model.loss, True, torch.device(device))
        return model, opt
    if name in ("now", NOW_TORCH_PATH):
        import mmm4rec.model as now
        return build(now, case, device=device)
    if name == "previous":
        if whole_package:
            tmp = checkout_previous_package(previous_commit)
            for package in ("mmm4rec_kernels", "mmm4rec"):    # the kernels first: mmm4rec imports them
                if package not in sys.modules:
                    import_package_from(tmp, package)
            prev = importlib.import_module("mmm4rec.model")
            assert prev.__file__.startswith(tmp), f"previous package not imported: {prev.__file__}"
            return build(prev, case, device=device)
        return build(load_previous_model(previous_commit), case)
    return build_sasrec(case, device=device)


def worker(case_name: str, variant: str, batch_size: int, steps: int, previous_commit: str,
           device: str = "cpu") -> dict:
    """One variant alone in this (fresh) process: build, 2 warm-up steps (compiles on CUDA), `steps` timed steps.
    On CUDA the wall time is taken between synchronisations and cpu_ms is the host's CPU time (not GPU work)."""
    case = CASES[case_name]
    if variant == NOW_TORCH_PATH:                       # read when mmm4rec_kernels.cpu first loads its library
        os.environ["MMM4REC_NATIVE_CPU"] = "0"
    model, opt = build_variant(variant, case, previous_commit, whole_package=True, device=device)
    batch = tuple(t.to(device) for t in make_batch(case["items"], batch_size))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        step(model, opt, batch)
    sync()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step(model, opt, batch)
    sync()
    return dict(cpu_ms=(time.process_time() - c0) * 1e3 / (steps * batch_size),
                wall_ms=(time.perf_counter() - w0) * 1e3 / steps)


def measure_isolated(case_name: str, names, a) -> dict:
    """Each variant in its own fresh process (as in a real training run: one model per process), variants
    alternating A B C A B C ... over a.rounds rounds; medians.  In one process the models' working sets evict each
    other and the allocator hands memory back and forth, which inflated the larger model's CPU time by up to 1.7x."""
    import json
    cpu, wall = {k: [] for k in names}, {k: [] for k in names}
    for _ in range(a.rounds):
        for name in names:
            cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--worker", case_name, name, "--batch-size",
                   str(a.batch_size), "--threads", str(a.threads), "--steps", str(a.steps), "--previous", a.previous,
                   "--device", a.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            r = json.loads(out.strip().splitlines()[-1])
            cpu[name].append(r["cpu_ms"])
            wall[name].append(r["wall_ms"])
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["h64-text", "paper-mm"], choices=sorted(CASES))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per round and variant")
    ap.add_argument("--previous", default="a4d5b78", help="git commit of the previous model ('' = none)")
    ap.add_argument("--no-sasrec", dest="sasrec", action="store_false", help="skip RecBole SASRec")
    ap.add_argument("--torch-path", action="store_true",
                    help=f"add the variant '{NOW_TORCH_PATH}': this package with its native CPU kernels off")
    ap.add_argument("--compile", action="store_true",
                    help=f"add '<variant>{COMPILED}' for now and SASRec: the loss under torch.compile (the 2 warm-up "
                         f"steps compile; the timed steps run the compiled graph)")
    ap.add_argument("--in-process", action="store_true",
                    help="measure all variants in this one process (interleaved rounds) instead of one fresh process "
                         "per variant and round")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: wall ms per step is then the figure (synchronised)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        import json
        print(json.dumps(worker(a.worker[0], a.worker[1], a.batch_size, a.steps, a.previous, a.device)))
        return 0
    prev = load_previous_model(a.previous) if a.previous else None
    try:
        import recbole  # noqa: F401
        with_sasrec = a.sasrec
    except ImportError:
        with_sasrec = False
        print("recbole not installed: no SASRec rows")
    mode = "one process, interleaved" if a.in_process else "a fresh process per variant and round, alternating"
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch_size}, {a.rounds} rounds x {a.steps} "
          f"steps ({mode}), median; previous = {a.previous if prev else 'n/a'}")
    if a.in_process and a.torch_path:
        ap.error("--torch-path needs fresh processes (the native library loads once per process): drop --in-process")
    if a.in_process and a.device != "cpu":
        ap.error("--in-process is a CPU mode; on --device cuda each variant runs in its own process")
    gpu = a.device != "cpu"
    if gpu and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch sees no CUDA device (torch {torch.__version__})")
    k = 1 if gpu else 0                         # the figure the ratios use: wall ms on a GPU, CPU-ms on the CPU
    print(f"device {a.device}; ratios of {'wall ms per step' if gpu else 'CPU-ms per sample'}")
    print("| case | variant | CPU-ms / sample | wall ms / step | now vs |")
    print("|---|---|---|---|---|")
    for name in a.cases:
        case = CASES[name]
        names = (["now"] + (["now" + COMPILED] if a.compile else [])
                 + (["now" + CUDA_GRAPHS] if a.compile and a.device != "cpu" else [])
                 + ([NOW_TORCH_PATH] if a.torch_path else [])
                 + (["previous"] if prev is not None else []) + (["RecBole SASRec"] if with_sasrec else [])
                 + (["RecBole SASRec" + COMPILED] if with_sasrec and a.compile else []))
        if a.in_process:
            variants = {v: build_variant(v, case, a.previous) for v in names}
            res = measure(variants, make_batch(case["items"], a.batch_size), a.rounds, a.steps)
        else:
            res = measure_isolated(name, names, a)
        for v, (cpu_ms, wall_ms) in res.items():
            ratio = f"{res[v][k] / res['previous'][k]:.2f}x" if "previous" in res and v == "now" else ""
            if v == "now" and NOW_TORCH_PATH in res:
                ratio += f"{'; ' if ratio else ''}{res[v][k] / res[NOW_TORCH_PATH][k]:.2f}x torch path"
            if v == "now" and "RecBole SASRec" in res:
                ratio += f"{'; ' if ratio else ''}{res[v][k] / res['RecBole SASRec'][k]:.2f}x SASRec"
            base = v[:-len(COMPILED)] if v.endswith(COMPILED) else v[:-len(CUDA_GRAPHS)] if v.endswith(CUDA_GRAPHS) \
                else None
            if base in res:
                ratio += f"{'; ' if ratio else ''}{res[v][k] / res[base][k]:.2f}x eager"
            print(f"| {name} | {v} | {cpu_ms:.2f} | {wall_ms:.0f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
