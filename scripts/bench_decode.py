"""Inference cost of a bounded cache against the full cache, in one run.

    OMP_NUM_THREADS=1 python scripts/bench_decode.py                  # CPU: SmolLM2-135M, prompts 1k/2k/8k, K=512
    python scripts/bench_decode.py --device cuda                      # GPU: Mistral-7B shape, random bf16, 2k/8k/32k, batch 1 and 8

For every (prompt length, batch, cache) one fresh subprocess loads the model, warms up (a short
prompt and a few decoding steps, so numba/Triton compile outside the timings), then measures:

Timings on the CPU are the process's CPU time (`time.process_time`, one intra-op thread): on a
shared machine the wall time mostly measures waiting for a core. On CUDA, wall time.

* prefill: `model.generate(prompt, max_new_tokens=1)`, i.e. what a user's generate() does: the
  full model gets one forward (DynamicCache); a budgeted model's generate() feeds the prompt
  `prefill_chunk` tokens per forward into a BoundedCache. Median of `--reps` runs.
* peak memory of the first prefill: on CUDA `torch.cuda.max_memory_allocated`; on the CPU the
  process's peak resident set (VmHWM from /proc/self/status, reset to the current RSS through
  /proc/self/clear_refs just before the prefill), as a total and as the increase over the RSS
  before the prefill (weights, warm-up allocations and the allocator's retained pages are in
  the baseline). tracemalloc would not see torch's allocations.
* decode: greedy steps `model(next_token, past_key_values=cache)` after the prefill;
  tokens/s = batch x steps / time, median over `--reps` runs of `--decode-tokens` steps.
* cache bytes after the prefill: keys + values (+ the bounded cache's slot bookkeeping).

Caches: full, tova-K, window-K, and tova-K decoding by concatenation instead of in the K + 1
slot buffer (`tova-K concat`, `make_cache(decode_buffer=False)`). `--chunks 64,128,...` instead
measures TOVA-K prefill time against the chunk size (the default `prefill_chunk` was chosen so).
Prompts are random token ids (the cost does not depend on the text). Ratios are against the
full cache of the same length and batch, measured in this run. Writes results/bench_decode.json
and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _bench import MISTRAL_7B, timed

ROOT = Path(__file__).resolve().parents[1]
DECODE_SHAPE = dict(MISTRAL_7B, max_position_embeddings=65536, rope_theta=1e6, sliding_window=None)


def load(device: str):
    if device == "cpu":
        from msrnn_train.models import load_model

        model, _ = load_model("smollm2", dtype="float32", device="cpu")
        return model.eval()
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(MistralConfig(**DECODE_SHAPE), attn_implementation="sdpa",
                                                 dtype=torch.bfloat16)
    return model.eval()


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak bytes inside the block: CUDA allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, device):
        self.cuda = device != "cpu"

    def __enter__(self):
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_kb("VmHWM") * 1024


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def clock(device):
    """Seconds of this process's CPU time on the CPU (the machine is shared: waiting for a core is
    not the benchmark's cost; one intra-op thread, so CPU time is the work's time), wall time
    (after a synchronize) on CUDA."""
    return time.process_time if device == "cpu" else time.perf_counter


@torch.no_grad()
def run_one(device: str, cache_kind: str, length: int, batch: int, budget: int, chunk: int, reps: int,
            decode_tokens: int) -> dict:
    """One configuration, in this (fresh) process."""
    from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache

    torch.manual_seed(0)
    model = load(device)
    policy = cache_kind.split("-")[0]
    if policy != "full":
        apply_budget(model, BudgetSpec(policy=policy, budget=budget, prefill_chunk=chunk))
    concat = cache_kind.endswith("concat")
    vocab = model.config.vocab_size
    gen = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)

    def prefill(ids):
        cache = None if policy == "full" else make_cache(model, decode_buffer=not concat)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), **gen)
        return out.sequences[:, -1:], out.past_key_values

    def decode(nxt, cache, steps):
        for _ in range(steps):
            nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        return nxt

    # warm-up: compile the scans, fill the allocator's pools with small blocks
    warm = torch.randint(3, vocab, (batch, min(length, 2 * chunk + 8)), device=device)
    nxt, cache = prefill(warm)
    decode(nxt, cache, 3)
    del cache

    ids = torch.randint(3, vocab, (batch, length), device=device)
    prefill_s, decode_tps = [], []
    now = clock(device)
    for rep in range(reps):
        with PeakMemory(device) as mem:  # every prefill is measured; the first one's peak is reported
            (nxt, cache), seconds = timed(lambda: prefill(ids), device, 1, clock=now)
            prefill_s += seconds
        if rep == 0:
            peak, base = mem.peak, mem.base
            nbytes = cache_bytes(cache)
            held = max(cache.state_sizes()) if hasattr(cache, "state_sizes") else cache.get_seq_length()
        nxt = decode(nxt, cache, 2)  # decoding warm-up at this length
        _, (seconds,) = timed(lambda: decode(nxt, cache, decode_tokens), device, 1, clock=now)
        decode_tps.append(batch * decode_tokens / seconds)
        del cache
    return dict(cache=cache_kind, length=length, batch=batch, budget=None if policy == "full" else budget,
                chunk=None if policy == "full" else chunk, prefill_s=statistics.median(prefill_s),
                prefill_runs=len(prefill_s), peak_bytes=peak, peak_increase_bytes=peak - base,
                decode_tokens_per_s=statistics.median(decode_tps), decode_runs=len(decode_tps),
                cache_bytes=nbytes, held_states=held)


def child_main(spec: str) -> None:
    kwargs = json.loads(spec)
    if kwargs["device"] == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print("RESULT " + json.dumps(run_one(**kwargs)), flush=True)


def in_subprocess(**kwargs) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(kwargs)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"{kwargs}: failed (rc={r.returncode})\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _mb(n):
    return f"{n / 2**20:,.1f}"


def table(rows: list[dict]) -> str:
    head = ("| prompt | batch | cache | prefill s | vs full | peak MiB | prefill +MiB | decode tok/s | vs full "
            "| cache MiB | held |")
    out = [head, "|" + "---|" * 11]
    full = {(r["length"], r["batch"]): r for r in rows if r["cache"] == "full" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['length']} | {r['batch']} | {r['cache']} | {r['error']} |" + " |" * 7)
            continue
        f = full.get((r["length"], r["batch"]))
        p_ratio = f"{r['prefill_s'] / f['prefill_s']:.2f}x" if f else ""
        d_ratio = f"{r['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x" if f else ""
        out.append(f"| {r['length']} | {r['batch']} | {r['cache']} | {r['prefill_s']:.2f} | {p_ratio} | "
                   f"{_mb(r['peak_bytes'])} | {_mb(r['peak_increase_bytes'])} | {r['decode_tokens_per_s']:.1f} | "
                   f"{d_ratio} | {_mb(r['cache_bytes'])} | {r['held_states']} |")
    return "\n".join(out)


def chunk_table(rows: list[dict]) -> str:
    out = ["| chunk c | prefill s | peak MiB | prefill +MiB |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['chunk']} | {r['prefill_s']:.2f} | {_mb(r['peak_bytes'])} | {_mb(r['peak_increase_bytes'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lengths", default=None, help="prompt lengths (default: 1024,2048,8192 on cpu; 2048,8192,32768 on cuda)")
    ap.add_argument("--batches", default=None, help="batch sizes (default: 1 on cpu; 1,8 on cuda)")
    ap.add_argument("--caches", default="full,tova,window,tova-concat")
    ap.add_argument("--caches-long", default=None, help="caches for prompts of 8k tokens and more (default: --caches)")
    ap.add_argument("--memory-baseline", type=int, default=None,
                    help="also a TOVA-K prefill at this prompt length (the reference of the peak-memory goal)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk c (default: BudgetSpec's)")
    ap.add_argument("--chunks", default=None, help="instead: TOVA-K prefill time for these chunk sizes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-long", type=int, default=None, help="reps for prompts of 8k tokens and more (default: --reps)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_decode"))
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    from msrnn_train import BudgetSpec

    cpu = args.device == "cpu"
    lengths = [int(x) for x in (args.lengths or ("1024,2048,8192" if cpu else "2048,8192,32768")).split(",")]
    batches = [int(x) for x in (args.batches or ("1" if cpu else "1,8")).split(",")]
    chunk = args.chunk or BudgetSpec().prefill_chunk
    common = dict(device=args.device, budget=args.budget, decode_tokens=args.decode_tokens)

    def reps(length):
        return args.reps if length < 8192 or args.reps_long is None else args.reps_long

    started = time.time()
    device = torch.cuda.get_device_name() if not cpu else f"CPU, {os.environ.get('OMP_NUM_THREADS', 'all')} thread(s)"
    command = "python " + " ".join(["scripts/bench_decode.py"] + (sys.argv[1:] if argv is None else list(argv)))
    timer = "process CPU time" if cpu else "wall time"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, chunk_rows = [], []

    def write(planned: int):
        """Results so far (rewritten after every configuration, so an interrupted run keeps its rows)."""
        wall = time.time() - started
        done = len(rows) + len(chunk_rows)
        result = dict(command=command, device=device, timer=timer,
                      model="SmolLM2-135M fp32" if cpu else "Mistral-7B shape, random bf16", budget=args.budget,
                      chunk=chunk, reps=args.reps, reps_long=args.reps_long, decode_tokens=args.decode_tokens,
                      wall_s=round(wall, 1), configs_done=done, configs_planned=planned, rows=rows,
                      chunk_rows=chunk_rows)
        md = table(rows) if rows else chunk_table(chunk_rows)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        status = "" if done == planned else f" (interrupted or running: {done} of {planned} configurations)"
        out.with_suffix(".md").write_text(
            f"# bench_decode ({result['model']}, {device})\n\n`{command}` ({wall / 60:.1f} min wall; timings are "
            f"{timer}, medians of {args.reps} runs ({args.reps_long or args.reps} from 8k tokens) after warm-up)"
            f"{status}\n\n{md}\n")
        return md

    if args.chunks:
        sizes = [int(x) for x in args.chunks.split(",")]
        for c in sizes:
            r = in_subprocess(cache_kind="tova", length=lengths[0], batch=batches[0], chunk=c, reps=reps(lengths[0]),
                              **common)
            chunk_rows.append(r)
            print(f"chunk {c}: prefill {r['prefill_s']:.2f} s, +{_mb(r['peak_increase_bytes'])} MiB", flush=True)
            md = write(len(sizes))
    else:
        plan = []
        for length in lengths:
            if args.memory_baseline and length >= 8192 and (args.memory_baseline, "tova") not in plan:
                plan.append((args.memory_baseline, "tova"))
            kinds = args.caches_long if length >= 8192 and args.caches_long else args.caches
            plan += [(length, kind) for kind in kinds.split(",")]
        if args.memory_baseline and (args.memory_baseline, "tova") not in plan:
            plan.append((args.memory_baseline, "tova"))
        for length, kind in plan:
            for batch in batches:
                try:
                    r = in_subprocess(cache_kind=kind, length=length, batch=batch, chunk=chunk, reps=reps(length),
                                      **common)
                except RuntimeError as err:  # e.g. the full cache out of memory: a row that says so
                    reason = "out of memory" if "out of memory" in str(err).lower() else "failed"
                    print(f"{length} x{batch} {kind}: {reason}\n{err}", flush=True)
                    r = dict(cache=kind, length=length, batch=batch, error=reason)
                rows.append(r)
                if "error" not in r:
                    print(f"{length} x{batch} {kind}: prefill {r['prefill_s']:.2f} s, "
                          f"decode {r['decode_tokens_per_s']:.1f} tok/s", flush=True)
                md = write(len(plan) * len(batches))
    print(md)
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
