"""`mmm4rec` command line: a demo, prepare data, pre-train, fine-tune, evaluate, recommend, export, benchmark.

Main job (CPU, a few minutes): prepare the built-in demo data, train, evaluate, recommend, write the plot:
    mmm4rec demo

Step by step:
    mmm4rec prepare --demo --out data/demo
    mmm4rec finetune --data data/demo --out runs/demo --preset cpu --time-budget 5
    mmm4rec evaluate --checkpoint runs/demo/best --data data/demo --exclude-seen --popularity
    mmm4rec recommend --checkpoint runs/demo/best --data data/demo --users u1 u2 --k 10

Presets: --preset cpu (hidden 64, batch 256, lr 1e-3: trains on a laptop), --preset paper (the official settings:
hidden 256, batch 1024 x 8 accumulation, lr 1e-4), --preset auto (default: cpu without CUDA, paper with it).
Explicit flags override the preset. Budgets: --time-budget MINUTES and --max-batches N stop cleanly, evaluate
and checkpoint; last/ is written at least every --checkpoint-every minutes and on Ctrl-C (resume with --resume).

Real data: `mmm4rec prepare --inter Scientific.inter --item Scientific.item --text-feats text.npy --text-ids ids.txt
--image-feats img.npy --image-ids img_ids.txt --out data/sci` (without --text-feats the .item text fields are
encoded with --encoder auto|minilm|hashed).

Every failure ends in one line `mmm4rec <command>: error: ...` and exit status 1 (130 on Ctrl-C);
--debug (or MMM4REC_DEBUG=1) shows the Python traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional

import numpy as np

from mmm4rec_kernels.limits import BACKENDS, PATHS

from .presets import PRESETS, TRAIN_FLAGS, model_config, preset_for, train_settings

RUN_FILES = ("best", "last", "log.json", "summary.json", "convergence.png")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line `<prog>: error: ...` with exit status 1."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(1)


def _positive(flag, kind):
    """argparse type for `flag`: int >= 1 (kind int) or number > 0 (kind float), else a one-line error naming it."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be {'>= 1' if kind is int else '> 0'}, got {v}")
        return v
    return parse


def _positive_int(flag):
    return _positive(flag, int)


def _positive_float(flag):
    return _positive(flag, float)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the preset; with --init or --resume: that checkpoint's architecture)")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--expand", type=int, default=None)
    g.add_argument("--headdim", type=int, default=None)
    g.add_argument("--d-state", type=int, default=None)
    g.add_argument("--ngroups", type=int, default=None, help="default: the preset's (one group per head if that "
                                                              "does not divide the heads)")
    g.add_argument("--n-layers", type=int, default=None)
    g.add_argument("--ffn-inner", type=int, default=None, help="default: the preset's, or the hidden size if "
                                                                "--hidden-size is given")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--time-dropout", type=float, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--with-id", action=argparse.BooleanOptionalAction, default=None,
                   help="per-item bias tables (the 'with ID' variant; default: the model config's)")
    g.add_argument("--no-time", action="store_true", help="ablation: use_time=False")
    g.add_argument("--path", default="auto", choices=list(PATHS))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=list(BACKENDS))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = auto: the cores not busy by the 1-minute load average, >= 1)")
    p.add_argument("--free-memory", default="retain", choices=["retain", "release"],
                   help="retain: glibc keeps freed CPU memory for the next step's tensors (no page faults on each "
                        "step; resident memory stays at its peak; mmm4rec_kernels.cpu.retain_freed_memory); "
                        "release: glibc's defaults")
    _common(p)


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the preset)")
    g.add_argument("--out", required=True, help="run dir (checkpoints best/ last/, log.json, convergence.png)")
    g.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="cpu: small model, batch 256, lr 1e-3; paper: official settings; auto: cpu without CUDA")
    g.add_argument("--epochs", type=_positive_int("--epochs"), default=None)
    g.add_argument("--patience", type=_positive_int("--patience"), default=None)
    g.add_argument("--lr", type=_positive_float("--lr"), default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None)
    g.add_argument("--grad-accum", type=_positive_int("--grad-accum"), default=None)
    g.add_argument("--loss-reduction", default="sum_over_accum", choices=["sum_over_accum", "mean_over_accum"],
                   help="sum_over_accum (official): gradients of the accumulated micro-batches add up; "
                        "mean_over_accum: each micro-batch loss is divided by --grad-accum")
    g.add_argument("--time-budget", type=_positive_float("--time-budget"), default=None, metavar="MINUTES",
                   help="stop after this many minutes at a batch boundary, then evaluate and checkpoint")
    g.add_argument("--max-batches", type=_positive_int("--max-batches"), default=None,
                   help="stop after this many training batches in total (then evaluate and checkpoint)")
    g.add_argument("--checkpoint-every", type=_positive_float("--checkpoint-every"), default=10.0,
                   metavar="MINUTES", help="write last/ and log.json at least this often inside an epoch")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the whole training step's loss with fullgraph=True (one graph; our kernels "
                        "are registered ops); reduce-overhead adds CUDA graphs on a GPU")
    g.add_argument("--metric", default="ndcg@10")
    g.add_argument("--exclude-seen", action="store_true", help="validation ranks only items not seen before")
    g.add_argument("--no-tf32", action="store_true")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last")
    g.add_argument("--overwrite", action="store_true", help="replace the run files in an existing --out")
    g.add_argument("--max-len", type=int, default=None, help="override the prepared history window")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mmm4rec", description=__doc__.split("\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="the main job: built-in data -> train (CPU, a few minutes) -> evaluate -> "
                                    "recommend -> plot")
    p.add_argument("--out", default="runs/demo", help="run dir (default runs/demo)")
    p.add_argument("--data", default="data/demo", help="prepared demo data dir (built when absent)")
    p.add_argument("--minutes", type=_positive_float("--minutes"), default=3.0, help="training time budget")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=30)
    p.add_argument("--k", type=_positive_int("--k"), default=10)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out run")
    _run_args(p)

    p = sub.add_parser("prepare", help="atomic files (+ feature files) -> prepared dataset dir")
    p.add_argument("--out", required=True)
    p.add_argument("--demo", action="store_true", help="build the built-in synthetic demo dataset")
    p.add_argument("--demo-size", default="small", choices=["tiny", "small", "ml1m", "scientific"],
                   help="tiny: 200 users; small: 2000 users; ml1m: 6040 users (MovieLens-1M-like sizes); "
                        "scientific: Table 1 sizes")
    p.add_argument("--inter", help="<name>.inter atomic file")
    p.add_argument("--item", help="<name>.item atomic file (text fields for the text encoder)")
    p.add_argument("--name", default=None)
    p.add_argument("--user-field", default="user_id")
    p.add_argument("--item-field", default="item_id")
    p.add_argument("--time-field", default="timestamp")
    p.add_argument("--text-fields", nargs="*", default=None, help=".item fields joined into the item text")
    p.add_argument("--text-feats", help=".npy/.pt/.safetensors text feature matrix")
    p.add_argument("--text-ids", help="row-id file for --text-feats (one raw item id per line); "
                                      "default: the .item file order")
    p.add_argument("--image-feats", help="image feature matrix (rows may be missing -> image_mask)")
    p.add_argument("--image-ids", help="row-id file for --image-feats (default: the .item file order)")
    p.add_argument("--encoder", default="auto", choices=["auto", "minilm", "hashed"],
                   help="text encoder when --text-feats is not given")
    p.add_argument("--feat-dim", type=int, default=768, help="width of the hashed encoder / demo features")
    p.add_argument("--kcore", type=int, default=5)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--short-users", default="drop", choices=["drop", "train"])
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    for name, hlp in (("finetune", "train on one domain (full-softmax CE)"),
                      ("pretrain", "pre-train on several domains (in-batch CE)")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--data", required=True, nargs="+" if name == "pretrain" else None,
                       help="prepared dataset dir" + ("s (one per domain)" if name == "pretrain" else ""))
        _model_args(p)
        _train_args(p)
        _run_args(p)
        p.add_argument("--mode", default="full" if name == "finetune" else "inbatch", choices=["full", "inbatch"])
        if name == "finetune":
            p.add_argument("--init", help="pre-trained checkpoint dir: its transferable weights are loaded and its "
                                          "architecture is the default")
        else:
            p.add_argument("--validate", action="store_true", help="validate each epoch (default: off)")

    p = sub.add_parser("evaluate", help="full-sort Recall/NDCG@{10,20,50} of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1024)
    p.add_argument("--exclude-seen", action="store_true",
                   help="rank only items the user has not interacted with before (RecBole's full-sort protocol)")
    p.add_argument("--popularity", action="store_true",
                   help="also print the popularity baseline (with and without --exclude-seen)")
    p.add_argument("--json", help="write the metrics here")
    _run_args(p)

    p = sub.add_parser("recommend", help="top-K items for user ids or for a given history")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--users", nargs="*", help="raw user ids (their full history is used)")
    p.add_argument("--history", nargs="*", help="raw item ids, oldest first")
    p.add_argument("--times", nargs="*", type=float, help="unix seconds of the --history items")
    p.add_argument("--k", type=int, default=10, help="number of items (capped at the number of candidates)")
    p.add_argument("--exclude-seen", "--exclude-history", dest="exclude_seen", action="store_true",
                   help="do not recommend items the user already interacted with")
    p.add_argument("--json", help="write the recommendations here")
    _run_args(p)

    p = sub.add_parser("export", help="user and item embeddings to .npy (dir) or .safetensors (file, ids in "
                                      "its metadata); --format pt2: the top-k inference program (torch.export)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="a .safetensors file, or a dir for .npy files; a .pt2 file with "
                                                "--format pt2")
    p.add_argument("--format", default="embeddings", choices=["embeddings", "pt2"],
                   help="pt2: history -> user vector -> top-k items as a torch.export program (load it with "
                        "`import mmm4rec_kernels; torch.export.load(path)`; batch size dynamic)")
    p.add_argument("--k", type=_positive_int("--k"), default=10, help="top-k of the pt2 program")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out .pt2 file")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1024)
    _run_args(p)

    sub.add_parser("diagnose", help="is the time path learning? zero activations, gradient vs weight decay and "
                                    "drift per time-path module (`mmm4rec diagnose --help`)", add_help=False)

    p = sub.add_parser("import-official", help="convert a checkpoint of the official code into ours")
    p.add_argument("ckpt", help="the official checkpoint file (Lightning .ckpt or a plain state_dict)")
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--ngroups", type=_positive_int("--ngroups"), default=8,
                   help="B/C groups of the official model (not recoverable from the shapes; official 8)")
    p.add_argument("--exact", action="store_true",
                   help="switch our deliberate deviations (padding masks, missing-image vector, ...) to the "
                        "official behaviour")
    p.add_argument("--max-len", type=_positive_int("--max-len"), default=None,
                   help="max_len where the weights do not tell it")
    p.add_argument("--num-items", type=_positive_int("--num-items"), default=None,
                   help="item count where the weights do not tell it")
    p.add_argument("--overwrite", action="store_true")
    _common(p)

    p = sub.add_parser("bench", help="benchmarks (source checkout only: benchmarks/table4.py)")
    p.add_argument("which", choices=["table4"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --scale 0.1)")
    _common(p)
    return ap


# ---------------------------------------------------------------------------------------------------------- helpers
def choose_threads(requested: int = 0) -> "tuple[int, str]":
    """CPU threads for torch's intra-op pool and why. requested > 0 is taken as is; 0 = auto: the cores not
    already busy (cores - 1-minute load average, at least 1). On a shared machine the busy cores make every
    parallel region wait for a time slice: measured here at load ~2.5 on 2 cores, a training batch of the cpu preset
    took 0.29 s with 1 thread and 4.1 s with 2."""
    if requested < 0:
        raise ValueError(f"--threads must be >= 0, got {requested}")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if requested:
        return requested, "--threads"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, f"auto: {cores} cores"
    n = max(1, min(cores, int(cores - load + 0.5)))
    return n, f"auto: {cores} cores, load average {load:.1f}"


def _set_threads(a) -> str:
    """Sets torch's CPU threads and, unless --free-memory release, keeps freed CPU memory for reuse; says both."""
    import torch
    n, why = choose_threads(getattr(a, "threads", 0))
    torch.set_num_threads(n)
    said = f"{n} CPU thread{'s' if n > 1 else ''} ({why})"
    if getattr(a, "free_memory", "release") == "retain":
        from mmm4rec_kernels.cpu import retain_freed_memory
        said += "; " + retain_freed_memory()
    return said


def _main_process() -> bool:
    """False on the ranks > 0 of a torchrun job: they train and evaluate but say nothing and write nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(*msg) -> None:
    if _main_process():
        print(*msg, flush=True)


def _note(cmd: str, msg: str) -> None:
    if _main_process():
        print(f"mmm4rec {cmd}: {msg}", file=sys.stderr, flush=True)


def _demo_dataset(size: str, seed: int, feat_dim: int):
    from .data import make_paper_like, make_synthetic_dataset
    if size == "tiny":
        return make_synthetic_dataset(200, 100, 1600, feat_dim=feat_dim, seed=seed, name="demo")
    if size == "small":
        return make_synthetic_dataset(2000, 800, 16000, feat_dim=feat_dim, seed=seed, name="demo")
    if size == "ml1m":  # MovieLens-1M sizes: 6,040 users, 3,706 items, 1,000,209 interactions
        return make_synthetic_dataset(6040, 3706, 1000209, feat_dim=feat_dim, seed=seed, name="ml1m-like")
    return make_paper_like("scientific", feat_dim=feat_dim, seed=seed)


def _report_drops(stats: dict, kcore: int, short_users: str) -> None:
    """One line per kind of dropped data (k-core, short users, items left without interactions)."""
    if stats.get("kcore_dropped_interactions"):
        _note("prepare", f"{kcore}-core filter dropped {stats['kcore_dropped_users']} users, "
                         f"{stats['kcore_dropped_items']} items, {stats['kcore_dropped_interactions']} interactions "
                         "(--kcore 0 keeps them)")
    if stats.get("dropped_short_users"):
        why = ("fewer than 3 interactions (no valid/test target; --short-users train keeps those with 2 for training)"
               if short_users == "drop" else "a single interaction (nothing to predict from)")
        _note("prepare", f"dropped {stats['dropped_short_users']} users with {why}")
    if stats.get("short_user_dropped_items"):
        _note("prepare", f"dropped {stats['short_user_dropped_items']} items that only those users had")


def cmd_prepare(a) -> int:
    from .data import SequentialData, attach_features, encode_texts, item_texts, load_matrix, read_atomic
    if a.demo:
        syn = _demo_dataset(a.demo_size, a.seed, a.feat_dim)
        data = syn.to_sequential(max_len=a.max_len, kcore=a.kcore, short_users=a.short_users)
        src = "synthetic demo"
    else:
        if not a.inter:
            raise ValueError("give --inter <name>.inter (or --demo)")
        name = a.name or os.path.splitext(os.path.basename(a.inter))[0]
        data = SequentialData.from_atomic(a.inter, name=name, user_field=a.user_field, item_field=a.item_field,
                                          time_field=a.time_field, max_len=a.max_len, kcore=a.kcore,
                                          short_users=a.short_users)
        item_order = None
        texts = None
        if a.item:
            cols = read_atomic(a.item)
            if a.item_field not in cols:
                raise ValueError(f"{a.item} has no column {a.item_field!r} (--item-field)")
            item_order = cols[a.item_field]
            texts = item_texts(cols, a.item_field, a.text_fields)
        if a.text_feats:
            rows = _read_rows(a.text_ids, "--text-ids") if a.text_ids else item_order
            if rows is None:
                raise ValueError("--text-feats needs --text-ids or --item (row order)")
            attach_features(data, text=_load_matrix(load_matrix, a.text_feats, "--text-feats"), text_rows=rows)
            src = f"text features from {a.text_feats}"
        else:
            if texts is None:
                raise ValueError("give --text-feats or --item (item texts to encode)")
            toks = data.item_tokens[1:].tolist()
            missing = [t for t in toks if t not in texts]
            if missing:
                _note("prepare", f"{len(missing)} items have no row in {a.item}; they get an empty text")
            feats, used = encode_texts([texts.get(t, "") for t in toks], encoder=a.encoder, dim=a.feat_dim,
                                       progress=True)
            attach_features(data, text=feats.numpy(), text_rows=toks)
            src = f"text encoded with {used}" + (" (MiniLM not installed: hashed fallback)"
                                                  if a.encoder == "auto" and used == "hashed" else "")
        if a.image_feats:
            rows = _read_rows(a.image_ids, "--image-ids") if a.image_ids else item_order
            if rows is None:
                raise ValueError("--image-feats needs --image-ids or --item (row order)")
            info = attach_features(data, image=_load_matrix(load_matrix, a.image_feats, "--image-feats"),
                                   image_rows=rows)
            src += f"; images for {info['image_coverage']}/{data.num_items} items"
    _report_drops(data.stats, a.kcore, a.short_users)
    data.save(a.out)
    _say(f"prepared {data.describe()}\n  features: {src}\n  -> {a.out}")
    return 0


def _read_rows(path, flag):
    from .data import read_mapping
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file")
    return read_mapping(path)


def _load_matrix(load_matrix, path, flag):
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file")
    try:
        return load_matrix(path)
    except ValueError as e:
        raise ValueError(f"{flag} {e}" if path in str(e) else f"{flag} {path}: {e}") from None
    except Exception as e:  # truncated / foreign file
        raise ValueError(f"{flag} {path} cannot be read ({type(e).__name__}: {e})") from None


def _preset_name(a) -> str:
    from .train import resolve_device
    return preset_for(a.preset, resolve_device(a.device).type)


def _config_from_args(a, max_len: int, pretrain: bool = False, inherit: Optional[dict] = None,
                      inherit_all: bool = False):
    """Model config = preset (over the official base) <- `inherit` (an --init / --resume checkpoint's config)
    <- explicit flags (mmm4rec.presets.model_config)."""
    flags = {"hidden_size": a.hidden_size, "expand": a.expand, "headdim": a.headdim, "d_state": a.d_state,
             "ngroups": a.ngroups, "n_layers": a.n_layers, "ffn_inner": a.ffn_inner, "dropout": a.dropout,
             "time_dropout": a.time_dropout, "temperature": a.temperature, "with_id": a.with_id}
    if a.no_time:
        flags["use_time"] = False
    try:
        return model_config(_preset_name(a), max_len, flags, backend=a.backend, path=a.path, pretrain=pretrain,
                            inherit=inherit, inherit_all=inherit_all)
    except ValueError as e:
        raise ValueError(f"model flags: {e}") from None


def _train_settings(a, cmd: str) -> dict:
    return train_settings(_preset_name(a), cmd, {k: getattr(a, k) for k in TRAIN_FLAGS})


def _check_out(out: str, resume: bool, overwrite: bool, files=RUN_FILES,
               hint: str = "pass --resume to continue it or --overwrite to replace it") -> None:
    """An existing run is never replaced silently: --resume continues it, --overwrite removes its run files.
    Under torchrun only rank 0 checks and removes (the other ranks would race with its writes)."""
    if not _main_process():
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    found = [f for f in files if os.path.exists(os.path.join(out, f))]
    if not found:
        return
    if resume:
        if any(os.path.exists(os.path.join(out, d, "trainer.pt")) for d in ("last", "last.old")):
            return
        if not overwrite:
            raise ValueError(f"--resume: {out} holds run files ({', '.join(found)}) but no last/trainer.pt to "
                             "resume from; pass --overwrite to start a new run there")
    if not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}); {hint}")
    for f in found:
        p = os.path.join(out, f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _explain_transfer(model, init: str, missing, unexpected) -> None:
    """Say which pre-trained tensors were not used and why (item-specific, deeper layers, other)."""
    from .train import read_weights
    keys = list(read_weights(os.path.join(init, "model.safetensors")))
    item_specific = [k for k in keys if model._item_specific(k)]
    n = model.config.n_layers
    deeper = [k for k in unexpected if any(part.isdigit() and int(part) >= n for part in k.split("."))]
    other = [k for k in unexpected if k not in deeper]
    _say(f"loaded {len(keys) - len(item_specific) - len(unexpected)} pre-trained tensors from {init}")
    if item_specific:
        _say(f"  not transferred: {len(item_specific)} item-specific tensors (id bias tables belong to the "
             "pre-training catalogue)")
    if deeper:
        _say(f"  dropped {len(deeper)} tensors of pre-trained layers >= {n + 1}: this model has {n} layer(s); "
             "leave --n-layers unset to keep the checkpoint's depth")
    if other:
        _say(f"  dropped {len(other)} tensors this model does not have (e.g. {other[:3]})")
    if missing:
        _say(f"  {len(missing)} tensors start from initialisation (not in the checkpoint, e.g. {missing[:3]})")


def _train(a, data, cmd: str, init: Optional[str] = None, validate: bool = True) -> dict:
    from .train import Trainer, build_model, load_pretrained, read_checkpoint_config, set_seed
    if a.out is None:
        raise ValueError("give --out")
    _check_out(a.out, a.resume, a.overwrite)
    last = os.path.join(a.out, "last")
    inherit, inherit_all = None, False
    if a.resume and os.path.exists(os.path.join(last, "config.json")):
        inherit, inherit_all = read_checkpoint_config(last)["model_config"], True
    elif init:
        inherit = read_checkpoint_config(init)["model_config"]
    set_seed(a.seed)
    preset = _preset_name(a)
    cfg = _config_from_args(a, data.max_len, pretrain=cmd == "pretrain", inherit=inherit, inherit_all=inherit_all)
    st = _train_settings(a, cmd)
    model = build_model(cfg, data)
    if init and not (a.resume and inherit_all):
        missing, unexpected = load_pretrained(model, init)
        _explain_transfer(model, init, missing, unexpected)
    tr = Trainer(model, data, lr=st["lr"], weight_decay=st["weight_decay"], batch_size=st["batch_size"],
                 grad_accum=st["grad_accum"], epochs=st["epochs"], patience=st["patience"], metric=a.metric,
                 mode=a.mode, seed=a.seed, device=a.device, out_dir=a.out, tf32=not a.no_tf32,
                 progress=not a.quiet, validate=validate, compile=a.compile or False, loss_reduction=a.loss_reduction,
                 max_total_batches=a.max_batches,
                 time_budget_s=None if a.time_budget is None else 60.0 * a.time_budget,
                 checkpoint_every_s=60.0 * a.checkpoint_every, exclude_seen=a.exclude_seen)
    if a.resume:
        if tr.resume():
            _say(f"resumed from {last} at epoch {tr.epoch} (+{tr.batch_in_epoch} batches)")
        else:
            _say(f"nothing to resume in {a.out}; starting a new run")
    nparams = sum(p.numel() for p in model.parameters())
    _say(f"{data.describe()}\npreset {preset}: hidden {cfg.hidden_size}, {cfg.n_layers} layer(s), batch "
         f"{st['batch_size']} x {st['grad_accum']}, lr {st['lr']:g}; {nparams} parameters on {tr.device}"
         + (f" x {tr.ctx.world_size} ranks (DDP; the batch is global)" if tr.ctx.distributed else "")
         + (f", {a._threads}" if tr.device.type == "cpu" and getattr(a, "_threads", None) else "")
         + f"; {tr.batches_per_epoch()} batches/epoch")
    if tr.device.type == "cpu" and preset == "paper":
        _note(cmd, "the paper preset is sized for a GPU; on CPU --preset cpu trains a small model much faster")
    try:
        summary = tr.fit()
    except KeyboardInterrupt:
        a._saved = tr.saved_on_interrupt
        raise
    finally:
        tr.close()
    _say(json.dumps(summary, indent=1))
    _say(f"run files in {a.out}: best/ last/ log.json summary.json convergence.png")
    return summary


def cmd_finetune(a) -> int:
    from .data import SequentialData
    data = SequentialData.load(a.data, max_len=a.max_len)
    _train(a, data, "finetune", init=a.init)
    return 0


def cmd_pretrain(a) -> int:
    from .data import SequentialData, concat_domains
    data = concat_domains([SequentialData.load(d, max_len=a.max_len) for d in a.data])
    _train(a, data, "pretrain", validate=a.validate)
    return 0


def _load(a, checkpoint=None, data_dir=None):
    from .data import SequentialData
    from .train import load_checkpoint, read_checkpoint_config, resolve_device, set_seed
    set_seed(a.seed)
    checkpoint, data_dir = checkpoint or a.checkpoint, data_dir or a.data
    resolve_device(a.device)  # a bad --device fails before any loading
    cfg = read_checkpoint_config(checkpoint)["model_config"]
    data = SequentialData.load(data_dir, max_len=cfg.get("max_len"))
    overrides = {} if a.backend == "auto" else {"backend": a.backend}
    model = load_checkpoint(checkpoint, data, device=a.device, **overrides)
    model.eval()
    return data, model


def cmd_evaluate(a) -> int:
    import time
    from .train import evaluate_model, popularity_metrics
    data, model = _load(a)
    t0 = time.perf_counter()
    res = {"model" + (" (exclude seen)" if a.exclude_seen else ""):
           evaluate_model(model, data, a.split, a.batch_size, progress=not a.quiet, exclude_seen=a.exclude_seen)}
    secs = time.perf_counter() - t0
    if a.popularity:
        res["popularity"] = popularity_metrics(data, a.split)
        res["popularity (exclude seen)"] = popularity_metrics(data, a.split, exclude_seen=True)
    _print_metrics(res, a.split)
    _say(f"({data.num_samples(a.split)} users evaluated in {secs:.1f} s"
         + (f", {a._threads})" if next(model.parameters()).device.type == "cpu" else ")"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _print_metrics(res: dict, split: str) -> None:
    w = max(len(n) for n in res)
    for name, m in res.items():
        _say(f"{name:>{w}} {split}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("hit")))


def _top_k(model, data, h, k: int, seen=None):
    """Top-k item ids and scores per row; padding and `seen` (row, item) pairs never come back, k is capped at
    the number of candidates. Returns (list of id lists, list of score lists, k used)."""
    import torch
    from .metrics import topk_items
    dev = next(model.parameters()).device
    with torch.no_grad():
        scores = model.full_scores(model.encode(h["item_seq"].to(dev), h["time_seq"].to(dev), h["lengths"].to(dev)))
        exclude = torch.zeros_like(scores, dtype=torch.bool)
        exclude[:, 0] = True
        if seen is not None:
            exclude[seen[0].to(dev), seen[1].to(dev)] = True
        k_used = min(k, data.num_items)
        top = topk_items(scores, k_used, exclude)
        top_scores = scores.masked_fill(exclude, float("-inf")).gather(1, top)
    ids, vals = [], []
    for r in range(top.shape[0]):
        keep = torch.isfinite(top_scores[r])
        ids.append(top[r][keep].cpu().tolist())
        vals.append(top_scores[r][keep].cpu().tolist())
    return ids, vals, k_used


def cmd_recommend(a) -> int:
    import torch
    if bool(a.users) == bool(a.history):
        raise ValueError("give either --users or --history")
    if a.k < 1:
        raise ValueError(f"--k must be >= 1, got {a.k}")
    data, model = _load(a)
    if a.users:
        uidx = data.user_index(a.users)
        h = data.user_histories(uidx)
        names = list(a.users)
        seen = data.seen_items_of_users(uidx) if a.exclude_seen else None
    else:
        if a.times is not None and len(a.times) != len(a.history):
            raise ValueError(f"{len(a.history)} --history items but {len(a.times)} --times")
        h = data.history_from_items([a.history], None if a.times is None else [a.times])
        names = ["history"]
        seen = None
        if a.exclude_seen:
            items = torch.from_numpy(data.item_index(a.history))
            seen = (torch.zeros_like(items), items)
    ids, vals, k_used = _top_k(model, data, h, a.k, seen)
    if k_used < a.k:
        _note("recommend", f"--k {a.k} capped at {k_used} (the number of items)")
    out = {}
    for r, name in enumerate(names):
        out[name] = [{"item": str(data.item_tokens[i]), "score": float(s)} for i, s in zip(ids[r], vals[r])]
        if len(out[name]) < k_used:
            _note("recommend", f"{name}: only {len(out[name])} items left after excluding seen ones")
        _say(f"{name}: " + " ".join(e["item"] for e in out[name]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def cmd_export(a) -> int:
    import torch
    from tqdm.auto import tqdm

    from .train import bars_off
    if a.format == "pt2":
        return _export_pt2(a)
    data, model = _load(a)
    dev = next(model.parameters()).device
    users = np.arange(data.num_users)
    parts = []
    with torch.no_grad():
        text_items, image_items = model.item_embeddings()
        for lo in tqdm(range(0, len(users), a.batch_size), desc="users", disable=bars_off(not a.quiet)):
            h = data.user_histories(users[lo:lo + a.batch_size])
            parts.append(model.encode(h["item_seq"].to(dev), h["time_seq"].to(dev), h["lengths"].to(dev)).cpu())
    arrays = {"user_embeddings": torch.cat(parts).numpy(), "item_text_embeddings": text_items.cpu().numpy(),
              "item_image_embeddings": image_items.cpu().numpy()}
    ids = {"users": data.user_tokens.tolist(), "items": data.item_tokens.tolist()}
    if a.out.endswith(".safetensors"):
        from safetensors.numpy import save_file
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        # ids travel with the tensors: metadata values are strings -> JSON lists (row r <-> ids[...][r])
        meta = {"user_ids": json.dumps(ids["users"]), "item_ids": json.dumps(ids["items"]),
                "format": "mmm4rec-embeddings-v1", "note": "item row 0 = padding; user rows follow user_ids"}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, a.out + ".tmp", metadata=meta)
        os.replace(a.out + ".tmp", a.out)
    else:
        os.makedirs(a.out, exist_ok=True)
        for k, v in arrays.items():
            np.save(os.path.join(a.out, k + ".npy"), v)
        with open(os.path.join(a.out, "ids.json"), "w") as f:
            json.dump(ids, f)
    _say(f"exported {', '.join(f'{k} {v.shape}' for k, v in arrays.items())} -> {a.out} "
         f"(item row 0 = padding; user rows follow the prepared user order; ids in "
         f"{'the file metadata' if a.out.endswith('.safetensors') else 'ids.json'})")
    return 0


def _export_pt2(a) -> int:
    if not a.out.endswith(".pt2"):
        raise ValueError(f"--out {a.out}: --format pt2 writes a .pt2 file (name it *.pt2)")
    if os.path.exists(a.out) and not a.overwrite:
        raise ValueError(f"--out {a.out} exists: pass --overwrite to replace it")
    from .export import export_topk
    data, model = _load(a)
    k = min(a.k, model.num_items)
    if k < a.k:
        _note("export", f"--k {a.k} capped at {k} (the number of items)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    export_topk(model, a.out + ".tmp", k=k)
    os.replace(a.out + ".tmp", a.out)
    _say(f"exported the top-{k} program (item_seq [b, {model.config.max_len}] long, time_seq [b, "
         f"{model.config.max_len}] float64, lengths [b] long -> scores [b, {k}], item rows [b, {k}]) -> {a.out}; "
         f"item row r is item token data.item_tokens[r] (row 0 = padding, never returned)")
    return 0


def cmd_import_official(a) -> int:
    try:
        from . import official
    except ImportError as e:
        raise ValueError(f"mmm4rec.official is not available in this install ({e})") from None
    if not os.path.exists(a.ckpt):
        raise ValueError(f"{a.ckpt}: no such file")
    _check_out(a.out, False, a.overwrite, files=("model.safetensors", "config.json"),
               hint="pass --overwrite to replace it")
    overrides = {k: v for k, v in (("max_len", a.max_len), ("num_items", a.num_items)) if v is not None}
    info = official.import_official(a.ckpt, a.out, ngroups=a.ngroups, exact=a.exact, **overrides)
    _say(official.main_summary(info))
    return 0


# The source checkout mmm4rec runs from (editable install, PYTHONPATH): its benchmarks/ hold the Table 4 harness,
# which the installed package does not ship.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table4_harness():
    """benchmarks/table4.py of the source checkout as a module, or None outside a checkout."""
    import importlib.util
    path = os.path.join(_CHECKOUT, "benchmarks", "table4.py")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(_CHECKOUT, "setup.py"))):
        return None
    spec = importlib.util.spec_from_file_location("mmm4rec_checkout_table4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_bench(a) -> int:
    harness = _table4_harness()
    if harness is None:
        print("mmm4rec bench table4: the Table 4 harness is not installed with the package; run it from a source "
              "checkout: python -m benchmarks.table4 ...", file=sys.stderr)
        return 2
    rest = [x for x in a.rest if x != "--"]
    return int(harness.main(rest, prog="mmm4rec bench table4") or 0)


def cmd_demo(a) -> int:
    """prepare (if needed) -> finetune --preset cpu --time-budget -> evaluate (+ popularity) -> recommend -> plot."""
    import time
    from .data import SequentialData
    from .train import evaluate_model, popularity_metrics
    t0 = time.perf_counter()
    _check_out(a.out, False, a.overwrite, hint="pass --overwrite to replace it or --out DIR for a new run")
    if os.path.exists(os.path.join(a.data, "meta.json")):
        _say(f"[1/4] using the prepared demo data in {a.data}")
    else:
        _say(f"[1/4] building the demo data (synthetic, 2,000 users) -> {a.data}")
        syn = _demo_dataset("small", 0, 768)
        d = syn.to_sequential(max_len=20, kcore=5)
        d.save(a.data)
    data = SequentialData.load(a.data)
    _say(f"[2/4] training (preset cpu, at most {a.minutes:g} min; Ctrl-C stops and keeps a resumable run)")
    args = build_parser().parse_args(["finetune", "--data", a.data, "--out", a.out, "--preset", "cpu",
                                      "--epochs", str(a.epochs), "--time-budget", str(a.minutes),
                                      "--device", a.device, "--backend", a.backend, "--seed", str(a.seed),
                                      "--threads", str(a.threads)]
                                     + (["--quiet"] if a.quiet else []) + (["--overwrite"] if a.overwrite else []))
    args._threads = a._threads
    try:
        summary = _train(args, data, "finetune")
    except KeyboardInterrupt:
        a._saved = getattr(args, "_saved", None)
        raise
    _say("[3/4] test metrics of the best checkpoint (full sort over all items)")
    model = _load(args, os.path.join(a.out, "best"), a.data)[1]
    res = {"MMM4Rec": summary["test"],
           "MMM4Rec (exclude seen)": evaluate_model(model, data, "test", 1024, exclude_seen=True),
           "popularity": popularity_metrics(data, "test"),
           "popularity (exclude seen)": popularity_metrics(data, "test", exclude_seen=True)}
    _print_metrics(res, "test")
    with open(os.path.join(a.out, "demo_metrics.json"), "w") as f:
        json.dump(res, f, indent=1)
    user = str(data.user_tokens[0])
    ids, _, _ = _top_k(model, data, data.user_histories(data.user_index([user])), a.k)
    _say(f"[4/4] top-{a.k} for user {user} (history ends with "
         f"{' '.join(data.item_tokens[data.seq_items[data.seq_offsets[1] - 3:data.seq_offsets[1]]])}): "
         + " ".join(str(data.item_tokens[i]) for i in ids[0]))
    _say(f"done in {time.perf_counter() - t0:.0f} s; plot: {os.path.join(a.out, 'convergence.png')}; next: "
         f"mmm4rec recommend --checkpoint {os.path.join(a.out, 'best')} --data {a.data} --users {user}")
    return 0


COMMANDS = {"demo": cmd_demo, "prepare": cmd_prepare, "finetune": cmd_finetune, "pretrain": cmd_pretrain,
            "evaluate": cmd_evaluate, "recommend": cmd_recommend, "export": cmd_export,
            "import-official": cmd_import_official, "bench": cmd_bench}


def _one_line(e: BaseException) -> str:
    """The user-facing line of an exception: our ValueErrors as they are, OS errors with their file, anything
    else with its type and a pointer to --debug."""
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: no such file or directory"
    if isinstance(e, (IsADirectoryError, NotADirectoryError, PermissionError)) and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = " ".join(str(e).split()) or "(no message)"
    if isinstance(e, ValueError):
        return text
    if isinstance(e, MemoryError):
        return "out of memory; try --preset cpu or a smaller --batch-size"
    return f"{type(e).__name__}: {text[:400]} (rerun with --debug for the traceback)"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `mmm4rec` console script (and `python -m mmm4rec`). Returns the exit status:
    0 ok, 1 error (one line on stderr), 130 Ctrl-C."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["diagnose"]:                 # its own parser: python -m mmm4rec.diagnose
        from . import diagnose
        return diagnose.main(args[1:])
    try:
        a = build_parser().parse_args(args)
    except SystemExit as e:  # --help (0) or a usage error (1, one line already printed)
        return int(e.code or 0)
    debug = getattr(a, "debug", False) or os.environ.get("MMM4REC_DEBUG") == "1"
    prog = f"mmm4rec {a.cmd}"
    try:
        if hasattr(a, "threads"):
            a._threads = _set_threads(a)
        return COMMANDS[a.cmd](a)
    except KeyboardInterrupt:
        if debug:
            raise
        saved = getattr(a, "_saved", None)
        print(f"{prog}: interrupted" + (f"; resumable checkpoint in {saved} (rerun the same command with --resume)"
                                        if saved else ""), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line unless --debug
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
