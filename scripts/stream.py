"""Stream a long generation from the embedded model (SmolLM2-135M) through a bounded cache.

    python scripts/stream.py --tokens 10000 --policy tova --budget 256

`model.generate()` samples the tokens; a stopping-criteria hook reads the BoundedCache after
every step and records the most states any layer held and the bytes it stored, so the check
that memory stays bounded covers every step of the stream, not just its end.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache
from msrnn_train.models import load_model


class WatchCache(StoppingCriteria):
    """Never stops generation; after every step notes the cache's held states and bytes."""

    def __init__(self, cache, every: int):
        self.cache, self.every = cache, every
        self.steps, self.max_held, self.bytes = 0, 0, set()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        self.max_held = max(self.max_held, max(self.cache.state_sizes()))
        self.bytes.add(self.cache.nbytes())
        if self.steps % self.every == 0:
            cpu = (time.process_time() - self.cpu_started) / self.steps
            print(f"  step {self.steps:>6}: sequence {self.cache.get_seq_length():>6} tokens, "
                  f"max held states so far {self.max_held}, cache {self.cache.nbytes() / 2**20:.2f} MiB, "
                  f"{1e3 * cpu:.0f} ms CPU per token", flush=True)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prompt", default="It was the best of times, it was the worst of times,")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=1000, help="print progress every N steps")
    args = ap.parse_args(argv)

    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    apply_budget(model, BudgetSpec(policy=args.policy, budget=args.budget))
    cache = make_cache(model)
    watch = WatchCache(cache, args.every)
    inputs = tok(args.prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True,
                             temperature=0.8, top_p=0.95, repetition_penalty=1.1, **cache_kwargs(cache),
                             stopping_criteria=StoppingCriteriaList([watch]), pad_token_id=tok.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    print(f"\ngenerated {new.numel()} tokens in {time.perf_counter() - watch.started:.0f} s; "
          f"the last 300 characters:\n...{text[-300:]}\n")
    ok = watch.max_held <= args.budget and len(watch.bytes) == 1
    print(f"check: {watch.steps} steps, sequence length {cache.get_seq_length()}, "
          f"most states held by any layer at any step = {watch.max_held} (K = {args.budget}), "
          f"cache bytes constant over the stream: {len(watch.bytes) == 1} ({cache.nbytes() / 2**20:.2f} MiB) "
          f"-> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
