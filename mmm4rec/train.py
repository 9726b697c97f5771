"""Training loop: NAdam + gradient accumulation, early stopping on a validation metric, budgets, checkpoints, logs.

    data = SequentialData.load("prepared/scientific")          # or make_synthetic_dataset(...).to_sequential()
    model = build_model(MMM4RecConfig(), data)
    trainer = Trainer(model, data, grad_accum=8, epochs=200, out_dir="runs/sci")
    summary = trainer.fit()                                      # {'best_epoch', 'valid': {...}, 'test': {...}}

Checkpoint dir layout (written by `save_checkpoint`): model.safetensors (weights), config.json (model config,
num_items, data name, epoch, metrics), and for `last/` also trainer.pt (optimizer state, epoch, position inside the
epoch, early-stopping state, log) so `Trainer.resume()` continues a run, also one stopped mid-epoch. Every checkpoint
dir is written whole into `<dir>.tmp` and then swapped in by renames, so a crash mid-write leaves the previous one
intact (`<dir>.old` during the swap; the loaders fall back to it). out_dir also gets log.json (one entry per epoch)
and convergence.png (valid metric and loss vs epoch, refreshed every epoch; skipped when matplotlib is missing).

Budgets: `time_budget_s` / `max_total_batches` stop training cleanly at an optimizer-step boundary, then validate,
checkpoint and test as at the end of a run; `checkpoint_every_s` also writes last/ and log.json inside long epochs.
Ctrl-C (KeyboardInterrupt) writes a resumable last/ before it propagates.

Pre-training: `Trainer(model, concat_domains([...]), mode="inbatch", lr=2.5e-4)`; fine-tuning from it:
`load_pretrained(model, "runs/pre/best")` (drops item-specific tensors via model.load_transfer).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .metrics import DEFAULT_KS, RankingAccumulator

logger = logging.getLogger("mmm4rec")

LOSS_REDUCTIONS = ("sum_over_accum", "mean_over_accum")


def bars_off(progress: bool) -> bool:
    """tqdm's `disable`: off when progress is not wanted, or when stderr is not a terminal (a log file or a CI
    capture would fill with carriage returns), except inside Jupyter (its bars are widgets)."""
    import sys
    return not progress or not (sys.stderr.isatty() or "ipykernel" in sys.modules)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """'auto'/None -> cuda if available else cpu. Asking for CUDA without it is a ValueError naming --device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, auto): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch has no usable CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


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


# checkpoint files: mmm4rec/checkpoint.py (re-exported here; older code imports them from mmm4rec.train)
from .checkpoint import (  # noqa: E402,F401
    _load_weights, _swap_in, _write_json_atomic, checkpoint_dir, load_checkpoint, load_pretrained,
    read_checkpoint_config, read_weights, save_checkpoint)


class _LossModule(torch.nn.Module):
    """model.loss as a forward(), so DistributedDataParallel sees (and all-reduces the gradients of) the model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, item_seq, time_seq, lengths, target, mode: str = "full", pool=None):
        return self.model.loss(item_seq, time_seq, lengths, target, mode=mode,
                               **({} if pool is None else {"pool": pool}))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_loss(fn, mode, device):
    """torch.compile(fn, fullgraph=True, dynamic=True, mode=...) for the training step (mode True = "default").
    fullgraph: the whole loss is one graph (a graph break raises instead of silently splitting the step)."""
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {mode!r}")
    if mode == "reduce-overhead" and device.type != "cuda":
        logger.info("compile='reduce-overhead' uses CUDA graphs on a GPU; on %s it compiles like 'default'",
                    device.type)
    logger.info("torch.compile of the training loss: fullgraph=True, dynamic=True, mode=%s", mode)
    # CPU: dropout masks from ATen's generator (inductor's in-kernel random numbers measured slower there)
    if device.type == "cpu" and mode == "default":
        return torch.compile(fn, fullgraph=True, dynamic=True, options={"fallback_random": True})
    return torch.compile(fn, fullgraph=True, dynamic=True, mode=None if mode == "default" else mode)


class Trainer:
    """Train / evaluate an MMM4Rec-like model on a SequentialData.

    The model must offer loss(item_seq, time_seq, lengths, target, mode), encode(...) and full_scores(user).

    Args:
        lr, weight_decay: NAdam settings (official fine-tune 1e-4 / 0.005; pre-train lr 2.5e-4).
        batch_size: samples per forward; grad_accum: forwards per optimizer step (official fine-tune 8).
        loss_reduction: how the `grad_accum` micro-batch losses form one step's gradient.
            "sum_over_accum" (default, the official code): backward() of each micro-batch's mean loss as is, so the
            gradient is the SUM over the accumulated micro-batches. With NAdam's L2 weight decay (added to the
            gradient) this keeps the official balance between the loss gradient and the decay; dividing by the
            accumulation steps would make the decay relatively grad_accum times stronger.
            "mean_over_accum": divide each micro-batch loss by grad_accum (the usual "large batch" equivalence).
        epochs: max epochs; patience: stop after this many epochs without a better valid `metric`.
        metric: "ndcg@K" | "recall@K" | "hit@K" with K in ks.
        mode: "full" (softmax over all items) or "inbatch" (pre-training).
        seed: seeds torch/numpy/python at construction and the batch shuffling.
        device: "cpu", "cuda", "auto"/None.
        out_dir: where checkpoints/logs/plot go (None = keep nothing on disk).
        tf32: allow TF32 matmuls on CUDA (the official fp32 + TF32 setting).
        validate: False skips validation (pre-training): every epoch counts as the best, no early stop.
        max_batches: cap batches per epoch (smoke tests / timing); None = all.
        max_total_batches: budget: stop the run after this many training batches in total (counted over resumes).
        time_budget_s: budget: stop the run after this many seconds of this fit() call (validation included).
            Both budgets stop at an optimizer-step boundary, then validate, checkpoint and test as a finished run.
        checkpoint_every_s: inside an epoch, write last/ and log.json at least this often (None = epoch ends only).
        compile: False (eager), True / "default" (torch.compile(fullgraph=True, dynamic=True) of the whole loss: one
            graph, the kernels as registered ops torch.ops.mmm4rec.*) or "reduce-overhead" (the same plus CUDA graphs
            on a GPU: the step is replayed without per-kernel launches; on CPU it equals "default").  Off by default:
            its GPU effect is not measured yet.
        exclude_seen: validation/test rank only items the user has not interacted with before the target.
        distributed: a mmm4rec.distributed.DistContext; None = initialise from the environment when launched by
            torchrun (WORLD_SIZE > 1), else a single process.  With R ranks every rank draws the same shuffled global
            batch of `batch_size` samples and trains on its contiguous slice under DDP (gradients equal one process
            with the same global batch); evaluation is sharded and all-reduced (exactly the single-process metrics);
            rank 0 alone writes checkpoints, logs, plots and progress bars; budgets are decided by rank 0.
        inbatch_negatives: "local" (each rank's own slice) or "global" (mode "inbatch" under DDP: every rank's
            targets are negatives, gathered with gradients; the same loss as one process on the global batch).
    """

    def __init__(self, model, data, *, lr: float = 1e-4, weight_decay: float = 0.005, batch_size: int = 1024,
                 grad_accum: int = 1, epochs: int = 100, patience: int = 10, metric: str = "ndcg@10",
                 mode: str = "full", seed: int = 0, device=None, out_dir: Optional[str] = None, tf32: bool = True,
                 progress: bool = True, eval_batch_size: Optional[int] = None, ks: Sequence[int] = DEFAULT_KS,
                 validate: bool = True, max_batches: Optional[int] = None, compile=False,
                 loss_reduction: str = "sum_over_accum", max_total_batches: Optional[int] = None,
                 time_budget_s: Optional[float] = None, checkpoint_every_s: Optional[float] = 600.0,
                 exclude_seen: bool = False, distributed: Optional["dist_utils.DistContext"] = None,
                 inbatch_negatives: str = "local"):
        if mode not in ("full", "inbatch"):
            raise ValueError(f"mode must be 'full' or 'inbatch', got {mode!r}")
        if grad_accum < 1 or batch_size < 1 or epochs < 0 or patience < 1:
            raise ValueError("grad_accum, batch_size, patience must be >= 1 and epochs >= 0")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if max_total_batches is not None and max_total_batches < 1:
            raise ValueError(f"max_total_batches must be >= 1, got {max_total_batches}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {time_budget_s}")
        name, _, k = metric.partition("@")
        if name not in ("ndcg", "recall", "hit") or not k.isdigit() or int(k) not in ks:
            raise ValueError(f"metric must be ndcg@K, recall@K or hit@K with K in {tuple(ks)}, got {metric!r}")
        if data.num_samples("train") == 0:
            raise ValueError(f"dataset {data.name!r} has no training samples")
        if inbatch_negatives not in ("local", "global"):
            raise ValueError(f"inbatch_negatives must be 'local' or 'global', got {inbatch_negatives!r}")
        set_seed(seed)
        if distributed is None and dist_utils.launched_by_torchrun():
            distributed = dist_utils.init_distributed(device)
        self.ctx = distributed if distributed is not None else dist_utils.DistContext()
        self.device = self.ctx.device if self.ctx.distributed else resolve_device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self.model = model.to(self.device)
        self.data = data
        self.run_dir = out_dir                      # read (resume) on every rank
        if self.ctx.distributed:
            dist_utils.check_same_data(data, self.ctx)
            if not self.ctx.is_main:                # rank 0 alone writes files and shows progress
                out_dir, progress = None, False
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size, self.grad_accum, self.loss_reduction = batch_size, grad_accum, loss_reduction
        self.epochs, self.patience, self.metric, self.mode = epochs, patience, metric, mode
        self.seed, self.out_dir, self.progress = seed, out_dir, progress
        self.eval_batch_size = eval_batch_size or batch_size
        self.ks, self.validate, self.max_batches = tuple(ks), validate, max_batches
        self.max_total_batches, self.time_budget_s = max_total_batches, time_budget_s
        self.checkpoint_every_s, self.exclude_seen = checkpoint_every_s, exclude_seen
        self._ddp = None
        self._pool = None
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self._ddp = DistributedDataParallel(
                _LossModule(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)        # e.g. the missing-image vector when every item has an image
            torch.manual_seed(seed + 1_000_003 * self.ctx.rank)  # independent dropout masks per rank
            if mode == "inbatch" and inbatch_negatives == "global":
                self._pool = dist_utils.global_inbatch_pool(self.ctx)
            self.loss_fn = compile_loss(self._ddp, compile, self.device) if compile else self._ddp
        else:
            self.loss_fn = compile_loss(self.model.loss, compile, self.device) if compile else self.model.loss
        from .model.layers import param_groups   # one group (all parameters) unless config.time_weight_decay=False
        self.optimizer = torch.optim.NAdam(param_groups(self.model, weight_decay), lr=lr, weight_decay=weight_decay)
        self.train_batches = data.batches("train", batch_size, shuffle=True, seed=seed, device=self.device)
        self.epoch = 0                 # epochs completed
        self.batch_in_epoch = 0        # batches of epoch `epoch + 1` already applied (an optimizer step follows each)
        self.total_batches = 0         # training batches applied over the whole run (resumes included)
        self._loss_sum, self._loss_count = 0.0, 0   # running loss of the current (possibly resumed) epoch
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.log: list = []
        self.last_loss = float("nan")
        self.stop_reason: Optional[str] = None   # "time budget" | "batch budget" once a budget stopped the run
        self.saved_on_interrupt: Optional[str] = None
        self._fit_start: Optional[float] = None
        self._last_save = time.perf_counter()

    # ------------------------------------------------------------------ one epoch
    def batches_per_epoch(self) -> int:
        n = len(self.train_batches)
        return n if self.max_batches is None else min(self.max_batches, n)

    def _budget_hit(self) -> Optional[str]:
        if self.max_total_batches is not None and self.total_batches >= self.max_total_batches:
            return "batch budget"
        if (self.time_budget_s is not None and self._fit_start is not None
                and time.perf_counter() - self._fit_start >= self.time_budget_s):
            return "time budget"
        return None

    def _rank0_decides(self, reason: Optional[str], due: bool):
        """Under DDP every rank must stop (budget) and sync the loss (checkpoint due) at the same step: rank 0's
        clock decides.  Returns (reason, due) as rank 0 sees them."""
        if not self.ctx.distributed:
            return reason, due
        codes = (None, "batch budget", "time budget")
        flags = torch.tensor([codes.index(reason), int(due)], device=self.ctx.device)
        import torch.distributed as dist
        dist.broadcast(flags, 0)
        return codes[int(flags[0])], bool(int(flags[1]))

    def _local_batch(self, batch):
        """This rank's slice of a global batch and its loss weight (1.0 in a single process).  A rank left without
        rows (global batch smaller than the world) runs one row with weight 0 so that it still joins the
        all-reduce."""
        if not self.ctx.distributed:
            return batch, 1.0
        local, weight = dist_utils.shard_batch(batch, self.ctx)
        if len(local["target"]) == 0:
            return {k: v[:1] for k, v in batch.items()}, 0.0
        return local, weight

    def train_epoch(self) -> float:
        """Train from batch `batch_in_epoch` to the end of the epoch, or until a budget stops it (then
        `stop_reason` is set and the epoch stays open: `batch_in_epoch` says where it resumes). Returns wall seconds
        (batch assembly + fwd/bwd/step, synchronised, validation excluded); the mean loss of the epoch so far is
        in self.last_loss (one host sync per optimizer step group only when a budget or checkpoint is due)."""
        model, opt = self.model, self.optimizer
        model.train()
        nb = self.batches_per_epoch()
        start = self.batch_in_epoch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        scale = 1.0 / self.grad_accum if self.loss_reduction == "mean_over_accum" else 1.0
        opt.zero_grad(set_to_none=True)
        bar = tqdm(total=nb, initial=start, desc=f"epoch {self.epoch + 1}", disable=bars_off(self.progress),
                   leave=False)
        self.train_batches.epoch = self.epoch  # shuffle order depends on (seed, epoch): resumable
        done = start
        pending = 0
        for i, b in enumerate(self.train_batches.iter_from(start, stop=nb), start=start):
            b, weight = self._local_batch(b)
            boundary = (i + 1 - start) % self.grad_accum == 0 or i + 1 == nb
            # DDP: all-reduce the gradients only at the optimizer step (accumulate locally before it)
            sync = self._ddp.no_sync() if self._ddp is not None and not boundary else contextlib.nullcontext()
            with sync:
                extra = {} if self._pool is None else {"pool": self._pool}
                loss = self.loss_fn(b["item_seq"], b["time_seq"], b["lengths"], b["target"], mode=self.mode, **extra)
                factor = scale * weight
                (loss * factor).backward() if factor != 1.0 else loss.backward()
            total += loss.detach() * weight if weight != 1.0 else loss.detach()
            pending += 1
            bar.update(1)
            if boundary:
                opt.step()
                opt.zero_grad(set_to_none=True)
                done, self.total_batches = i + 1, self.total_batches + pending
                pending = 0
                self.batch_in_epoch = done
                reason = self._budget_hit()
                due = bool(self.checkpoint_every_s is not None and self.out_dir
                           and time.perf_counter() - self._last_save >= self.checkpoint_every_s)
                reason, due = self._rank0_decides(reason, due)
                if reason or due or i + 1 == nb:
                    self._loss_sum += float(dist_utils.all_reduce_mean(total, self.ctx).item())
                    self._loss_count = done
                    total.zero_()
                    self.last_loss = self._loss_sum / max(self._loss_count, 1)
                if reason and i + 1 < nb:
                    self.stop_reason = reason
                    break
                if due and i + 1 < nb and self.out_dir:
                    self.save_last(self._partial_entry())
                    self._write_log(extra=[self._partial_entry()])
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if self.stop_reason is None:
            self.batch_in_epoch = 0
            self._loss_sum, self._loss_count = 0.0, 0
        elif self.progress:
            tqdm.write(f"{self.stop_reason} reached after {self.total_batches} batches "
                       f"(epoch {self.epoch + 1}, batch {done}/{nb})")
        return seconds

    def _partial_entry(self) -> dict:
        nb = self.batches_per_epoch()
        return {"epoch": round(self.epoch + self.batch_in_epoch / max(nb, 1), 4), "loss": self.last_loss,
                "partial": True, "batches": self.batch_in_epoch}

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> Dict[str, float]:
        """Full-sort Recall/NDCG/Hit@K over all items for the valid or test samples (history items not masked
        unless exclude_seen)."""
        if split not in ("valid", "test", "train"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if self.data.num_samples(split) == 0:
            raise ValueError(f"dataset {self.data.name!r} has no {split} samples")
        return evaluate_model(self.model, self.data, split, self.eval_batch_size, self.device, self.ks,
                              self.progress, exclude_seen=self.exclude_seen, distributed=self.ctx)

    # ------------------------------------------------------------------ full run
    def fit(self) -> dict:
        """Train until `epochs`, early stop or a budget; returns {'best_epoch', 'best_valid', 'test', 'epochs_run',
        'stopped_by', ...} with the test metrics of the best checkpoint (reloaded from out_dir/best when out_dir is
        set). Ctrl-C writes a resumable out_dir/last (path in `saved_on_interrupt`) and re-raises."""
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
        self._fit_start = self._last_save = time.perf_counter()
        self.stop_reason = self._rank0_decides(self._budget_hit(), False)[0]
        try:
            return self._fit()
        except KeyboardInterrupt:
            if self.out_dir:
                self.save_last(self._partial_entry() if self.batch_in_epoch else None)
                self._write_log()
                self.saved_on_interrupt = os.path.join(self.out_dir, "last")
            raise

    def _fit(self) -> dict:
        best_state = None
        while (self.epoch < self.epochs and self.bad_epochs < self.patience and self.stop_reason is None):
            secs = self.train_epoch()
            partial = self.stop_reason is not None
            if partial:
                entry = self._partial_entry()
                entry["epoch_seconds"] = secs
            else:
                self.epoch += 1
                entry = {"epoch": self.epoch, "loss": self.last_loss, "epoch_seconds": secs}
            if self.validate:
                t0 = time.perf_counter()
                valid = self.evaluate("valid")
                entry["valid"] = valid
                entry["eval_seconds"] = time.perf_counter() - t0
                score = valid[self.metric]
            else:
                score = float(self.total_batches)  # newest is best
            improved = score > self.best_score
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, entry["epoch"], 0
                if self.out_dir:
                    save_checkpoint(self.model, os.path.join(self.out_dir, "best"), self._meta(entry))
                else:
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            elif not partial:
                self.bad_epochs += 1
            entry["best"] = improved
            self.log.append(entry)
            if self.progress:
                msg = f"epoch {entry['epoch']}: loss {self.last_loss:.4f} ({secs:.2f}s)"
                if self.validate:
                    msg += f" valid {self.metric} {score:.4f}" + (" *" if improved else "")
                tqdm.write(msg)
            if self.out_dir:
                self._write_log()
                self.save_last()
                self.plot()
            if self.stop_reason is None:
                self.stop_reason = self._rank0_decides(self._budget_hit(), False)[0]
        if self.out_dir and self.best_epoch:
            _load_weights(self.model, os.path.join(self.out_dir, "best", "model.safetensors"))
        elif best_state is not None:
            self.model.load_state_dict(best_state)
        stopped = self.stop_reason or ("early stop" if self.bad_epochs >= self.patience else "epochs")
        summary = {"best_epoch": self.best_epoch, "epochs_run": self.epoch, "total_batches": self.total_batches,
                   "stopped_by": stopped, "best_valid": self.best_score if self.validate and self.log else None,
                   "epoch_seconds": [e["epoch_seconds"] for e in self.log]}
        if self.validate and self.data.num_samples("test"):
            summary["test"] = self.evaluate("test")
        if self.out_dir:
            _write_json_atomic(os.path.join(self.out_dir, "summary.json"), summary)
            self.plot()
        return summary

    def close(self) -> None:
        """Under DDP: free the DDP wrapper while every rank still holds the process group, then destroy the group
        if this Trainer created it (a DDP reducer outliving its gloo group hung at exit in ~1 run of 3)."""
        if self._ddp is not None:
            import gc
            dist_utils.barrier(self.ctx)
            self._ddp, self.loss_fn = None, self.model.loss
            gc.collect()
            dist_utils.barrier(self.ctx)
        dist_utils.shutdown(self.ctx)

    # ------------------------------------------------------------------ persistence
    def _meta(self, entry: dict) -> dict:
        return {"data_name": self.data.name, "epoch": entry.get("epoch", self.epoch), "metrics": entry.get("valid"),
                "trainer": {"lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                            "grad_accum": self.grad_accum, "loss_reduction": self.loss_reduction,
                            "mode": self.mode, "metric": self.metric, "seed": self.seed}}

    def save_last(self, entry: Optional[dict] = None) -> None:
        """Checkpoint everything needed to resume into out_dir/last (weights, optimizer, position inside the epoch,
        early-stop state, log), written atomically."""
        self._last_save = time.perf_counter()
        state = {"optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "total_batches": self.total_batches, "loss_sum": self._loss_sum, "loss_count": self._loss_count,
                 "best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                 "log": self.log, "torch_rng": torch.get_rng_state()}
        save_checkpoint(self.model, os.path.join(self.out_dir, "last"),
                        self._meta(entry or (self.log[-1] if self.log else {})), trainer_state=state)

    def resume(self, path: Optional[str] = None) -> bool:
        """Restore from `path` (default out_dir/last). Returns False when there is nothing to resume; unreadable
        files are a ValueError naming the file."""
        path = path or (os.path.join(self.run_dir, "last") if self.run_dir else None)
        if not path:
            return False
        path = checkpoint_dir(path)
        tp = os.path.join(path, "trainer.pt")
        if not os.path.exists(tp):
            return False
        _load_weights(self.model, os.path.join(path, "model.safetensors"))
        try:
            st = torch.load(tp, map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(st["optimizer"])
            self.epoch, self.best_score = st["epoch"], st["best_score"]
            self.best_epoch, self.bad_epochs, self.log = st["best_epoch"], st["bad_epochs"], st["log"]
            self.batch_in_epoch = st.get("batch_in_epoch", 0)
            self.total_batches = st.get("total_batches", 0)
            self._loss_sum, self._loss_count = st.get("loss_sum", 0.0), st.get("loss_count", 0)
            torch.set_rng_state(st["torch_rng"])
        except Exception as e:  # truncated / random bytes / another optimizer layout
            raise ValueError(f"{tp} is corrupted or from another run ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}); "
                             "start again with --overwrite") from None
        return True

    def _write_log(self, extra: Sequence[dict] = ()) -> None:
        _write_json_atomic(os.path.join(self.out_dir, "log.json"), list(self.log) + list(extra))

    def plot(self, path: Optional[str] = None) -> Optional[str]:
        """Convergence plot (valid metric and train loss vs epoch, with a legend) to PNG; returns the path or None.
        Called after every epoch by fit()."""
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
        lines = ax.plot(ep, [e["loss"] for e in self.log], "o-", color="tab:gray", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        if self.validate and all("valid" in e for e in self.log):
            ax2 = ax.twinx()
            lines += ax2.plot(ep, [e["valid"][self.metric] for e in self.log], "o-", color="tab:blue",
                              label=f"valid {self.metric}")
            ax2.set_ylabel(f"valid {self.metric}")
            if self.best_epoch:
                lines.append(ax2.axvline(self.best_epoch, color="tab:blue", ls=":", lw=1,
                                         label=f"best (epoch {self.best_epoch:.3g})"))
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
        ax.set_title(f"{self.data.name}: convergence")
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        return path


@torch.no_grad()
def evaluate_model(model, data, split: str = "test", batch_size: int = 1024, device=None,
                   ks: Sequence[int] = DEFAULT_KS, progress: bool = False, exclude_seen: bool = False,
                   distributed: Optional["dist_utils.DistContext"] = None) -> Dict[str, float]:
    """Full-sort metrics of `model` on one split of `data`: per batch of users one encode, one [b, N] x [N, I+1]
    matmul and one rank count, no per-user Python; one host sync at the end.

    exclude_seen: the items a user interacted with before the target get -inf (RecBole's full-sort convention), so
    a target the user had already seen earlier cannot be hit.

    distributed: a DistContext with world_size > 1 evaluates this rank's contiguous shard of the samples and
    all-reduces the integer rank counts, so every rank returns exactly the single-process metrics."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(ks)
    lo = 0
    if distributed is not None and distributed.distributed:
        from .data.dataset import BatchIterator
        lo, hi = dist_utils.shard_slice(data.num_samples(split), distributed.rank, distributed.world_size)
        it = BatchIterator({k: v[lo:hi] for k, v in data.tensors(split, device).items()}, batch_size,
                           shuffle=False) if hi > lo else []
    else:
        it = data.batches(split, batch_size, shuffle=False, device=device)
    for bi, b in enumerate(tqdm(it, desc=f"eval {split}", disable=bars_off(progress), leave=False)):
        scores = model.full_scores(model.encode(b["item_seq"], b["time_seq"], b["lengths"]))
        if exclude_seen:
            first = lo + bi * batch_size
            rows, cols = data.seen_items(split, first, first + scores.shape[0])
            scores[rows.to(device), cols.to(device)] = float("-inf")
        acc.update(scores, b["target"])
    model.train(was_training)
    if distributed is not None:
        dist_utils.all_reduce_accumulator(acc, distributed)
    return acc.result()


def popularity_scores(data) -> torch.Tensor:
    """float32 [I+1]: each item's interaction count in the training part of the sequences (each user's items before
    the valid target); column 0 (padding) = -inf."""
    counts = np.diff(data.seq_offsets)
    pos = np.arange(data.num_interactions) - np.repeat(data.seq_offsets[:-1], counts)
    n = np.repeat(counts, counts)
    train_part = np.where(n >= 3, pos < n - 2, True)
    pop = np.bincount(data.seq_items[train_part], minlength=data.num_items + 1).astype(np.float32)
    pop[0] = -np.inf
    return torch.from_numpy(pop)


def popularity_metrics(data, split: str = "test", ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 4096, exclude_seen: bool = False) -> Dict[str, float]:
    """Baseline: score every item by its training interaction count (popularity_scores), the same ranking for every
    user. exclude_seen=True removes the items each user interacted with before the target, like RecBole's Pop
    under full-sort evaluation; False ranks them too (our model's default protocol)."""
    target = torch.from_numpy(data.split(split)["target"])
    acc = RankingAccumulator(ks)
    row = popularity_scores(data)[None, :]
    for lo in range(0, len(target), batch_size):
        t = target[lo:lo + batch_size]
        scores = row.expand(len(t), -1)
        if exclude_seen:
            scores = scores.clone()
            rows, cols = data.seen_items(split, lo, lo + len(t))
            scores[rows, cols] = float("-inf")
        acc.update(scores, t)
    return acc.result()
