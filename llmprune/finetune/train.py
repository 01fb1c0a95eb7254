"""The training loop of sparse fine-tuning: packed windows with a held-out validation split, AdamW with
warm-up + cosine, gradient accumulation, optional distillation from a dense teacher, periodic
validation with early stopping, and resumable checkpoints in a work dir.

The order of the windows is a function of (seed, step) alone, so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run would. Under ``torchrun`` / ``accelerate launch`` the loop is
data-parallel through accelerate (DDP; gradients averaged): each of the N processes takes its slice of
a global micro-batch of N x ``batch_size`` windows, so N processes equal one with N times the batch.
With ``fsdp`` (or ``accelerate launch --use_fsdp``) the model is sharded by torch's FSDP2 instead of
replicated (:mod:`.shard`): same batches, same masks, 1/N of the weights, gradients and Adam state.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..report import write_atomic
from . import losses, shard
from .config import FinetuneConfig
from .sparsity import ADMM, SRSTE, Masked

CHECKPOINT = "finetune-state.pt"


def split_windows(windows: torch.Tensor, val_fraction: float, val_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows and a held-out validation tail (contiguous text, never seen in training)."""
    n_val = min(val_max, max(1, round(len(windows) * val_fraction)))
    if len(windows) - n_val < 1:
        raise LLMPruneError(f"finetune: {len(windows)} training windows are too few to hold out a validation split")
    return windows[:-n_val], windows[-n_val:]


def batch_at(train: torch.Tensor, index: int, size: int, seed: int) -> torch.Tensor:
    """Micro-batch ``index`` of an endless stream of epochs, each a fresh permutation seeded by (seed, epoch)."""
    per_epoch = max(1, len(train) // size)
    epoch, k = divmod(index, per_epoch)
    order = list(range(len(train)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return train[order[k * size:(k + 1) * size]]


def _strategy(cfg: FinetuneConfig, weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor] | None,
              patterns: dict[str, Pattern], steps: int) -> Masked:
    if cfg.mode == "admm":
        return ADMM(weights, patterns, cfg.admm_rho, cfg.admm_rho_growth, cfg.admm_every,
                    max(1, int(cfg.admm_hard_prune * steps)))
    if cfg.mode == "sr-ste":
        return SRSTE(weights, patterns, cfg.srste_decay)
    if masks is None:
        masks = {k: patterns[k].project(shard.whole(shard.local(w).detach(), w).abs().float()) for k, w in weights.items()}
    return Masked(weights, masks)


def _autocast(cfg: FinetuneConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or cfg.autocast == "off":
        return contextlib.nullcontext()
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and torch.cuda.is_bf16_supported())
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: nn.Module, windows: torch.Tensor, cfg: FinetuneConfig, patterns: dict[str, Pattern],
          masks: dict[str, torch.Tensor] | None, teacher: nn.Module | None, device: torch.device,
          work: Any = None, quiet: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fine-tune ``model`` (on ``device``) in place; ``patterns``/``masks``: target weight name -> pattern / mask.
    Returns the record (curves, timings) and the final masks (exactly on each pattern)."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    acc = Accelerator(cpu=device.type == "cpu", device_placement=False)
    world, rank = acc.num_processes, acc.process_index
    fsdp = (cfg.fsdp or parse_flag_from_env("ACCELERATE_USE_FSDP")) and world > 1
    train_w, val_w = split_windows(windows, cfg.val_fraction, cfg.val_max)
    steps = cfg.steps(world)
    core = shard.shard(model, device, world) if fsdp else model  # the caller's model gets the weights at the end
    params = dict(core.named_parameters())
    weights = {k: params[k] for k in patterns}
    strategy = _strategy(cfg, weights, masks, patterns, steps)
    base_opt = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(base_opt, lambda s: _schedule(s, steps, warmup))
    # DDP under a distributed launcher, else unchanged; FSDP2 already reduces the gradients itself
    net, opt = (core, base_opt) if fsdp else acc.prepare(core, base_opt)
    record: dict[str, Any] = {"steps": steps, "train_windows": len(train_w), "val_windows": len(val_w),
                              "processes": world, "fsdp": fsdp, "loss": [], "val": [], "tokens": 0, "seconds": 0.0}
    start = 0
    if work is not None and cfg.resume and (work / CHECKPOINT).is_file():
        state = torch.load(work / CHECKPOINT, weights_only=False)
        shard.load_training_state(core, base_opt, state)
        sched.load_state_dict(state["sched"])
        strategy.load(state["strategy"])
        record, start = state["record"], state["step"]
        torch.set_rng_state(state["rng"])
    if cfg.grad_checkpointing:
        core.gradient_checkpointing_enable()
    want_hidden = cfg.squarehead > 0

    def objective(batch: torch.Tensor) -> torch.Tensor:
        with _autocast(cfg, device):
            out = net(batch, use_cache=False, output_hidden_states=want_hidden)
            loss = cfg.ce * losses.cross_entropy(out.logits, batch) if cfg.ce else 0.0
            if teacher is not None and cfg.needs_teacher:
                with torch.no_grad():
                    ref = teacher(batch, use_cache=False, output_hidden_states=want_hidden)
                if cfg.kd:
                    loss = loss + cfg.kd * losses.kd(out.logits, ref.logits, cfg.kd_temperature)
                if want_hidden:
                    loss = loss + cfg.squarehead * losses.squarehead(out.hidden_states[1:], ref.hidden_states[1:])
        return loss

    @torch.no_grad()
    def validate() -> float:
        core.eval()
        strategy.before_forward()
        total = sum(float(losses.cross_entropy(core(b.to(device), use_cache=False).logits, b.to(device)))
                    for b in val_w.split(cfg.batch_size))
        core.train()
        return total / math.ceil(len(val_w) / cfg.batch_size)

    net.train()
    vals = [v["loss"] for v in record["val"]]
    best = min(vals, default=math.inf)
    since_best = len(vals) - 1 - vals.index(best) if vals else 0
    t0 = time.perf_counter() - record["seconds"]
    bar = tqdm(range(start, steps), desc=f"finetune {cfg.mode}", disable=quiet, unit="step", initial=start, total=steps)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        strategy.before_forward()
        total = 0.0
        for j in range(cfg.grad_accum):
            glob = batch_at(train_w, step * cfg.grad_accum + j, cfg.batch_size * world, cfg.seed)
            batch = glob[rank * cfg.batch_size:(rank + 1) * cfg.batch_size].to(device)
            loss = objective(batch) / cfg.grad_accum
            if not torch.isfinite(loss):
                raise LLMPruneError(f"finetune step {step}: the loss is NaN/Inf (lower --lr?)")
            acc.backward(loss)
            total += float(acc.reduce(loss.detach(), "mean"))
            record["tokens"] += glob.numel()
        strategy.before_step()
        opt.step()
        sched.step()
        strategy.after_step(step + 1)
        record["loss"].append(total)
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{record['tokens'] / max(elapsed, 1e-9):.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            val = validate()
            record["val"].append({"step": step + 1, "loss": val})
            since_best = 0 if val < best else since_best + 1
            best = min(best, val)
            record["seconds"] = time.perf_counter() - t0
            if work is not None:  # every process gathers (FSDP), the main one writes
                state = {**shard.training_state(core, base_opt), "sched": sched.state_dict(), "strategy": strategy.state(),
                         "record": record, "step": step + 1, "rng": torch.get_rng_state()}
                if acc.is_main_process:
                    write_atomic(work / CHECKPOINT, lambda tmp, s=state: torch.save(s, tmp))
            if cfg.patience and since_best >= cfg.patience:
                record["stopped_early"] = step + 1
                break
    if cfg.grad_checkpointing:
        core.gradient_checkpointing_disable()
    final = strategy.final_masks()
    if fsdp:
        shard.copy_back(core, model)
    acc.free_memory()
    model.eval()
    record["seconds"] = time.perf_counter() - t0
    if isinstance(strategy, ADMM):
        record["admm_violation"] = strategy.violation
    return record, {k: m.to("cpu") for k, m in final.items()}
