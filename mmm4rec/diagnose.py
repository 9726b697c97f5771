"""Is the time path alive?  Per time-path module: exactly-zero activations, gradient vs weight-decay gradient, drift.

    python -m mmm4rec.diagnose --steps 300 --out time_path.md --plot time_path.png            # official init
    python -m mmm4rec.diagnose --variants official live --steps 100 --preset small --out t.md  # compare switches
    python -m mmm4rec.diagnose --set time_shrink=normalized --set time_input_norm=true --steps 50

For each variant (a set of MMM4RecConfig time-path switches, see VARIANTS; --set adds overrides to every variant) a
model is built on synthetic data (mmm4rec.data.synthetic, Scientific-like lengths and time gaps), trained for --steps
NAdam steps (official lr 1e-4, weight decay 0.005, batch 256 by default, train mode: dropout on) and, at every step,
per module group:
  * zero: the fraction of exactly-zero entries of the module's activation, over valid positions when the time
    padding is masked (config.mask_time_padding), else over all: the shrink output alpha for a time MLP, E2 for the
    time convs, D_next for the gate, Dco for a Fourier filter (none for LayerNorm groups), measured in that step's
    forward;
  * grad: the L2 norm of the loss gradient of the group's parameters (before the optimizer adds weight decay);
  * wd: the L2 norm of the weight-decay gradient wd * |W| at the NOMINAL weight decay (also when the switch
    time_weight_decay=False sets the group's effective decay to 0: the ratio then says how the loss gradient compares
    with the decay it escapes);
  * drift: |W - W0| / |W0| and shrink |W| / |W0| after the step.
A run whose parameters stop being finite ends there and is marked "NaN after step k".
Written as a Markdown table (--out) and a matplotlib figure (--plot: grad / wd and drift per step, per module).
Library use: diagnose_time_path(model, batches, steps, ...) -> DiagnoseResult (rows(), markdown(), plot()).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch

from .model import MMM4Rec, MMM4RecConfig
from .model.layers import FourierFilter, TimeEncoder, TimeModulation, param_groups

# Named sets of time-path switches (MMM4RecConfig fields).  "official" = the defaults.
VARIANTS: Dict[str, dict] = {
    "official": {},
    "torch-init": {"init": "torch"},
    "series": {"time_shrink": "series"},
    "no-wd": {"time_weight_decay": False},
    "gain2": {"time_mlp_gain": 2.0},
    "input-norm": {"time_input_norm": True},
    "normalized": {"time_shrink": "normalized"},
    "fourier-identity": {"fourier_init": "identity"},
    "norm-both": {"time_input_norm": True, "time_shrink": "normalized"},
    "live": {"time_input_norm": True, "time_shrink": "normalized", "time_weight_decay": False},
    "identity-gain2": {"fourier_init": "identity", "time_mlp_gain": 2.0},
    "identity-gain2-no-wd": {"fourier_init": "identity", "time_mlp_gain": 2.0, "time_weight_decay": False},
}

PRESETS = {
    # the paper's fine-tune width (official)
    "paper": {},
    # a small width for quick checks and tests
    "small": dict(hidden_size=64, headdim=16, d_state=16, ngroups=4, ffn_inner=64),
}


def module_groups(model: MMM4Rec) -> Dict[str, dict]:
    """{name: {"module": time-path module, "params": [parameters], "kind": ...}} for every time-path piece:
    time_encoder, <tissd.i | ticossd.i>.time_mlp (mix1, mix2), .time_conv (conv1, conv2), .time_gate (gate and the
    update LayerNorm, TiSSD only), fourier.i (CL1, CL2, CL3)."""
    groups: Dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, TimeEncoder):
            groups["time_encoder"] = {"module": m, "params": list(m.parameters()), "kind": "encoder"}
        elif isinstance(m, TimeModulation):
            base = name.replace(".core.time", "")              # tissd.0 / ticossd.0 / tissd_image.0
            groups[f"{base}.time_mlp"] = {"module": m, "params": [*m.mix1.parameters(), *m.mix2.parameters()],
                                          "kind": "mlp"}
            groups[f"{base}.time_conv"] = {"module": m, "params": [*m.conv1.parameters(), *m.conv2.parameters()],
                                           "kind": "conv"}
            if m.with_update:
                groups[f"{base}.time_gate"] = {"module": m, "params": list(m.gate.parameters()), "kind": "gate"}
                groups[f"{base}.time_update_norm"] = {"module": m, "params": list(m.norm.parameters()),
                                                      "kind": "norm"}
        elif isinstance(m, FourierFilter):
            params = list(m.parameters())
            if params:
                groups[name] = {"module": m, "params": params, "kind": "fourier"}
    return groups


@dataclass
class DiagnoseResult:
    """Per-step traces: trace[group][key] = list over steps; key in zero, grad, wd, drift, shrink, pre_absmax."""
    variant: str
    steps: int
    weight_decay: float
    trace: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    effective_wd: Dict[str, float] = field(default_factory=dict)
    diverged_at: Optional[int] = None      # the optimizer step after which a parameter was not finite (run stopped)

    def rows(self) -> List[dict]:
        """One summary dict per module group."""
        out = []
        for name, t in self.trace.items():
            g, w = t["grad"], t["wd"]
            ratios = [a / b if b > 0 else math.inf for a, b in zip(g, w)]
            nonzero = [x > 0 for x in g]
            last_nonzero = max((i + 1 for i, nz in enumerate(nonzero) if nz), default=0)
            out.append(dict(
                variant=self.variant, module=name,
                zero_first=t["zero"][0] if t["zero"] else float("nan"),
                zero_last=t["zero"][-1] if t["zero"] else float("nan"),
                pre_absmax=max(t["pre_absmax"]) if t["pre_absmax"] else float("nan"),
                grad_median=_median(g), wd_median=_median(w), ratio_median=_median(ratios),
                ratio_min=min(ratios) if ratios else float("nan"),
                steps_nonzero=sum(nonzero), last_nonzero=last_nonzero, steps=len(g),
                drift=t["drift"][-1] if t["drift"] else float("nan"),
                shrink=t["shrink"][-1] if t["shrink"] else float("nan"),
                effective_wd=self.effective_wd.get(name, self.weight_decay), diverged_at=self.diverged_at))
        return out

    def markdown(self) -> str:
        return markdown_table(self.rows())

    def plot(self, path: str) -> str:
        return plot_results([self], path)


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _fmt(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:.3g}"
    return str(x)


def markdown_table(rows: List[dict]) -> str:
    """The summary rows as one Markdown table."""
    head = ("| variant | module | zero frac (first / last step) | max abs pre-act | grad norm (median) | "
            "wd*abs(W) (median) | grad / wd (median, min) | steps grad != 0 | last step grad != 0 | "
            "drift abs(W-W0)/abs(W0) | abs(W)/abs(W0) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        variant = r["variant"] if r.get("diverged_at") is None else f"{r['variant']} (NaN after step " \
            f"{r['diverged_at']})"
        lines.append("| " + " | ".join([
            variant, r["module"], f"{_fmt(r['zero_first'])} / {_fmt(r['zero_last'])}", _fmt(r["pre_absmax"]),
            _fmt(r["grad_median"]), _fmt(r["wd_median"]) + ("" if r["effective_wd"] > 0 else " (decay off)"),
            f"{_fmt(r['ratio_median'])}, {_fmt(r['ratio_min'])}", f"{r['steps_nonzero']}/{r['steps']}",
            str(r["last_nonzero"]), _fmt(r["drift"]), _fmt(r["shrink"])]) + " |")
    return "\n".join(lines)


def plot_results(results: List[DiagnoseResult], path: str) -> str:
    """grad / wd, drift and the zero fraction per step: one row of three panels per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    fig, axes = plt.subplots(n, 3, figsize=(15, 3.6 * n), squeeze=False)
    for row, res in zip(axes, results):
        for name, t in res.trace.items():
            steps = range(1, len(t["grad"]) + 1)
            ratio = [a / b if b > 0 else float("nan") for a, b in zip(t["grad"], t["wd"])]
            row[0].plot(steps, [r if r > 0 else 1e-20 for r in ratio], label=name)
            row[1].plot(steps, t["drift"], label=name)
            if t["zero"]:
                row[2].plot(steps, t["zero"], label=name)
        row[0].set_yscale("log")
        row[0].axhline(0.1, color="k", ls=":", lw=0.8)
        row[0].set_title(f"{res.variant}: grad norm / (wd * |W|)  (1e-20 = exactly 0)")
        row[1].set_title(f"{res.variant}: drift |W - W0| / |W0|")
        row[2].set_title(f"{res.variant}: fraction of exactly-zero activations")
        for ax in row:
            ax.set_xlabel("optimizer step")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class _Probe:
    """Forward hooks that record, per group, the zero fraction of the group's activation and max |pre-activation|."""

    def __init__(self, groups: Dict[str, dict]):
        self.groups, self.seen, self.handles, self.patched = groups, {}, [], []
        by_module: Dict[int, List[str]] = {}
        for name, g in groups.items():
            by_module.setdefault(id(g["module"]), []).append(name)
        for name, g in groups.items():
            m = g["module"]
            if g["kind"] == "mlp":
                self._wrap_alpha(m, name)
            elif g["kind"] == "conv":          # E2 [b, L, H]
                self.handles.append(m.register_forward_hook(self._hook(name, lambda out: out[0].transpose(1, 2))))
            elif g["kind"] == "gate":          # D_next [b, H, L]
                self.handles.append(m.register_forward_hook(self._hook(name, lambda out: out[1])))
            elif g["kind"] == "fourier":       # Dco [b, H, L]
                self.handles.append(m.register_forward_hook(self._hook(name, lambda out: out)))

    def _hook(self, name, pick):
        def hook(_m, inputs, out):
            mask = inputs[-1]                  # TimeModulation(D, mask), FourierFilter(Dv, Dt, mask)
            mask_f = None if mask is None else mask[:, None, :].float()
            self._record(name, pick(out), mask_f, None)
        return hook

    def _wrap_alpha(self, m, name):
        real = m.alpha

        def alpha(D, mask_f):
            Dn, x, a = real(D, mask_f)
            self._record(name, a, mask_f, x)
            return Dn, x, a
        m.alpha = alpha
        self.patched.append(m)

    @torch.no_grad()
    def _record(self, name, act, mask_f, pre):
        if act is None:
            return
        zero = (act == 0)
        if mask_f is not None:
            valid = mask_f.expand_as(act) > 0
            frac = (zero & valid).sum().item() / max(valid.sum().item(), 1)
        else:
            frac = zero.float().mean().item()
        rec = self.seen.setdefault(name, {"zero": [], "pre": []})
        rec["zero"].append(frac)
        if pre is not None:
            rec["pre"].append(pre.abs().max().item())

    def pop(self, name):
        """Mean zero fraction and max |pre| over the calls since the last pop (a shared module runs once per
        stream batch; the TiSSD runs once on the [text; image] batch)."""
        rec = self.seen.pop(name, None)
        if not rec:
            return None, None
        return sum(rec["zero"]) / len(rec["zero"]), (max(rec["pre"]) if rec["pre"] else None)

    def remove(self):
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m.alpha


def diagnose_time_path(model: MMM4Rec, batches: Iterable[dict], steps: int, lr: float = 1e-4,
                       weight_decay: float = 0.005, mode: str = "full", variant: str = "model") -> DiagnoseResult:
    """Train `model` for `steps` NAdam steps on `batches` (an iterable of dicts with item_seq, time_seq, lengths,
    target; cycled) with the optimizer groups of layers.param_groups, recording every time-path group (see the module
    docstring).  The model is trained in place (pass a copy to keep it)."""
    groups = module_groups(model)
    if not groups:
        raise ValueError("the model has no time path (config.use_time=False)")
    opt = torch.optim.NAdam(param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    res = DiagnoseResult(variant=variant, steps=steps, weight_decay=weight_decay)
    w0 = {name: [p.detach().clone() for p in g["params"]] for name, g in groups.items()}
    for name, g in groups.items():
        res.trace[name] = {k: [] for k in ("zero", "grad", "wd", "drift", "shrink", "pre_absmax")}
        res.effective_wd[name] = max(wd_of[id(p)] for p in g["params"])
    probe = _Probe(groups)
    model.train()
    try:
        step, it = 0, iter(batches)
        while step < steps:
            try:
                b = next(it)
            except StopIteration:
                it = iter(batches)
                b = next(it)
            opt.zero_grad(set_to_none=True)
            loss = model.loss(b["item_seq"], b["time_seq"], b["lengths"], b["target"], mode=mode)
            loss.backward()
            for name, g in groups.items():
                t = res.trace[name]
                grads = [p.grad for p in g["params"] if p.grad is not None]
                t["grad"].append(math.sqrt(sum(float(x.double().pow(2).sum()) for x in grads)) if grads else 0.0)
                wnorm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in g["params"]))
                t["wd"].append(weight_decay * wnorm)
                zero, pre = probe.pop(name)
                if zero is not None:
                    t["zero"].append(zero)
                if pre is not None:
                    t["pre_absmax"].append(pre)
            opt.step()
            step += 1
            for name, g in groups.items():
                t = res.trace[name]
                num = math.sqrt(sum(float((p.detach() - q).double().pow(2).sum()) for p, q in zip(g["params"],
                                                                                                  w0[name])))
                den = math.sqrt(sum(float(q.double().pow(2).sum()) for q in w0[name]))
                now = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in g["params"]))
                t["drift"].append(num / den if den > 0 else float("nan"))
                t["shrink"].append(now / den if den > 0 else float("nan"))
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                res.diverged_at = step          # recorded; the traces stop here
                break
    finally:
        probe.remove()
    return res


def synthetic_data(seed: int = 0, max_len: int = 20, feat_dim: int = 768, users: int = 2000, items: int = 1000,
                   interactions: int = 16000):
    """A Scientific-like synthetic SequentialData (lengths, log-normal time gaps, topic walk), text and images."""
    from .data.synthetic import make_synthetic_dataset
    syn = make_synthetic_dataset(users, items, interactions, feat_dim=feat_dim, seed=seed)
    return syn.to_sequential(max_len=max_len, kcore=0)


def run_variant(variant: str, switches: dict, *, preset: str = "paper", steps: int = 100, seed: int = 0,
                batch_size: int = 256, lr: float = 1e-4, weight_decay: float = 0.005, data=None,
                backend: str = "torch", **config) -> DiagnoseResult:
    """Build a model (preset widths + switches + config overrides) on `data` (default synthetic_data(seed)) and
    diagnose it."""
    data = synthetic_data(seed) if data is None else data
    torch.manual_seed(seed)
    cfg = MMM4RecConfig(max_len=data.max_len, backend=backend, **{**PRESETS[preset], **switches, **config})
    model = MMM4Rec(cfg, data.num_items, data.text_feats, data.image_feats, data.image_mask)
    batches = data.batches("train", batch_size, shuffle=True, seed=seed, drop_last=True)
    return diagnose_time_path(model, batches, steps, lr=lr, weight_decay=weight_decay, variant=variant)


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmm4rec.diagnose", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--variants", nargs="+", default=["official"], choices=sorted(VARIANTS),
                    help="named switch sets (default: official)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="MMM4RecConfig override applied to every variant (repeatable), e.g. time_shrink=normalized")
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model widths (default paper)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4, help="NAdam lr (official fine-tune 1e-4)")
    ap.add_argument("--weight-decay", type=float, default=0.005, help="official 0.005")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--plot", default=None, help="write the PNG here")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    data = synthetic_data(a.seed)
    results = []
    for v in a.variants:
        name = v if not overrides else v + "+" + ",".join(f"{k}={x}" for k, x in overrides.items())
        res = run_variant(name, {**VARIANTS[v], **overrides}, preset=a.preset, steps=a.steps, seed=a.seed,
                          batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, data=data)
        results.append(res)
        print(res.markdown() if len(results) == 1 else "\n".join(res.markdown().splitlines()[2:]), flush=True)
    table = markdown_table([r for res in results for r in res.rows()])
    header = (f"time-path diagnostic: preset {a.preset}, {a.steps} NAdam steps, lr {a.lr}, weight decay "
              f"{a.weight_decay}, batch {a.batch_size}, seed {a.seed}, synthetic data, train mode, "
              f"torch {torch.__version__}\n\n")
    if a.out:
        with open(a.out, "w") as f:
            f.write(header + table + "\n")
    if a.plot:
        plot_results(results, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
