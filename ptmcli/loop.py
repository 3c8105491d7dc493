"""The one training loop behind every command.

A command builds a `Job` (model, objective, examples) and calls `train`. The loop knows nothing of
model families or tasks: it draws micro-batches by number, normalises the loss by the number of
targets in the whole step, steps AdamW under autocast/GradScaler, and logs, validates and saves on
schedule. Everything it needs to continue exactly is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ptmcli import checkpoint, parallel
from ptmcli.data.batches import BatchOrder, Examples, eval_batches, train_batches
from ptmcli.distributed import Dist
from ptmcli.errors import Interrupted, PtmError
from ptmcli.hardware import Hardware, peak_flops
from ptmcli.malloc import release_freed_memory
from ptmcli.optim import build_optimizer, build_schedule, lr_caution
from ptmcli.runlog import RunLog, truncate_metrics
from ptmcli.schema import HardwareConfig, OptimizerConfig, TrainerConfig


@dataclass
class Job:
    """What a command hands the loop. `objective(model, batch)` returns ({term: loss sum}, {stat: sum});
    `objective.metrics(sums, counts, stats)` turns validation totals into metrics."""

    model: nn.Module
    objective: Any
    train: Examples
    val: Examples
    model_spec: dict  # the architecture identity stored in checkpoints and checked on resume
    lr_scale: Callable[[str], float] | None = None  # per-parameter lr multiplier (layer-wise decay)
    # A parameter-efficient method (ptmcli.peft.Method): adds `regularizer()` to the loss, runs `after_update(step)`
    # after each optimizer step, and keeps `state()` in checkpoints. None for plain training.
    method: Any = None
    saved_keys: set[str] | None = None  # checkpoint only these state-dict keys (None = the whole model)


@dataclass
class Best:
    """Tracks `trainer.metric` over validations: which step is best, and whether patience has run out."""

    key: str
    mode: str
    patience: int
    value: float | None = None
    step: int | None = None
    stale: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        if self.key not in metrics:
            raise unknown_metric(self.key, list(metrics))
        value = metrics[self.key]
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience


def unknown_metric(key: str, names: list[str]) -> PtmError:
    return PtmError(
        f"trainer.metric=val/{key} is not a validation metric here; choose one of "
        f"{', '.join('val/' + k for k in names)}."
    )


def check_metric(objective: Any, metric: str) -> None:
    """Refuse a trainer.metric that `objective` never reports before the run starts, not at its first validation
    (which may come hours in). The names are those its metrics give for totals of one of everything; an objective
    that cannot say without a real validation is checked there, by Best."""
    terms, stats = objective.terms, objective.stats
    try:
        names = list(objective.metrics(dict.fromkeys(terms, 1.0), dict.fromkeys(terms, 1.0), dict.fromkeys(stats, 1.0)))
    except Exception:  # noqa: BLE001 -- only a pre-check: the first validation checks the key again
        return
    if metric.removeprefix("val/") not in names:
        raise unknown_metric(metric.removeprefix("val/"), names)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def refuse_zero_gradients(norm: float, compiled: bool) -> None:
    """A first step whose gradients are all exactly zero means nothing would ever learn: stop, saying why."""
    if norm != 0.0:
        return
    why = (
        ". torch.compile has done this before: traced under CUDA bf16 autocast (torch 2.11), ptm's vocabulary "
        "loss gave zero gradients with the right loss value (docs/distributed.md); ptm keeps that loss out of the "
        "graph since, so some other part of the model may be hitting the same. Run with hardware.compile=false, "
        "and tell us the torch version and model."
        if compiled
        else ": no weight it trains reaches the loss. Check which weights the transfer method leaves trainable "
        "(transfer=...) and that the objective's targets are not all ignored."
    )
    raise PtmError(f"Every gradient of the first training step is zero, so the run would not learn{why}")


@torch.no_grad()
def evaluate(
    objective: Any, model: nn.Module, examples: Examples, batch_size: int, max_batches: int, hw: Hardware, dist: Dist
) -> dict[str, float]:
    """Metrics of `objective` over `examples` (at most `max_batches` batches per process; 0 = all)."""
    model = checkpoint.unwrap(model)
    was_training = model.training
    model.eval()
    terms, stat_names = objective.terms, objective.stats
    totals = torch.zeros(2 * len(terms) + len(stat_names), dtype=torch.float64)  # sums, counts, stats
    # under FSDP each process holds full weights for the pass: ranks may run different numbers of forwards
    with parallel.gathered(model):
        for batch in eval_batches(examples, batch_size, dist.world_size, dist.rank, max_batches):
            batch = to_device(batch, hw.device)
            with hw.autocast():
                sums, stats = objective(model, batch)
            totals += torch.tensor(
                [
                    *(float(sums[t]) for t in terms),
                    *(batch["counts"][t] for t in terms),
                    *(float(stats[s]) for s in stat_names),
                ],
                dtype=torch.float64,
            )
    totals = dist.sum(totals).tolist()
    model.train(was_training)
    n = len(terms)
    return objective.metrics(
        dict(zip(terms, totals[:n])), dict(zip(terms, totals[n : 2 * n])), dict(zip(stat_names, totals[2 * n :]))
    )


def fresh_window(terms: tuple[str, ...]) -> dict:
    """Running totals between two train log lines (a term's mean is over the steps that had its targets)."""
    return {
        "loss": 0.0,
        "terms": dict.fromkeys(terms, 0.0),
        "term_steps": dict.fromkeys(terms, 0),
        "steps": 0,
        "tokens": 0,
    }


@contextlib.contextmanager
def stop_requests():
    """While training, SIGINT and SIGTERM only ask the loop to stop at the next step boundary (their numbers land
    in the yielded list); a second one stops at once. Outside the main thread signals cannot be caught: no-op."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def ask(signum, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def peak_memory_mb(hw: Hardware) -> float:
    """The most memory this process has held: CUDA's max allocated, else the process's peak resident set."""
    if hw.device.type == "cuda":
        return torch.cuda.max_memory_allocated(hw.device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def draw_curves(run_dir: Path, metric: str, log: RunLog) -> None:
    """curves.png of the run so far; a note instead when matplotlib is missing (pictures are optional). Nothing
    before the first row is logged: a run that fails at its first step has no curves, and its own error to show."""
    from ptmcli import plots

    if not (run_dir / "metrics.jsonl").exists():
        return
    if not plots.available():
        log.note(f"[dim]no curves.png: {plots.INSTALL}[/]")
        return
    plots.write_curves(run_dir, metric)


def train(
    job: Job,
    cfg: TrainerConfig,
    optim_cfg: OptimizerConfig,
    hw: Hardware,
    dist: Dist,
    run_dir: Path,
    resume_from: Path | None,
    scale: HardwareConfig | None = None,
) -> dict[str, float]:
    """Train until `cfg.max_steps`; returns the final validation metrics. `scale`: how the model is spread and
    traded for memory (hardware.strategy, compile, activation_checkpointing)."""
    scale = scale or HardwareConfig()
    model = job.model.to(hw.device)
    model.train()
    model = parallel.wrap(model, hw, dist, scale.strategy, scale.compile, scale.activation_checkpointing)
    optimizer = build_optimizer(checkpoint.unwrap(model), optim_cfg, hw.device, job.lr_scale)
    scheduler = build_schedule(optimizer, optim_cfg, cfg.max_steps)
    scaler = torch.amp.GradScaler(hw.device.type, enabled=hw.uses_scaler)
    terms = job.objective.terms
    weights = [getattr(job.objective, "term_weights", {}).get(t, 1.0) for t in terms]
    ckpt_root = run_dir / "checkpoints"

    step, consumed = 0, 0
    window = fresh_window(terms)
    best = Best(cfg.metric.removeprefix("val/"), cfg.metric_mode, cfg.patience)
    reseeded = 0  # the number of processes that wrote the checkpoint, when it differs from this run's
    if resume_from is not None:
        state, extra = checkpoint.load(
            resume_from,
            model,
            optimizer,
            scheduler,
            scaler,
            dist,
            job.model_spec,
            job.saved_keys,
            global_batch=cfg.batch_size * dist.world_size,
        )
        if job.method is not None:
            job.method.load_state(extra)
        step, consumed, window = state["step"], state["consumed"], state["window"]
        best = Best(**state["best"])
        if state["reseed"]:  # another number of processes: each gets a fresh dropout stream, still seeded
            torch.manual_seed(cfg.seed * 1000 + dist.rank + 1 + 7919 * step)
            reseeded = state["world_size"]
    else:
        torch.manual_seed(cfg.seed * 1000 + dist.rank + 1)  # dropout stream, distinct per process
    if dist.is_main:  # rows a killed process logged after its last checkpoint (all of them, on a fresh start)
        truncate_metrics(run_dir / "metrics.jsonl", step)

    sinks = None
    if dist.is_main and set(cfg.loggers) - {"jsonl"}:
        from ptmcli.loggers import Sinks

        sinks = Sinks(cfg.loggers, run_dir, step, cfg.tracking_uri, cfg.experiment)
    log = RunLog(run_dir / "metrics.jsonl" if dist.is_main else None, cfg.max_steps, step, sinks)
    ended = [False]  # whether the loop got to its end (then rows after the last checkpoint are final)
    if reseeded:
        log.note(
            f"[yellow]note[/] resumed on {dist.world_size} process(es) from a checkpoint of {reseeded}: the same "
            f"sequences per step, but dropout draws new masks (each process's random state was {reseeded}-way)"
        )
    if caution := lr_caution(optim_cfg):
        log.note(f"[yellow]note[/] {caution}")
    # examples of several tasks bring their own order (a mixture of the tasks' orders)
    order = getattr(job.train, "order", lambda *args: BatchOrder(len(job.train), *args))
    batches = train_batches(job.train, order(cfg.batch_size, dist.world_size, dist.rank, cfg.seed), consumed)
    metrics: dict[str, float] = {}
    # Each step's term losses stay on the device until the next log line or checkpoint reads them: one host sync
    # there instead of one per micro-batch. They are added to the window one step at a time, in order, so the
    # logged means do not depend on when they were read (a resumed run logs exactly what an uninterrupted one does).
    step_losses: list[torch.Tensor] = []
    stat_dtype = torch.float32 if hw.device.type == "mps" else torch.float64

    def read_step_losses() -> None:
        for values in torch.stack(step_losses).tolist() if step_losses else []:
            window["loss"] += sum(w * v for w, v in zip(weights, values))
            for t, value in zip(terms, values):
                window["terms"][t] += value
        step_losses.clear()

    def save() -> None:
        read_step_losses()
        log.saving(step, checkpoint.megabytes(model, optimizer))
        state = {
            "consumed": consumed,
            "window": window,
            "model": job.model_spec,
            "best": vars(best),
            "max_steps": cfg.max_steps,
            "global_batch": cfg.batch_size * dist.world_size,
        }
        checkpoint.save(
            ckpt_root,
            step,
            model,
            optimizer,
            scheduler,
            scaler,
            state,
            dist,
            cfg.keep_last,
            best.step,
            job.saved_keys,
            job.method.state() if job.method is not None else None,
        )
        log.saving(None)
        if sinks is not None:
            sinks.committed(step)

    # figures of each train row: 6 FLOPs per parameter per token (forward 2, backward 4) over the device's peak
    params = sum(p.numel() for p in checkpoint.unwrap(model).parameters())
    peak = peak_flops(hw) if dist.is_main else None
    sequences_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    window_start = time.perf_counter()
    with stop_requests() as signals, contextlib.ExitStack() as closing:
        closing.callback(log.close)
        if sinks is not None:
            closing.callback(lambda: sinks.close(finished=ended[0]))
        if dist.is_main and cfg.curves:  # before the trackers close, so that MLflow keeps the picture as an artifact
            closing.callback(lambda: draw_curves(run_dir, cfg.metric, log))
        closing.callback(release_freed_memory)  # the last registered runs first: before the curves, however steps end
        step_times: list[float] = []  # the first two steps' seconds, under torch.compile: the first one compiles
        first_step = True
        while step < cfg.max_steps:
            step_started = time.perf_counter()
            micro = [to_device(next(batches), hw.device) for _ in range(cfg.grad_accum)]
            # Targets in the whole step, over all micro-batches and processes: the loss is a mean over these.
            counts = dist.sum(
                torch.tensor(
                    [sum(b["counts"][t] for b in micro) for t in terms] + [sum(b["num_tokens"] for b in micro)],
                    dtype=torch.float64,
                )
            )
            # a term may have no targets in a step (span corruption's whole-block share): it adds 0, not 0/0
            term_counts = counts[: len(terms)].clamp(min=1)
            per_term = term_counts.tolist()
            step_sums = torch.zeros(len(terms), dtype=stat_dtype, device=hw.device)
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                with parallel.gradient_sync(model, last):
                    with hw.autocast():
                        sums, _ = job.objective(model, batch)
                    # DDP averages gradients over processes; multiplying by world size turns that into a sum.
                    loss = sum(weights[k] * sums[t] / per_term[k] for k, t in enumerate(terms)) * dist.world_size
                    if last and job.method is not None and (penalty := job.method.regularizer()) is not None:
                        loss = loss + penalty  # the same on every process, so DDP's average keeps it as is
                    scaler.scale(loss).backward()
                step_sums += torch.stack([sums[t].detach() for t in terms]).to(stat_dtype)
                # The backward pass freed the graph's buffers, not its nodes: thousands of small blocks that `loss`
                # would keep to the next forward pass, walling in the memory the step freed, where the next step's
                # tensors of the same sizes then no longer fit (glibc before 2.38 wants a little more than the size
                # for torch's 64-byte-aligned blocks): T5's bench peak was ~95 MB higher (docs/results.md, stop 51).
                del sums, loss
            if cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if first_step:  # one host sync, once: a run whose gradients are all zero stops before it writes
                if cfg.max_grad_norm is None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                refuse_zero_gradients(float(norm), scale.compile)
                first_step = False
            scaler.step(optimizer)
            scaler.update()
            if job.method is not None:
                window.setdefault("extras", {}).update(job.method.after_update(step + 1) or {})
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            consumed += cfg.grad_accum
            if scale.compile and len(step_times) < 2:
                step_times.append(time.perf_counter() - step_started)
                if len(step_times) == 2:
                    window["compile_s"] = max(step_times[0] - step_times[1], 0.0)
                    log.note(
                        f"torch.compile: first step {step_times[0]:.1f} s, second {step_times[1]:.2f} s "
                        f"(about {window['compile_s']:.0f} s compiling)"
                    )

            step_losses.append(dist.sum(step_sums) / term_counts.to(hw.device, stat_dtype))
            for t, present in zip(terms, (counts[: len(terms)] > 0).tolist()):
                window["term_steps"][t] += present
            window["steps"] += 1
            window["tokens"] += int(counts[-1])
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                read_step_losses()
                elapsed = time.perf_counter() - window_start
                n = window["steps"]
                log.train(
                    {
                        "step": step,
                        "split": "train",
                        "loss": window["loss"] / n,
                        **{f"{t}_loss": v / max(window["term_steps"][t], 1) for t, v in window["terms"].items()},
                        "lr": lr,
                        "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                        "samples_per_s": n * sequences_per_step / max(elapsed, 1e-9),
                        "mfu": 6 * params * window["tokens"] / max(elapsed, 1e-9) / (peak * dist.world_size)
                        if peak
                        else None,
                        "peak_memory_mb": peak_memory_mb(hw),
                        "epoch": consumed * cfg.batch_size * dist.world_size / len(job.train),
                        **window.get("extras", {}),
                        **({"compile_s": window["compile_s"]} if "compile_s" in window else {}),
                    }
                )
                window = fresh_window(terms)
                window_start = time.perf_counter()
            else:
                log.advance(step)
            final, improved = step == cfg.max_steps, False
            if final or (cfg.eval_every and step % cfg.eval_every == 0):
                metrics = evaluate(job.objective, model, job.val, cfg.batch_size, cfg.eval_batches, hw, dist)
                log.val({"step": step, "split": "val", **metrics})
                improved = best.update(metrics, step)
            stop = best.exhausted
            saved = final or stop or improved or bool(cfg.save_every and step % cfg.save_every == 0)
            if saved:
                save()
            if stop:
                log.note(
                    f"early stop at step {step}: no better {cfg.metric} for {cfg.patience} validations "
                    f"(best {best.value:.4f} at step {best.step})"
                )
                break
            if not final and dist.any(bool(signals)):
                if cfg.save_on_interrupt and not saved:
                    save()
                written = checkpoint.latest(ckpt_root)
                if written is None:
                    saved_note = "no checkpoint was written (trainer.save_on_interrupt=false); nothing to resume"
                elif written.name == f"step-{step}":
                    saved_note = f"checkpoint {written.name} written"
                else:
                    saved_note = f"the newest checkpoint is {written.name} (trainer.save_on_interrupt=false)"
                resume_note = f". Continue with the same command and resume={run_dir}" if written else ""
                raise Interrupted(
                    f"stopped at step {step} of {cfg.max_steps}; {saved_note}{resume_note}.",
                    signals[0] if signals else signal.SIGTERM,
                )
        ended[0] = True
    return metrics
