"""Training loop: NAdam + gradient accumulation, early stopping on a validation metric, checkpoints, logs, plots.

    data = SequentialData.load("prepared/scientific")          # or make_synthetic_dataset(...).to_sequential()
    model = build_model(MMM4RecConfig(), data)
    trainer = Trainer(model, data, grad_accum=8, epochs=200, out_dir="runs/sci")
    summary = trainer.fit()                                      # {'best_epoch', 'valid': {...}, 'test': {...}}

Checkpoint dir layout (written by `save_checkpoint`): model.safetensors (weights), config.json (model config,
num_items, data name, epoch, metrics), and for `last/` also trainer.pt (optimizer state, epoch, early-stopping
state, log) so `Trainer.resume()` continues a run. out_dir also gets log.json (one entry per epoch) and
convergence.png (valid metric and loss vs epoch; skipped when matplotlib is missing).

Pre-training: `Trainer(model, concat_domains([...]), mode="inbatch", lr=2.5e-4)`; fine-tuning from it:
`load_pretrained(model, "runs/pre/best")` (drops item-specific tensors via model.load_transfer).
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import DEFAULT_KS, RankingAccumulator


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """'auto'/None -> cuda if available else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_model(config, data, device=None):
    """MMM4Rec for `data` (its num_items and feature matrices); config.max_len is set to data.max_len."""
    from .model import MMM4Rec
    if data.text_feats is None:
        raise ValueError(f"dataset {data.name!r} has no text features; prepare it with text features "
                         "(mmm4rec prepare --text-feats ... or --encoder hashed|minilm)")
    if config.max_len != data.max_len:
        raise ValueError(f"config.max_len={config.max_len} differs from the data's max_len={data.max_len}")
    model = MMM4Rec(config, data.num_items, data.text_feats, data.image_feats, data.image_mask)
    return model.to(resolve_device(device)) if device is not None else model


def save_checkpoint(model, path: str, extra: Optional[dict] = None) -> None:
    """Write model.safetensors + config.json into dir `path`."""
    from safetensors.torch import save_model
    os.makedirs(path, exist_ok=True)
    save_model(model, os.path.join(path, "model.safetensors"))
    meta = {"model_config": model.config.to_dict(), "num_items": int(model.num_items)}
    meta.update(extra or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)


def read_checkpoint_config(path: str) -> dict:
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        raise ValueError(f"{path} is not a checkpoint dir (no config.json)")
    with open(p) as f:
        return json.load(f)


def load_checkpoint(path: str, data, device=None, **config_overrides):
    """Rebuild the model saved in dir `path` for `data` (which supplies the features) and load its weights.
    config_overrides (e.g. backend="torch") replace stored config fields. Raises ValueError on an item-count
    mismatch (use load_pretrained for another domain)."""
    from safetensors.torch import load_model
    from .model import MMM4RecConfig
    meta = read_checkpoint_config(path)
    if meta["num_items"] != data.num_items:
        raise ValueError(f"checkpoint {path} has {meta['num_items']} items, dataset {data.name!r} has "
                         f"{data.num_items}; for another domain use load_pretrained / --init")
    cfg = MMM4RecConfig.from_dict({**meta["model_config"], **config_overrides})
    if data.max_len != cfg.max_len:
        data.with_max_len(cfg.max_len)
    model = build_model(cfg, data)
    load_model(model, os.path.join(path, "model.safetensors"), strict=True)
    return model.to(resolve_device(device))


def load_pretrained(model, path: str):
    """Load a (pre-trained) checkpoint's transferable weights into `model` (another item catalogue allowed).
    Returns (missing, unexpected) key lists from model.load_transfer."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    return model.load_transfer(state)


class Trainer:
    """Train / evaluate an MMM4Rec-like model on a SequentialData.

    The model must offer loss(item_seq, time_seq, lengths, target, mode), encode(...) and full_scores(user).

    Args:
        lr, weight_decay: NAdam settings (official fine-tune 1e-4 / 0.005; pre-train lr 2.5e-4).
        batch_size: samples per forward; grad_accum: forwards per optimizer step (official fine-tune 8).
        epochs: max epochs; patience: stop after this many epochs without a better valid `metric`.
        metric: "ndcg@K" | "recall@K" | "hit@K" with K in ks.
        mode: "full" (softmax over all items) or "inbatch" (pre-training).
        seed: seeds torch/numpy/python at construction and the batch shuffling.
        device: "cpu", "cuda", "auto"/None.
        out_dir: where checkpoints/logs/plot go (None = keep nothing on disk).
        tf32: allow TF32 matmuls on CUDA (the official fp32 + TF32 setting).
        validate: False skips validation (pre-training): every epoch counts as the best, no early stop.
        max_batches: cap batches per epoch (smoke tests / timing); None = all.
        compile: run the loss through torch.compile (the SSD kernels stay opaque calls; the projections, time path,
            norms and FFNs around them are compiled). Off by default: its GPU effect is not measured yet.
    """

    def __init__(self, model, data, *, lr: float = 1e-4, weight_decay: float = 0.005, batch_size: int = 1024,
                 grad_accum: int = 1, epochs: int = 100, patience: int = 10, metric: str = "ndcg@10",
                 mode: str = "full", seed: int = 0, device=None, out_dir: Optional[str] = None, tf32: bool = True,
                 progress: bool = True, eval_batch_size: Optional[int] = None, ks: Sequence[int] = DEFAULT_KS,
                 validate: bool = True, max_batches: Optional[int] = None, compile: bool = False):
        if mode not in ("full", "inbatch"):
            raise ValueError(f"mode must be 'full' or 'inbatch', got {mode!r}")
        if grad_accum < 1 or batch_size < 1 or epochs < 0 or patience < 1:
            raise ValueError("grad_accum, batch_size, patience must be >= 1 and epochs >= 0")
        name, _, k = metric.partition("@")
        if name not in ("ndcg", "recall", "hit") or not k.isdigit() or int(k) not in ks:
            raise ValueError(f"metric must be ndcg@K, recall@K or hit@K with K in {tuple(ks)}, got {metric!r}")
        if data.num_samples("train") == 0:
            raise ValueError(f"dataset {data.name!r} has no training samples")
        set_seed(seed)
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self.model = model.to(self.device)
        self.data = data
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.epochs, self.patience, self.metric, self.mode = epochs, patience, metric, mode
        self.seed, self.out_dir, self.progress = seed, out_dir, progress
        self.eval_batch_size = eval_batch_size or batch_size
        self.ks, self.validate, self.max_batches = tuple(ks), validate, max_batches
        self.loss_fn = torch.compile(self.model.loss) if compile else self.model.loss
        self.optimizer = torch.optim.NAdam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.train_batches = data.batches("train", batch_size, shuffle=True, seed=seed, device=self.device)
        self.epoch = 0                 # epochs completed
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.log: list = []
        self.last_loss = float("nan")

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self) -> float:
        """One pass over the training samples. Returns wall seconds (batch assembly + fwd/bwd/step, synchronised,
        validation excluded); the mean loss is in self.last_loss (one host sync per epoch)."""
        model, opt = self.model, self.optimizer
        model.train()
        self.train_batches.epoch = self.epoch  # shuffle order depends on (seed, epoch): resumable
        nb = len(self.train_batches) if self.max_batches is None else min(self.max_batches, len(self.train_batches))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        opt.zero_grad(set_to_none=True)
        bar = tqdm(total=nb, desc=f"epoch {self.epoch + 1}", disable=not self.progress, leave=False)
        for i, b in enumerate(self.train_batches):
            if i >= nb:
                break
            loss = self.loss_fn(b["item_seq"], b["time_seq"], b["lengths"], b["target"], mode=self.mode)
            (loss / self.grad_accum).backward()
            total += loss.detach()
            if (i + 1) % self.grad_accum == 0 or i + 1 == nb:
                opt.step()
                opt.zero_grad(set_to_none=True)
            bar.update(1)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.last_loss = float(total.item()) / max(nb, 1)
        return seconds

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> Dict[str, float]:
        """Full-sort Recall/NDCG/Hit@K over all items for the valid or test samples (history items not masked)."""
        if split not in ("valid", "test", "train"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if self.data.num_samples(split) == 0:
            raise ValueError(f"dataset {self.data.name!r} has no {split} samples")
        return evaluate_model(self.model, self.data, split, self.eval_batch_size, self.device, self.ks,
                              self.progress)

    # ------------------------------------------------------------------ full run
    def fit(self) -> dict:
        """Train until `epochs` or early stop; returns {'best_epoch', 'best_valid', 'test', 'epochs_run', ...}
        with the test metrics of the best checkpoint (reloaded from out_dir/best when out_dir is set)."""
        best_state = None
        while self.epoch < self.epochs and self.bad_epochs < self.patience:
            secs = self.train_epoch()
            self.epoch += 1
            entry = {"epoch": self.epoch, "loss": self.last_loss, "epoch_seconds": secs}
            if self.validate:
                t0 = time.perf_counter()
                valid = self.evaluate("valid")
                entry["valid"] = valid
                entry["eval_seconds"] = time.perf_counter() - t0
                score = valid[self.metric]
            else:
                score = float(self.epoch)  # newest is best
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
                if self.out_dir:
                    save_checkpoint(self.model, os.path.join(self.out_dir, "best"), self._meta(entry))
                else:
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                self.bad_epochs += 1
            entry["best"] = improved
            self.log.append(entry)
            if self.progress:
                msg = f"epoch {self.epoch}: loss {self.last_loss:.4f} ({secs:.2f}s)"
                if self.validate:
                    msg += f" valid {self.metric} {score:.4f}" + (" *" if improved else "")
                tqdm.write(msg)
            if self.out_dir:
                self._write_log()
                self.save_last()
        if self.out_dir and self.best_epoch:
            from safetensors.torch import load_model
            load_model(self.model, os.path.join(self.out_dir, "best", "model.safetensors"), strict=True)
        elif best_state is not None:
            self.model.load_state_dict(best_state)
        summary = {"best_epoch": self.best_epoch, "epochs_run": self.epoch,
                   "best_valid": self.best_score if self.validate else None,
                   "epoch_seconds": [e["epoch_seconds"] for e in self.log]}
        if self.validate and self.data.num_samples("test"):
            summary["test"] = self.evaluate("test")
        if self.out_dir:
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            self.plot()
        return summary

    # ------------------------------------------------------------------ persistence
    def _meta(self, entry: dict) -> dict:
        return {"data_name": self.data.name, "epoch": self.epoch, "metrics": entry.get("valid"),
                "trainer": {"lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                            "grad_accum": self.grad_accum, "mode": self.mode, "metric": self.metric,
                            "seed": self.seed}}

    def save_last(self) -> None:
        """Checkpoint everything needed to resume into out_dir/last (weights, optimizer, early-stop state, log)."""
        path = os.path.join(self.out_dir, "last")
        save_checkpoint(self.model, path, self._meta(self.log[-1] if self.log else {}))
        torch.save({"optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "best_score": self.best_score,
                    "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "log": self.log,
                    "torch_rng": torch.get_rng_state()}, os.path.join(path, "trainer.pt"))

    def resume(self, path: Optional[str] = None) -> bool:
        """Restore from `path` (default out_dir/last). Returns False when there is nothing to resume."""
        from safetensors.torch import load_model
        path = path or (os.path.join(self.out_dir, "last") if self.out_dir else None)
        if not path or not os.path.exists(os.path.join(path, "trainer.pt")):
            return False
        load_model(self.model, os.path.join(path, "model.safetensors"), strict=True)
        st = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.epoch, self.best_score = st["epoch"], st["best_score"]
        self.best_epoch, self.bad_epochs, self.log = st["best_epoch"], st["bad_epochs"], st["log"]
        torch.set_rng_state(st["torch_rng"])
        return True

    def _write_log(self) -> None:
        with open(os.path.join(self.out_dir, "log.json"), "w") as f:
            json.dump(self.log, f, indent=1)

    def plot(self, path: Optional[str] = None) -> Optional[str]:
        """Convergence plot (valid metric and train loss vs epoch) to PNG; returns the path or None."""
        if not self.log:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = path or os.path.join(self.out_dir, "convergence.png")
        ep = [e["epoch"] for e in self.log]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ep, [e["loss"] for e in self.log], "o-", color="tab:gray", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        if self.validate:
            ax2 = ax.twinx()
            ax2.plot(ep, [e["valid"][self.metric] for e in self.log], "o-", color="tab:blue",
                     label=f"valid {self.metric}")
            ax2.set_ylabel(f"valid {self.metric}")
            if self.best_epoch:
                ax2.axvline(self.best_epoch, color="tab:blue", ls=":", lw=1)
        ax.set_title(f"{self.data.name}: convergence")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@torch.no_grad()
def evaluate_model(model, data, split: str = "test", batch_size: int = 1024, device=None,
                   ks: Sequence[int] = DEFAULT_KS, progress: bool = False) -> Dict[str, float]:
    """Full-sort metrics of `model` on one split of `data` (one host sync at the end)."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks)
    it = data.batches(split, batch_size, shuffle=False, device=device)
    for b in tqdm(it, desc=f"eval {split}", disable=not progress, leave=False):
        scores = model.full_scores(model.encode(b["item_seq"], b["time_seq"], b["lengths"]))
        acc.update(scores, b["target"])
    model.train(was_training)
    return acc.result()


def popularity_metrics(data, split: str = "test", ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 4096) -> Dict[str, float]:
    """Baseline: score every item by its interaction count in the training part of the sequences (each user's
    items before the valid target), the same ranking for every user."""
    counts = np.diff(data.seq_offsets)
    pos = np.arange(data.num_interactions) - np.repeat(data.seq_offsets[:-1], counts)
    n = np.repeat(counts, counts)
    train_part = np.where(n >= 3, pos < n - 2, True)
    pop = np.bincount(data.seq_items[train_part], minlength=data.num_items + 1).astype(np.float32)
    pop[0] = -np.inf
    target = torch.from_numpy(data.split(split)["target"])
    acc = RankingAccumulator(ks)
    row = torch.from_numpy(pop)[None, :]
    for lo in range(0, len(target), batch_size):
        t = target[lo:lo + batch_size]
        acc.update(row.expand(len(t), -1), t)
    return acc.result()
