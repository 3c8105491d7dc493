"""Where one of `make bench`'s ptm steps spends its time: `torch.profiler` over two training steps of a family's bench
model (the same overrides, batches and optimizer), after a few unprofiled ones.
Run: python tests/bench/profile_step.py FAMILY [--kept | --rss | --heap] [--hf]
(FAMILY: bert roberta gpt t5 bart electra xlnet)
Prints tokens/s over 6 steps and the process's peak RSS, the page faults of the two profiled steps, then the ops by
their own CPU time, each matrix-product shape's GFLOP/s, the step's product FLOPs against this CPU's matmul rate (fp32,
or bf16 with PTM_BENCH_PRECISION=bf16: the fastest a step doing them could be) and at the rates they ran, and the other
ops by input shape; with --kept instead, the tensors one forward pass keeps for the backward pass (distinct storages,
parameters left out) summed by the line of ptm that made autograd keep them; with --rss, the process's resident memory
after each stage (torch and ptm imported, data, model and optimizer, then 8 steps); with --heap, what C's allocator
(glibc malloc, where torch's CPU tensors live) holds over 8 steps, sampled every 2 ms: the most bytes in live blocks at
once against the most it held from the system, whose difference is memory freed inside the heap but not reusable for the
next request (fragmentation), and the peak RSS beside them, then the memory free in the heap after the last step and in
how many pieces. glibc's malloc is set up as `ptm` sets it (ptmcli/malloc.py);
`GLIBC_TUNABLES=glibc.malloc.tcache_count=7` keeps glibc's default tcache instead. With --hf, the same for a step of the
bench's Hugging Face side instead (ptm's model exported into the family's Hugging Face class, as `bench.run_hf` loads
it, torch's AdamW, the same batches; not with --kept)."""

from __future__ import annotations

import collections
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's own overrides)

from ptmcli import hardware  # noqa: E402
from ptmcli.compose import checked, parse  # noqa: E402
from ptmcli.data.batches import BatchOrder, train_batches  # noqa: E402
from ptmcli.distributed import Dist  # noqa: E402
from ptmcli.malloc import heap_info, restart_tuned  # noqa: E402
from ptmcli.models import PRETRAINING_MODELS  # noqa: E402
from ptmcli.objectives import OBJECTIVES  # noqa: E402
from ptmcli.optim import build_optimizer  # noqa: E402
from ptmcli.pretrain import build_examples  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"  # and its "_backward"


def product_flops(name: str, shapes: list) -> int | None:
    """FLOPs of one mm / addmm / addmm_ / bmm call from its recorded input shapes."""
    if name == "aten::bmm":
        (b, n, k), (_, _, m) = shapes[0], shapes[1]
        return 2 * b * n * k * m
    a, w = (shapes[1], shapes[2]) if name.startswith("aten::addmm") else (shapes[0], shapes[1])
    return 2 * a[0] * a[1] * w[1] if len(a) == 2 and len(w) == 2 else None


def flash_flops(name: str, shapes: list) -> int | None:
    """FLOPs of one fused attention call (CPU flash SDPA): q·k and weights·v forward, (batch, heads, queries, keys,
    head size) from its q and k; its backward recomputes q·k and makes four products (weights, v, q and k)."""
    if name == FLASH:
        (b, h, tq, d), tk = shapes[0], shapes[1][2]
        return 4 * b * h * tq * tk * d
    if name == FLASH + "_backward":
        (b, h, tq, d), tk = shapes[1], shapes[2][2]
        return 10 * b * h * tq * tk * d
    return None


def kept_for_backward(forward, parameters) -> None:
    """Run `forward()` and print the MB autograd keeps for the backward pass, by the ptm line that kept it."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    by_line: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            skip.add(storage.data_ptr())
            ours = [f for f in traceback.extract_stack() if "ptmcli" in f.filename]
            where = f"{ours[-1].filename.split('ptmcli/')[-1]}:{ours[-1].lineno} {ours[-1].line}" if ours else "?"
            by_line[where] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    print(f"kept for the backward pass: {sum(by_line.values()) / 2**20:,.0f} MB")
    for where, size in by_line.most_common(15):
        print(f"{size / 2**20:8.1f} MB  {where}")


def current_rss_mb() -> float:
    """The process's resident memory now (Linux's /proc; getrusage gives only the peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def resident_mb(stage: str) -> None:
    current = current_rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{stage:24} resident {current:6,.0f} MB, peak {peak:6,.0f} MB", flush=True)


def fault_in_heap(megabytes: int = 768) -> None:
    """Touch `megabytes` more of glibc's heap and free it, to be kept (`keep_freed_memory`) for what the profiled steps
    place there. The profiler's records, allocated op by op and kept to the end, land in the memory a step's tensors
    were freed from, and the next step's tensors then go to heap never touched, whose pages fault in as they are
    written. Before this (stop 54, `profile_step.py t5`): two profiled T5 steps took 1.95 s of ops against 0.58 s a
    step unprofiled, and a 3712 x 256 x 1024 product ran at 103 GFLOP/s; with it, 1.18 s, 13 thousand page faults in
    the two steps, and that product at 313 GFLOP/s (the 2048-wide rate: 366)."""
    block = 64 << 20  # floats: 256 MB a block, below keep_freed_memory's 512 MB threshold for memory-mapped blocks
    blocks = [torch.ones(block) for _ in range(max(1, megabytes // 256))]
    del blocks


def heap_over(steps) -> None:
    """Run `steps()` while a thread samples glibc's heap; print the peaks (see the module's docstring)."""
    peaks = {"live": 0, "held": 0}
    running = True

    def sample() -> None:
        while running:
            info = heap_info()
            live, held = info.in_use, info.held
            peaks["live"], peaks["held"] = max(peaks["live"], live), max(peaks["held"], held)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    steps()
    running = False
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    live, held = peaks["live"] / 2**20, peaks["held"] / 2**20
    print(f"malloc: at most {live:,.0f} MB live, {held:,.0f} MB held ({held - live:,.0f} MB more than was ever "
          f"in use at once); peak RSS {peak:,.0f} MB")  # fmt: skip
    info = heap_info()  # between steps: what the activations were freed from, in how many pieces
    print(f"after the last step: {info.fordblks / 2**20:,.0f} MB free in the heap, in {info.ordblks:,} pieces")


def hf_step(name: str, cfg, model, tokenizer, batches, autocast):
    """A training step of the bench's Hugging Face side on the next of `batches`, returning its real tokens; its
    forward pass under `autocast` (the Trainer's `bf16=True`: bf16 autocast around the forward pass)."""
    from ptmcli.export import write_pretraining

    exported = Path(tempfile.mkdtemp(prefix=f"hf-{name}-profile-"))
    write_pretraining(model, cfg.model, cfg.objective.name, tokenizer, exported)
    hf = bench.hf_model(name, exported, cfg.objective.rtd_weight).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)

    def step() -> int:
        batch = next(batches)
        with autocast():
            loss = hf(**bench.INPUTS[name](batch))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch["num_tokens"]

    return step


def main() -> None:
    restart_tuned()  # as the `ptm` command starts
    resident_mb("torch and ptm imported")
    name = next((a for a in sys.argv[1:] if not a.startswith("--")), "bert")
    _, cfg = checked(parse("pretrain", bench.overrides(name, False)))
    # as `ptm pretrain` sets up a CPU run before its data: subnormals flushed, freed memory kept, the bench's precision
    hw = hardware.resolve(cfg.hardware, Dist())
    tokenizer, train, _, _ = build_examples(cfg, Dist())
    resident_mb("data")
    torch.manual_seed(cfg.trainer.seed)
    model = PRETRAINING_MODELS[cfg.model.family](cfg.model, tokenizer.get_vocab_size(), cfg.objective).train()
    objective = OBJECTIVES[cfg.objective.name](cfg.objective)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"), None)
    batches = train_batches(train, BatchOrder(len(train), cfg.trainer.batch_size, 1, 0, cfg.trainer.seed), 0)

    def step() -> int:
        batch = next(batches)
        with hw.autocast():
            sums, _ = objective(model, batch)
        (sum(sums.values()) / max(1, sum(batch["counts"].values()))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch["num_tokens"]

    if "--hf" in sys.argv:
        if "--kept" in sys.argv:
            raise SystemExit("--kept attributes what is kept to ptm's lines: not with --hf")
        step = hf_step(name, cfg, model, tokenizer, batches, hw.autocast)
        del model, optimizer
    if "--rss" in sys.argv:
        resident_mb("model and optimizer")
        for i in range(8):
            step()
            resident_mb(f"after step {i + 1}")
        return
    if "--heap" in sys.argv:
        heap_over(lambda: [step() for _ in range(8)])
        return
    if "--kept" in sys.argv:
        with hw.autocast():
            kept_for_backward(lambda: objective(model, next(batches)), list(model.parameters()))
        return
    for _ in range(2):
        step()
    start = time.perf_counter()
    tokens = sum(step() for _ in range(6))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    side = "Hugging Face" if "--hf" in sys.argv else "ptm"
    measured = tokens / (time.perf_counter() - start)
    print(f"{name} ({side}): {measured:,.0f} tokens/s over 6 steps, peak RSS {peak:,.0f} MB")
    fault_in_heap()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(f"page faults in the two profiled steps: {faults:,} (outputs written to memory first touched run slow)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in PRODUCTS and event.self_cpu_time_total:
            flops = product_flops(event.key, event.input_shapes)
            seconds = event.self_cpu_time_total / 1e6
            if flops:
                rows.append((seconds, event.key, event.input_shapes, event.count, flops * event.count / seconds / 1e9))
    for seconds, key, shapes, count, rate in sorted(rows, key=lambda r: r[0], reverse=True)[:20]:
        print(f"{seconds:6.3f} s  {key:11} {shapes} x{count}  {rate:.0f} GFLOP/s")
    fastest_step(prof, tokens / 6, measured)


def fastest_step(prof, tokens_per_step: float, measured: float) -> None:
    """The step's matrix products (fused attention's included) in FLOPs, against this CPU's matmul rate at the bench's
    precision measured now: how fast a step doing the same products could be if they all ran at that rate and nothing
    else took time."""
    flops, seconds = 0, 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        count = product_flops(event.key, event.input_shapes) if event.key in PRODUCTS else None
        count = count or flash_flops(event.key, event.input_shapes)
        flops += (count or 0) * event.count
        seconds += event.self_cpu_time_total / 1e6 if count else 0.0
    flops, seconds = flops / 2, seconds / 2  # two steps profiled
    ceiling = bench.cpu_peak_gflops() * 1e9
    best = tokens_per_step * ceiling / flops
    print(f"\nmatrix products: {flops / 1e9:,.1f} GFLOP a step of {tokens_per_step:,.0f} tokens; all at this CPU's "
          f"{bench.PRECISION} matmul rate ({ceiling / 1e9:,.0f} GFLOP/s, measured now), with nothing else taking time: "
          f"{best:,.0f} tokens/s; measured {measured:,.0f} ({measured / best:.0%} of that)")  # fmt: skip
    print(f"as profiled they took {seconds:.3f} s a step ({flops / seconds / 1e9:,.0f} GFLOP/s on average): at their "
          f"own rates, with nothing else taking time, {tokens_per_step / seconds:,.0f} tokens/s")  # fmt: skip
    print("\nthe other ops by input shape:")
    others = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    others = [e for e in others if e.key not in PRODUCTS]
    for event in sorted(others, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]:
        print(f"{event.self_cpu_time_total / 1e6:6.3f} s  {event.key:24} {event.input_shapes} x{event.count}")


if __name__ == "__main__":
    main()
