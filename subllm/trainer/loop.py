"""The training loop: setup -> steps (accumulation, bf16 autocast, clipping, optimizer, schedule)
-> periodic evaluation and checkpoints -> the final model folder (docs/design.md `train.py`).

Every step: `model.set_step(step)` (the Balancer/bypass schedules, docs/method.md section 7),
`schedule.step(step, tokens_seen)`, `grad_accum` micro-batches under autocast, clipping (ScaledAdam
clips itself; AdamW: clip_grad_norm_ 1.0), `optimizer.step()`. Parallelism and autocast are
applied here, never inside the model. Rank 0 logs, plots and saves.

Exact resume: the checkpoint holds the weights, optimizer and schedule state, every rank's RNG
and data-sampler state and the step / token counters; evaluation restores the RNG it uses. On CPU
with a fixed seed, killing a run and resuming it gives the same loss sequence, bit for bit.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from subllm.dtype import autocast, dtype_line, dtype_record, resolve_dtype
from subllm.errors import SubLLMError
from subllm.trainer import checkpoint as ckpt
from subllm.trainer import distributed as D
from subllm.trainer import uptrain
from subllm.trainer.config import (
    TrainConfig,
    model_config,
    tokens_per_step,
    total_steps,
)
from subllm.trainer.data import prepare_data
from subllm.trainer.distill import distill_step, load_teacher
from subllm.trainer.evaluation import evaluate, load_val_batches
from subllm.trainer.metrics import LOSS_PNG, METRICS, SELECTION_PNG, MetricsWriter, plot_run, plot_selection
from subllm.trainer.pose import pose_generator, pose_position_ids
from subllm.trainer.resume import check_resumable, lr_change_on_resume
from subllm.trainer.retrieval_mix import RetrievalMix

TRAIN_CONFIG = "train_config.json"


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB: VmHWM of /proc/self/status on Linux
    (ru_maxrss is not used there: across fork + exec it keeps the parent's high-water mark),
    else getrusage's ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None = fresh start); refuses to clobber an existing run."""
    latest = ckpt.latest_checkpoint(run_dir)
    if resume:
        if latest is None:
            raise SubLLMError(f"--resume: no checkpoint in {run_dir / ckpt.CHECKPOINTS}")
        return latest
    if latest is not None or (run_dir / METRICS).is_file():
        if not overwrite:
            raise SubLLMError(
                f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to start over"
            )
        if is_main:
            import shutil

            shutil.rmtree(run_dir / ckpt.CHECKPOINTS, ignore_errors=True)
            (run_dir / METRICS).unlink(missing_ok=True)
    return None


def _autocast_factory(dtype: str, device: str):
    """`--dtype` (auto | bf16 | fp32, resolved for `device` by subllm/dtype.py) -> a context factory."""
    resolved = resolve_dtype(dtype, device)
    return lambda: autocast(resolved, device)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view)."""
    device = None if cfg.device == "auto" else cfg.device
    info = D.init_distributed(device)
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _train(cfg, info, resume, overwrite, log)
    finally:
        torch.set_num_threads(threads)
        D.cleanup()


def _train(cfg: TrainConfig, info: D.DistInfo, resume: bool, overwrite: bool, log) -> dict:
    say = log if info.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    mode = "fsdp" if cfg.fsdp else ("ddp" if info.distributed else "none")
    if mode == "fsdp" and not info.distributed:
        say("note: --fsdp without torchrun (one process): training unsharded")
        mode = "none"
    sp = None  # sequence parallelism (subllm/seqpar/): N ranks share each row, the rest split the batch
    if cfg.sequence_parallel > 1:
        from subllm.seqpar import sequence_groups

        sp, mode = sequence_groups(cfg.sequence_parallel), "sequence"
    # who reads which data: every rank of a sequence group reads the same rows
    drank, dsize = (sp.dp_rank, sp.dp_size) if sp else (info.rank, info.world_size)
    resume_from = _check_run_dir(run_dir, resume, overwrite, info.is_main)
    data, mconf, source = _data_and_config(cfg, info, run_dir, say, dsize)
    steps = total_steps(cfg, dsize)
    tps = tokens_per_step(cfg, dsize)

    state, changes = None, []  # changes: trajectory changes made on resume (a new --lr), all resumes
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        check_resumable(loaded, cfg, mconf, steps, info)
        state = loaded
        say(f"resuming from {resume_from} (step {loaded.step}, {loaded.trainer_state['tokens_seen']:,} tok)")

    from subllm.data.packing import BatchSampler
    from subllm.optim import build_optimizer

    model, wrapped, forward = _build_model(cfg, mconf, state, source, info, mode, say, sp)
    source = None  # the copied state dict is no longer needed
    teacher = None
    if cfg.distill_from is not None:  # frozen, eval mode, no optimizer state (trainer/distill.py)
        teacher = load_teacher(cfg.distill_from, mconf, info.device)
        say(f"distilling from {cfg.distill_from} (weight {cfg.distill_weight}, T {cfg.distill_temperature})")
    optimizer, schedule = build_optimizer(
        model, cfg.optimizer, cfg.lr, steps, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay
    )
    sampler = BatchSampler(data.train_dir, cfg.batch_size, cfg.seq_len, cfg.seed, drank, dsize)
    step, tokens_seen, elapsed = 0, 0, 0.0
    if state is not None:
        ts = state.trainer_state
        D.load_optimizer_state(wrapped, optimizer, state.optimizer_state, info, mode)
        schedule.load_state_dict(ts["schedule"])
        sampler.load_state_dict(_for_rank(ts["sampler"], info.rank))
        ckpt.restore_rng(_for_rank(ts["rng"], info.rank))
        step, tokens_seen, elapsed = ts["step"], ts["tokens_seen"], ts.get("elapsed_s", 0.0)
        changes = list(ts.get("trajectory_changes", []))
        lr_change = lr_change_on_resume(ts.get("train_config", {}), cfg)
        if lr_change is not None:  # an explicit new --lr: applied and recorded, not refused
            schedule.rescale(lr_change[1] / lr_change[0])
            changes.append({"step": step, "lr": {"from": lr_change[0], "to": lr_change[1]}})
            say(f"trajectory change at step {step}: lr {lr_change[0]:g} -> {lr_change[1]:g} (in {METRICS})")
    val = []
    if data.val_dir is not None:
        val = load_val_batches(data.val_dir, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    if not val:
        say("note: no validation data (no val split, or it is shorter than one batch): no evaluation")
    tpb = (data.val_meta or {}).get("tokens_per_byte")
    mix = None
    if cfg.retrieval_mix is not None:
        from subllm.data.tokenizer import load_tokenizer

        mix = RetrievalMix(
            data.train_dir, load_tokenizer(data.tokenizer_dir), cfg.retrieval_mix, cfg.seq_len, cfg.seed
        )
    autocast = _autocast_factory(cfg.dtype, info.device)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            run_dir / TRAIN_CONFIG, {**cfg.to_dict(), "total_steps": steps, "world_size": info.world_size}
        )
    metrics = MetricsWriter(run_dir / METRICS, enabled=info.is_main, resume_step=step if state else None)
    record = _run_record(cfg, mconf, info, mode, model, step, resume_from, changes, steps, tps)
    metrics.write(record)
    say(
        f"training {mconf.structure} ({record['params'] / 1e6:.2f} M params, keep {mconf.keep_ratios}) "
        f"for {steps} "
        f"steps x {tps:,} tokens, {cfg.optimizer}, {dtype_line(cfg.dtype, info.device)}, "
        f"{mode} x {info.world_size}{f' (sequence parallel {sp.size})' if sp else ''}, "
        f"schedules {cfg.schedule_steps} (balancer {mconf.balancer_steps}, bypass {mconf.bypass_steps} steps)"
    )

    def save(at_step: int) -> None:
        model_state = D.full_model_state(wrapped, info, mode)
        optim_state = D.full_optimizer_state(wrapped, optimizer, info, mode)
        samplers = D.all_gather_object(sampler.state_dict(), info)
        rngs = D.all_gather_object(ckpt.capture_rng(), info)
        if info.is_main:
            trainer_state = {
                "step": at_step,
                "tokens_seen": tokens_seen,
                "elapsed_s": elapsed,
                "schedule": schedule.state_dict(),
                "sampler": samplers,
                "rng": rngs,
                "world_size": info.world_size,
                "train_config": cfg.to_dict(),
                "total_steps": steps,
                "trajectory_changes": changes,
            }
            ckpt.save_checkpoint(
                run_dir,
                at_step,
                mconf,
                model_state,
                optim_state,
                trainer_state,
                data.tokenizer_dir,
                keep=cfg.keep_checkpoints,
            )
        D.barrier(info)

    def run_eval(at_step: int) -> dict | None:
        if not val:
            return None
        t0 = time.perf_counter()
        res = evaluate(model, val, info, at_step, autocast, tpb)
        res.update(kind="eval", tokens=tokens_seen, elapsed_s=elapsed, eval_s=time.perf_counter() - t0)
        metrics.write(res)
        say(_eval_line(res))
        return res

    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True, smoothing=0.1)
    last_eval = None
    if cfg.init_from is not None and state is None and val:  # the loss right after conversion
        model.set_step(0)
        last_eval = run_eval(0)
    losses: list[float] = []
    window_tokens, window_time = 0, 0.0
    stopped = None  # why the run ended before `steps` (--time-limit)
    try:
        while step < steps:
            t0 = time.perf_counter()
            model.set_step(step)
            schedule.step(step, tokens_seen)
            sums, mixed, out = _micro_batches(
                cfg, info, step, sampler, mix, wrapped, forward, teacher, autocast, drank
            )
            if sp is not None:  # each rank holds its tokens' share: sum over the sequence group
                from subllm.seqpar import sync_grads

                sync_grads(model.parameters(), sp)
            grad_norm = None
            if cfg.optimizer == "adamw":
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tps
            (step_loss,) = D.all_reduce_mean([float(sums["loss"])], info)
            if info.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            elapsed += dt
            window_tokens += tps
            window_time += dt
            if not math.isfinite(step_loss):
                from subllm.optim import DEFAULT_LR

                lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
                raise SubLLMError(
                    f"the loss became {step_loss} at step {step}: resume from the last checkpoint with a "
                    f"lower learning rate (subllm train --out {cfg.out} --resume --lr {lr / 2:g}; recorded "
                    "as a trajectory change) or use --dtype fp32"
                )
            losses.append(step_loss)
            rec = {
                "kind": "train",
                "step": step,
                "tokens": tokens_seen,
                "loss": step_loss,
                "lr": schedule.get_last_lr()[0],
                "step_s": dt,
                "tok_per_s": tps / dt,
                "elapsed_s": elapsed,
            }
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if out.agreement is not None:
                rec["agreement"] = out.agreement.tolist()  # the step's one sync for logging
            if out.select_loss is not None:
                rec["select_loss"] = float(sums["select"])  # this rank's
            if teacher is not None:
                rec["kl"] = float(sums["kl"])  # this rank's
            if mix is not None:
                rec["retrieval_rows"] = mixed  # this rank's
            metrics.write(rec)
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0 or step == steps:
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{window_tokens / window_time:,.0f}")
                    window_tokens, window_time = 0, 0.0
            if cfg.time_limit is not None and step < steps:  # every rank stops at the same step
                (over,) = D.all_reduce_mean([float(elapsed >= cfg.time_limit)], info)
                if over > 0:
                    stopped = f"time limit: {elapsed:.0f} s >= {cfg.time_limit:g} s at step {step} of {steps}"
                    say(f"stopping early, {stopped}")
            last = step == steps or stopped is not None
            if val and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                last_eval = run_eval(step)
            if (cfg.save_every and step % cfg.save_every == 0) or last:
                save(step)
            if stopped:
                break
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    summary = {"steps": step, "tokens": tokens_seen, "train_s": elapsed, "peak_rss_mb": peak_rss_mb()}
    if stopped:
        summary["stopped"] = stopped
    if info.device.startswith("cuda"):
        summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if losses:
        summary["last_loss"] = losses[-1]
    if last_eval:
        summary.update({k: v for k, v in last_eval.items() if k not in ("kind", "step", "tokens")})
    if info.is_main:
        ckpt.save_model_dir(run_dir, mconf, D.full_model_state(wrapped, info, mode), data.tokenizer_dir)
        _write_json(run_dir / "summary.json", summary)
        from subllm.trainer.metrics import read_metrics

        records = read_metrics(run_dir / METRICS)
        plot_run(records, run_dir / LOSS_PNG, title=f"{run_dir.name}: {mconf.structure}")
        plot_selection(records, run_dir / SELECTION_PNG, mconf.keep_ratios, f"{run_dir.name}: selection")
        say(f"done: {step} steps, {tokens_seen:,} tokens in {elapsed:.0f} s; model + tokenizer in {run_dir}")
    elif mode == "fsdp":
        D.full_model_state(wrapped, info, mode)  # the gather is a collective: take part
    return summary


def _data_and_config(cfg: TrainConfig, info, run_dir: Path, say, data_world: int):
    """The packed data, the ModelConfig to train and, with --init-from, the source model."""
    source, tokenizer = None, cfg.tokenizer
    if cfg.init_from is not None:  # uptraining (trainer/uptrain.py): checked before any data work
        source = uptrain.load_source(cfg.init_from)
        uptrain.check_overrides(cfg.set, source.config, cfg.init_from)
        tokenizer = uptrain.source_tokenizer(cfg.init_from)
    D.barrier(info)
    # data: rank 0 tokenizes/packs raw text once, the others wait and then read the result
    if info.is_main:
        data = prepare_data(cfg.data, run_dir, tokenizer, cfg.vocab_size, True, say)
    D.barrier(info)
    if not info.is_main:
        data = prepare_data(cfg.data, run_dir, tokenizer, cfg.vocab_size, False, say)
    steps = total_steps(cfg, data_world)
    if source is None:
        mconf = model_config(cfg, steps, data.tokenizer_meta)
    else:
        mconf = model_config(cfg, steps, None, base=uptrain.base_config(cfg.preset, source.config))
        uptrain.check_model(mconf, source.config, data.tokenizer_meta, cfg.init_from)
        mconf = mconf.replace(extra={**mconf.extra, "init_from": source.record()})
    return data, mconf, source


def _build_model(cfg: TrainConfig, mconf, state, source, info, mode: str, say, sp=None):
    """The model (from the checkpoint, the --init-from source or the seed), wrapped for DDP/FSDP
    from outside (or, with sequence parallelism `sp`, called through subllm/seqpar's sharded
    forward); -> (model, wrapped, the forward the training step calls)."""
    from subllm.model.subllm import SubLLM

    seed_everything(cfg.seed)
    model = SubLLM(mconf)
    if state is not None:
        model.load_state_dict(state.model_state)
    elif source is not None:
        fresh = uptrain.copy_weights(model, source)
        say(f"initialised from {source.path} ({source.kind}); {len(fresh)} fresh S/B tensors")
    if cfg.train_only is not None:  # router tuning: the rest gets no gradient and no optimizer state
        uptrain.freeze(model, cfg.train_only)
    model.to(info.device).train()
    model.activation_checkpointing = cfg.checkpointing  # applied from outside: the trainer decides
    if sp is not None:
        from subllm.seqpar import check_supported, sp_forward

        check_supported(model, sp.size, cfg.seq_len, cfg.sp_attention)

        def forward(x, labels=None, position_ids=None):
            att = cfg.sp_attention
            return sp_forward(model, x, sp, labels=labels, position_ids=position_ids, attention=att)

        return model, model, forward
    wrapped = D.wrap_model(model, info, mode)
    forward = wrapped  # what the training step calls; state dicts and no_sync stay on `wrapped`
    if cfg.compile:
        if mode == "fsdp":
            raise SubLLMError("--compile with --fsdp is not supported; use DDP (plain torchrun) or drop one")
        from subllm.trainer.compiled import compile_for_training

        forward = compile_for_training(wrapped, mconf, info.device)
    return model, wrapped, forward


def _run_record(cfg: TrainConfig, mconf, info, mode: str, model, step: int, resume_from, changes, steps, tps):
    """The metrics log's first record of a run (or of a resume): what is trained, how and where."""
    n_params = model.num_params() if mode != "fsdp" else sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "kind": "run",
        "step": step,
        "resumed_from": str(resume_from) if resume_from else None,
        "trajectory_changes": changes,
        "config": cfg.to_dict(),
        "model": mconf.to_dict(),
        "total_steps": steps,
        "tokens_per_step": tps,
        "world_size": info.world_size,
        "parallel": mode,
        "sequence_parallel": cfg.sequence_parallel,
        "sp_attention": cfg.sp_attention if cfg.sequence_parallel > 1 else None,
        "device": info.device,
        "threads": torch.get_num_threads(),
        "params": n_params,
        "trainable_params": n_trainable,
        "init_from": mconf.extra.get("init_from"),
        "train_only": cfg.train_only,
        "schedule_steps": {
            "mode": cfg.schedule_steps,
            "balancer_steps": mconf.balancer_steps,
            "bypass_steps": mconf.bypass_steps,
        },
        "torch": torch.__version__,
        **dtype_record(cfg.dtype, info.device),  # dtype (resolved), cpu_capability, ...
    }


def _micro_batches(
    cfg: TrainConfig, info, step: int, sampler, mix, wrapped, forward, teacher, autocast, data_rank: int
):
    """The `grad_accum` micro-batches of one optimizer step, forward and backward (`data_rank`:
    which share of the batch this rank reads; the same on a sequence group); -> this rank's
    sums over them ("loss": the LM loss, comparable with LLaMA's; "select": the auxiliary selection
    loss; "kl": the distillation KL), the rows replaced by retrieval examples, the last output."""
    sums = {k: torch.zeros((), device=info.device) for k in ("loss", "select", "kl")}
    mixed = 0
    for micro in range(cfg.grad_accum):
        x = next(sampler)
        if mix is not None:  # its own generator: the global RNG and the sampler are untouched
            x, rows = mix.apply(x, data_rank, step, micro)
            mixed += len(rows)
        x = x.to(info.device, non_blocking=True)
        kw = {}
        if cfg.pose_target is not None:  # its own generator: the global RNG stream is untouched
            g = pose_generator(cfg.seed, data_rank, step, micro)
            kw["position_ids"] = pose_position_ids(*x.shape, cfg.pose_target, g).to(x.device)
        with D.no_sync(wrapped, micro == cfg.grad_accum - 1):
            with autocast():
                if teacher is None:
                    out = forward(x, labels=x, **kw)
                    loss, lm = out.loss, out.lm_loss
                else:  # trainer/distill.py: LM + KL to the frozen teacher, logits in chunks
                    loss, lm, kl, out = distill_step(forward, D.unwrap(wrapped), teacher, x, cfg, kw)
                    sums["kl"] += kl.detach().float() / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
        sums["loss"] += lm.detach().float() / cfg.grad_accum
        if out.select_loss is not None:
            sums["select"] += out.select_loss.detach().float() / cfg.grad_accum
    return sums, mixed, out


def _for_rank(states: list, rank: int):
    """This rank's saved state, or rank 0's when the checkpoint came from fewer ranks."""
    return states[rank] if rank < len(states) else states[0]


def _eval_line(r: dict) -> str:
    s = f"eval @ step {r['step']}: val loss {r['val_loss']:.4f}"
    if "val_bpb" in r:
        s += f", {r['val_bpb']:.3f} bits/byte"
    if "val_loss_train_mode" in r:
        s += f", train-mode loss {r['val_loss_train_mode']:.4f} (leak gap {r['leak_gap']:+.4f})"
        s += ", keep " + "/".join(f"{f:.2f}" for f in r["keep_fractions_eval"])
        s += ", agreement " + "/".join(f"{a:.3f}" for a in r["agreement"])
    return s


def _write_json(path: Path, obj) -> None:
    import json
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)
