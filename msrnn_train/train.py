"""Fine-tune a decoder LLM to keep its quality as a finite multi-state RNN (bounded KV cache).

    accelerate launch msrnn_train/train.py recipes/mistral_tova512.yaml [--key value ...]
    python -m msrnn_train.train recipes/smollm2_gutenberg.yaml --training.max_steps 10
    python -m msrnn_train.train RECIPE.yaml --validate     # print the resolved recipe, load nothing
    python -m msrnn_train.train                            # the embedded default (SmolLM2 on Gutenberg)

One run, top to bottom (`train()`):
  1. setup    - the recipe is validated before anything loads; seeds, output folder, W&B;
  2. model    - the base model, a LoRA adapter (peft), the budget (apply_budget);
  3. data     - documents -> held-out split by document -> cached tokens -> fixed windows;
  4. train    - transformers.Trainer with the bounded LM loss, optionally an LM term on the full-state
                pass and a KL from a full-state teacher (the same weights, no budget; adapter off or
                on), soft-TOVA annealed to hard, K fixed or sampled per step (multi-budget);
  5. save     - adapter, tokenizer, msrnn_budget.json, recipe.yaml: `hub.load_bounded(dir)`
                restores the bounded model in one call;
  6. evaluate - held-out perplexity under the budget, before and after; a model card;
  7. push     - optionally to the Hugging Face Hub.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a script path (accelerate launch msrnn_train/train.py)
    _here = os.path.dirname(os.path.abspath(__file__))
    # the package's own folder must not shadow top-level modules (it holds data.py, evaluate.py, ...)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import contextlib
import json
import math
import re
import resource
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

with contextlib.redirect_stdout(sys.stderr):  # transformers' W&B integration prints a banner on import;
    # stdout is kept for `--validate`'s YAML
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from msrnn_train import BudgetSpec, apply_budget, full_state, get_budget
from msrnn_train.losses import causal_lm_loss, distillation_kl, weighted_causal_lm_loss
from msrnn_train.recipe import RECIPE_FILENAME, Recipe, RecipeError, RecipeWarning, load_recipe
from msrnn_train.soft import budget_at, set_soft_temperature, tau_at
from msrnn_train.spec import BudgetError, budget_key

USAGE = """usage: python -m msrnn_train.train [RECIPE.yaml] [--validate] [--section.key VALUE ...]

  RECIPE.yaml   a recipe (default: the embedded default, SmolLM2-135M on Gutenberg, TOVA K=64)
  --validate    check the recipe, print it resolved (YAML) and exit without loading anything
  --a.b VALUE   override a recipe key, e.g. --budget.budget 32 --training.max_steps 10
                (values are YAML scalars: null, true, 1e-4, [64, 128])
"""
EVAL_FILENAME = "eval_results.json"
_EVAL_BEFORE = "eval_before.json"
_WANDB_ID = "wandb_run_id.txt"
_REPLACED = ".replaced-run"  # another run's checkpoints, set aside by training.overwrite_output_dir
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",  # known Hub ids of embedded sources
           "gemma3": "google/gemma-3-270m"}


def log(msg: str) -> None:
    print(f"[msrnn_train] {msg}", file=sys.stderr, flush=True)


# ============================================================================ entry point
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    validate_only = "--validate" in argv
    argv = [a for a in argv if a != "--validate"]
    argv = _drop_local_rank(argv)  # the rank comes from the LOCAL_RANK environment variable
    recipe_path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    try:
        with _warnings_to_log():
            recipe = load_recipe(recipe_path, argv)
            if validate_only:
                check_model(recipe)  # the model's config, no weights: budget list length, map keys
                print(recipe.to_yaml(), end="")
                return 0
            result = train(recipe)
    except RecipeError as err:  # before any weights load where the information allows it
        _error(f"recipe error: {err}")
        return 2
    except TrainingFailed as err:
        if os.environ.get("RANK", "0") == "0":
            print(file=sys.stderr)  # off the progress bar's line
        _error(f"training failed: {err}")
        return 1
    return 3 if result.get("push_error") else 0


def _error(message: str) -> None:
    """One line on stderr, from the main process only (every rank of a launch stops the same way)."""
    if os.environ.get("RANK", "0") == "0":
        print(" ".join(message.split()), file=sys.stderr, flush=True)


class TrainingFailed(RuntimeError):
    """The run went wrong (a non-finite loss or gradient, a diverged loss); nothing was saved."""


@contextlib.contextmanager
def _warnings_to_log():
    """Recipe and data warnings go to the run's log as one line each, as they happen."""
    from msrnn_train.data import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", RecipeWarning)
        warnings.simplefilter("always", DataWarning)
        show = warnings.showwarning

        def _show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (RecipeWarning, DataWarning)):
                log(f"warning: {message}")
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = _show
        yield


def check_model(recipe: Recipe):
    """The model source exists and the budget fits its config (layer count for a per-layer list or
    map, head grouping), read from the config alone; returns the config (None for a Hub id that
    cannot be read from here: then the check runs once the model is loaded)."""
    try:
        config = model_config(recipe.model.source)
    except FileNotFoundError as err:
        raise RecipeError(f"model.source: {err}") from None
    if config is not None:
        try:
            recipe.budget_spec().validate_for(config)
        except BudgetError as err:
            raise RecipeError(f"budget.{err} (model.source {recipe.model.source})") from None
    return config


def check_runtime(recipe: Recipe) -> None:
    """What a recipe needs from this machine, checked before any weights load."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not recipe.deepspeed:
        raise RecipeError("deepspeed: the launcher runs DeepSpeed (accelerate --use_deepspeed or a config with "
                          "distributed_type: DEEPSPEED) but the recipe has deepspeed: null; name the DeepSpeed "
                          "config in the recipe (e.g. --deepspeed recipes/deepspeed/zero2.json): it is the one "
                          "place that selects it")
    if recipe.deepspeed:
        if not Path(recipe.deepspeed).is_file():
            raise RecipeError(f"deepspeed: config file not found: {recipe.deepspeed}")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError("deepspeed: the recipe uses DeepSpeed but the package is not installed "
                              "(pip install 'msrnn-train[deepspeed]'), or set deepspeed: null") from None
    resume = recipe.training.resume_from_checkpoint
    if isinstance(resume, str) and resume not in ("latest", "last") and not Path(resume).is_dir():
        raise RecipeError(f"training.resume_from_checkpoint: no checkpoint folder at {resume}")
    if recipe.training.bf16 and not torch.cuda.is_available() and recipe.model.dtype == "float16":
        raise RecipeError("training.bf16 with model.dtype float16: use model.dtype bfloat16 or float32")
    _check_writable_dir("training.output_dir", Path(recipe.training.output_dir))
    src = str(recipe.data.source)
    if not src.startswith("gutenberg") and _looks_like_path(src) and not Path(src).expanduser().exists():
        raise RecipeError(f"data.source: no such file or folder: {src}")


def _looks_like_path(src: str) -> bool:
    from msrnn_train.data import _looks_like_path as looks

    return looks(src)


def _check_writable_dir(key: str, path: Path) -> None:
    """`path` is (or can be made) a folder this process can write into."""
    path = path.expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"is inside {probe}, which is a file"
        raise RecipeError(f"{key}: {path} {what}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecipeError(f"{key}: {probe} is not writable by this user; give a writable folder")


# ============================================================================ the run
def train(recipe: Recipe, callbacks: list | tuple = ()) -> dict:
    """Run one recipe; returns a summary (output_dir, eval records before/after, throughput)."""
    # ---------------------------------------------------------------- 1. setup
    t_cfg = recipe.training
    out = Path(t_cfg.output_dir)
    check_runtime(recipe)
    check_model(recipe)
    texts = _training_texts(recipe)  # read and split before any weights load: bad data stops here
    resume = _resolve_resume(recipe, out)
    replaced = _claim_output_dir(recipe, out, resume)  # a folder holding another run is refused
    spec = recipe.budget_spec()
    args = _training_arguments(recipe)
    args.distributed_state.wait_for_everyone()  # every rank decided on the same files before any are written
    set_seed(t_cfg.seed)
    is_main = args.process_index == 0
    # ZeRO-3 shards the weights: every forward pass is a collective (all ranks evaluate, rank 0
    # writes), and weights loaded under zero.Init have no gather hooks until the engine exists.
    zero3 = _zero3_enabled(recipe)
    evaluates = is_main or zero3
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _set_aside(out, replaced)
        if not (out / "adapter_config.json").exists():  # marks the folder as this run's; an adapter
            recipe.save(out)  # already there keeps its own recipe until this run's adapter replaces it
    use_wandb = setup_wandb(recipe, out, resuming=resume is not None) if is_main else _wandb_wanted(recipe)
    args.report_to = ["wandb"] if use_wandb else []

    # ---------------------------------------------------------------- 2. model
    try:
        model, tokenizer = load_base_model(recipe.model.source, recipe.model.dtype,
                                           attn_implementation=recipe.model.attn_implementation)
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"model.source: {recipe.model.source!r} could not be loaded: {err}") from None
    try:
        spec.validate_for(model.config)
    except BudgetError as err:
        raise RecipeError(f"budget.{err}") from None
    model.config.use_cache = False
    model = add_lora(model, recipe)
    if recipe.budget.hybrid is not None:  # which layers stay unbounded (auto:N probes the model)
        from msrnn_train.retrieval_data import resolve_hybrid

        spec = resolve_hybrid(recipe, model, tokenizer, spec)
        log(f"budget.hybrid {recipe.budget.hybrid!r}: unbounded layers "
            f"{[i for i, k in enumerate(spec.budget) if k is None]}")
    apply_budget(model, spec)
    model.to(args.device)  # this rank's device (ZeRO-2 keeps whole weights on every rank)

    # ---------------------------------------------------------------- 3. data
    train_windows, eval_windows = build_windows(recipe, tokenizer, texts)
    log(f"data: {len(train_windows)} training windows, {len(eval_windows)} held-out windows of "
        f"{recipe.data.seq_len} tokens")
    if len(train_windows) == 0:
        raise RecipeError(f"data.seq_len: no training document is {recipe.data.seq_len} tokens long")
    from msrnn_train.retrieval_data import training_dataset

    before = []
    if recipe.eval.at_start and len(eval_windows) and is_main and not zero3:
        before = _load_json(out / _EVAL_BEFORE) if resume is not None else None
        if not before:
            before = evaluate_grid(model, eval_windows, recipe, spec, desc="before")
            _write_json(out / _EVAL_BEFORE, before)
        _print_records("held-out perplexity before training", before)
    args.distributed_state.wait_for_everyone()  # other ranks wait for the baseline evaluation

    # ---------------------------------------------------------------- 4. train
    schedule = BudgetScheduleCallback(recipe, spec)
    cbs = [schedule, SaveSpecCallback(recipe, spec)]
    if t_cfg.gradient_checkpointing and recipe.loss.full_lm_weight > 0:
        cbs.append(CheckpointingCallback(recipe))
    trainer = BoundedTrainer(
        model=model, args=args, train_dataset=training_dataset(recipe, train_windows, tokenizer),
        data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=[*cbs, *callbacks], recipe=recipe, schedule=schedule)
    periodic = _periodic_eval_callback(recipe, eval_windows, tokenizer, before) if evaluates else None
    if periodic is not None:
        periodic.attach(trainer)  # its metrics go through trainer.log (console, W&B, log_history)
    t0 = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - t0
    check_loss_curve(trainer.state.log_history, recipe, model.config.vocab_size)  # a diverged run is not saved
    set_soft_temperature(model, None)
    apply_budget(trainer.accelerator.unwrap_model(model), spec)  # the exact, full-K process from here on

    # ---------------------------------------------------------------- 5. save
    summary = {"output_dir": str(out), "train_metrics": train_output.metrics, "train_seconds": train_seconds,
               "tokens_per_second": trainer.tokens_seen * args.world_size / max(train_seconds, 1e-9),
               "peak_memory_mb": peak_memory_mb(), "log_history": trainer.state.log_history,
               "before": before, "after": [], "model": model, "tokenizer": tokenizer}
    trainer.accelerator.wait_for_everyone()
    save_outputs(trainer, tokenizer, recipe, spec, out)  # every rank: ZeRO-3 gathers the LoRA weights collectively
    if is_main and replaced is not None:
        shutil.rmtree(out / _REPLACED, ignore_errors=True)  # the replaced run's checkpoints: now superseded

    # ---------------------------------------------------------------- 6. evaluate
    if len(eval_windows) and evaluates:
        if zero3 and recipe.eval.at_start and not before:  # the untrained model = the base (LoRA starts at B = 0)
            before = _load_json(out / _EVAL_BEFORE) or evaluate_grid(model, eval_windows, recipe, spec,
                                                                     desc="before", adapter_on=False)
            if is_main:
                _write_json(out / _EVAL_BEFORE, before)
        final = [r for r in getattr(periodic, "final_records", None) or [] if r.get("adapted", True)]
        after = [{k: v for k, v in r.items() if k != "adapted"} for r in final] or \
            evaluate_grid(model, eval_windows, recipe, spec, desc="after")
        summary["after"], summary["before"] = after, before
        if is_main:
            _print_records("held-out perplexity after training", after, before)
    if is_main:
        _write_json(out / EVAL_FILENAME, {k: summary[k] for k in ("before", "after", "train_metrics", "train_seconds",
                                                                  "tokens_per_second", "peak_memory_mb")})
        from msrnn_train.hub import model_card

        (out / "README.md").write_text(model_card(recipe, spec, summary["after"], base_model_id(recipe.model.source),
                                                  baseline_records=before))
        log(f"saved the bounded adapter to {out}  (reload: msrnn_train.hub.load_bounded({str(out)!r}))")
        log(f"throughput {summary['tokens_per_second']:.1f} tokens/s, peak memory {summary['peak_memory_mb']:.0f} MB, "
            f"{train_seconds:.1f} s")
        if use_wandb:
            finish_wandb(summary)

    # ---------------------------------------------------------------- 7. push
    if recipe.hub.push_to_hub and is_main:
        from msrnn_train.hub import HubPushError, push_adapter

        try:
            summary["hub_url"] = push_adapter(out, recipe.hub.repo_id, private=recipe.hub.private)
        except HubPushError as err:
            log(str(err))
            summary["push_error"] = str(err)
    trainer.accelerator.wait_for_everyone()
    return summary


# ============================================================================ model
def load_base_model(source, dtype="float32", device="cpu", attn_implementation="sdpa"):
    """(model, tokenizer) for a model source: "smollm2", a .gguf file, a local dir, a Hub id
    (all through `msrnn_train.models.load_model`), or "random:tiny-llama" (tests)."""
    if str(source).startswith("random:"):
        model, tokenizer = random_model(str(source).partition(":")[2])
        from msrnn_train.models import resolve_dtype

        return model.to(device=device, dtype=resolve_dtype(dtype)).eval(), tokenizer
    from msrnn_train.models import load_model

    return load_model(source, dtype=dtype, device=device, attn_implementation=attn_implementation)


def random_model(name: str = "tiny-llama"):
    """A tiny randomly initialised Llama with a byte-level tokenizer, the same weights every call.
    For tests and smoke runs: the source string is all it takes to rebuild the base model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if name != "tiny-llama":
        raise RecipeError(f"model.source: unknown random model 'random:{name}'; allowed: random:tiny-llama")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.name_or_path = f"random:{name}"
    config = random_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config._attn_implementation_internal = "sdpa"
    return model, tokenizer


def random_config(name: str = "tiny-llama"):
    """The config of `random_model(name)` (2 layers, GQA 4/2, a 259-token byte vocabulary)."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig

    if name != "tiny-llama":
        raise RecipeError(f"model.source: unknown random model 'random:{name}'; allowed: random:tiny-llama")
    return LlamaConfig(vocab_size=3 + len(pre_tokenizers.ByteLevel.alphabet()), hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def model_config(source):
    """A model source's transformers config without its weights (None: cannot be read from here)."""
    if str(source).startswith("random:"):
        return random_config(str(source).partition(":")[2])
    from msrnn_train.models import load_config

    return load_config(source)


def add_lora(model, recipe: Recipe):
    from peft import LoraConfig, get_peft_model

    lc = recipe.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lc.target_modules if m not in present]
    if missing:
        raise RecipeError(f"lora.target_modules: {missing} not found in {type(model).__name__}; "
                          f"its linear layers include {sorted(n for n in present if n.endswith('_proj'))}")
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        bias=lc.bias, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: ZeRO-3 partitioned
    log(f"LoRA r={lc.r} on {lc.target_modules}: {trainable:,} trainable of {total:,} parameters")
    return model


def base_model_id(source: str) -> str | None:
    """The Hub id of a model source, when it has one (for the model card and adapter_config)."""
    src = str(source)
    if src.lower() in HUB_IDS:
        return HUB_IDS[src.lower()]
    if src.startswith("random:") or src.endswith(".gguf") or Path(src).expanduser().exists():
        return None
    return src if src.count("/") == 1 else None


# ============================================================================ data
def _training_texts(recipe: Recipe) -> tuple[dict, dict]:
    """(training documents, held-out documents) of `data.source`; RecipeError when there is no text."""
    from msrnn_train import data

    d = recipe.data
    try:
        texts = data.load_texts(d.source)
    except (OSError, data.DataError) as err:
        raise RecipeError(f"data.source: {err}") from None
    return split_documents(texts, d.source, d.heldout, d.split_seed, need_heldout=recipe.eval.max_windows > 0)


def build_windows(recipe: Recipe, tokenizer, texts: tuple[dict, dict] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train windows, held-out windows), LongTensor[N, seq_len] each; the split is by document.
    `texts`: the (training, held-out) documents when already read (`_training_texts`)."""
    from msrnn_train import data

    d = recipe.data
    train_texts, held_texts = texts if texts is not None else _training_texts(recipe)
    train_ids = data.tokenize_documents(train_texts, tokenizer, cache=d.cache_tokens)
    train = data.make_windows(train_ids, d.seq_len, max_windows=d.max_train_windows, stride=d.stride)
    held = torch.empty(0, d.seq_len, dtype=torch.long)
    if held_texts and recipe.eval.max_windows > 0:
        held_ids = data.tokenize_documents(held_texts, tokenizer, cache=d.cache_tokens)
        held = data.make_windows(held_ids, d.seq_len)
        if len(held) > recipe.eval.max_windows:  # spread evenly over all held-out documents
            idx = torch.linspace(0, len(held) - 1, recipe.eval.max_windows).round().long()
            held = held[idx]
    return train, held


def split_documents(texts: dict, source: str, heldout, seed: int, need_heldout: bool = True):
    from msrnn_train import data

    names = sorted(texts)
    if heldout is None:
        if str(source).startswith("gutenberg"):
            keys = {data.work_key(h) for h in data.DEFAULT_HELDOUT}
            heldout = [n for n in names if data.work_key(n) in keys]
        else:
            heldout = max(1, round(0.1 * len(names))) if need_heldout else 0
    elif isinstance(heldout, float):
        heldout = max(1, round(heldout * len(names)))
    if isinstance(heldout, int) and heldout >= len(names) and need_heldout:
        raise RecipeError(f"data.heldout: cannot hold out {heldout} of {len(names)} document(s) and still train; "
                          "the held-out split is by document, so give a source with several documents "
                          "(a directory of .txt files, a json/parquet/Hub dataset with one row per document) "
                          "or set eval.max_windows: 0")
    try:
        return data.split_books(texts, heldout, seed=seed)
    except KeyError as err:
        raise RecipeError(f"data.heldout: {err.args[0]}") from None


# ============================================================================ training
class BudgetScheduleCallback(TrainerCallback):
    """Before every optimizer step: soft-TOVA's temperature and the budget ramp's K."""

    def __init__(self, recipe: Recipe, spec: BudgetSpec):
        self.recipe, self.spec = recipe, spec
        self.tau: float | None = None
        self.k: int | None = spec.budget if isinstance(spec.budget, int) and spec.policy != "full" else None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        s, total, step = self.recipe.soft, self.recipe.training.max_steps, state.global_step
        bounded = _unwrap(model)
        if get_budget(bounded) is None or get_budget(bounded).to_dict() != self.spec.to_dict():
            apply_budget(bounded, self.spec)  # an evaluation in between may have left another spec
        self.tau = tau_at(step, total, s.tau_start, s.tau_end, s.hard_fraction) \
            if self.recipe.budget.mode == "soft" else None
        set_soft_temperature(bounded, self.tau)
        if s.budget_ramp_start is not None:
            from msrnn_train.apply import set_layer_budget

            self.k = budget_at(step, total, s.budget_ramp_start, self.recipe.budget.budget, s.ramp_fraction)
            set_layer_budget(bounded, self.k)
        elif self.recipe.budget.train_budgets:
            from msrnn_train.apply import set_layer_budget

            self.k = sampled_budget(self.recipe.budget.train_budgets, self.recipe.training.seed, step)
            set_layer_budget(bounded, self.k)


def sampled_budget(budgets: list[int], seed: int, step: int) -> int:
    """Multi-budget training's K at an optimizer step: uniform over `budgets`, a function of
    (seed, step) alone, so a resumed run samples the same sequence."""
    import random

    return int(random.Random(seed * 1_000_003 + step).choice(list(budgets)))


class CheckpointingCallback(TrainerCallback):
    """Activation checkpointing whose recompute runs each layer's forward attention again
    (`apply.checkpoint_context_fn`): needed when one step has a bounded and a full-state pass
    with gradients (loss.full_lm_weight > 0). Trainer.train() enables checkpointing just before
    on_train_begin; this re-enables it with the context function."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from msrnn_train.apply import checkpoint_context_fn

        enable_checkpointing(_unwrap(model), {"use_reentrant": False, "context_fn": checkpoint_context_fn(
            _unwrap(model))})


def enable_checkpointing(model, kwargs: dict) -> None:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class SaveSpecCallback(TrainerCallback):
    """Every checkpoint folder also holds the budget and the recipe, so it reloads bounded too."""

    def __init__(self, recipe: Recipe, spec: BudgetSpec):
        self.recipe, self.spec = recipe, spec

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                self.spec.save(ckpt)
                self.recipe.save(ckpt)


class FiniteGuard(TrainerCallback):
    """Stops the run with TrainingFailed on a non-finite loss, gradient or weight, before the
    optimizer step (loss, gradients) or before anything is saved (weights). Every rank sees the
    same verdict (the flags are summed over ranks), so all stop together."""

    def __init__(self, trainer: "BoundedTrainer"):
        self.trainer = trainer

    def _stop_if(self, bad: list[str], state, what: str) -> None:
        t = self.trainer
        flag = torch.tensor([float(bool(bad))], device=t.args.device)
        if t.args.world_size > 1:
            flag = t.accelerator.reduce(flag, reduction="sum")
        if flag.item() == 0:
            return
        c = t.args
        raise TrainingFailed(
            f"{what} at step {state.global_step + 1}: {'; '.join(bad) or 'on another rank'}. Nothing was saved from "
            f"this step on (the output folder keeps what it had). Lower training.learning_rate (now "
            f"{c.learning_rate:g}) or clip the gradients with training.max_grad_norm > 0 (now {c.max_grad_norm:g})")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        t = self.trainer
        loss, t._step_loss = t._step_loss, 0.0
        bad = [] if math.isfinite(float(loss)) else [f"the loss is {float(loss)}"]
        grads = [n for n, p in _unwrap(t.model).named_parameters()
                 if p.requires_grad and p.grad is not None and not torch.isfinite(p.grad).all()]
        if grads:
            bad.append(f"non-finite gradients in {len(grads)} tensors (e.g. {grads[0]})")
        self._stop_if(bad, state, "the loss or its gradients stopped being finite")

    def on_optimizer_step(self, args, state, control, **kwargs):
        params = [n for n, p in _unwrap(self.trainer.model).named_parameters()
                  if p.requires_grad and p.numel() and not torch.isfinite(p.detach()).all()]
        bad = [f"non-finite weights after the update in {len(params)} tensors (e.g. {params[0]})"] if params else []
        self._stop_if(bad, state, "the weights stopped being finite")


def check_loss_curve(log_history: list[dict], recipe: Recipe, vocab_size: int | None = None) -> None:
    """A run whose loss ends far above where it started diverged, and one whose LM loss ends at
    log(vocabulary) collapsed to uniform output (both after a too-large learning rate, say):
    TrainingFailed, so that it is not saved."""
    losses = [h["loss"] for h in log_history if "loss" in h and "step" in h]
    lm = [h["lm_loss"] for h in log_history if "lm_loss" in h and "step" in h]
    if len(losses) < 2:
        return
    first, last = losses[0], sum(losses[-3:]) / len(losses[-3:])
    uniform = math.log(vocab_size) if vocab_size else None
    collapsed = uniform is not None and len(lm) >= 2 and lm[0] < uniform - 0.5 and \
        sum(lm[-3:]) / len(lm[-3:]) > uniform - 0.05
    if not math.isfinite(last) or last > 1.5 * first + 1.0 or collapsed:
        what = (f"the LM loss ended at {sum(lm[-3:]) / len(lm[-3:]):.3f} = log(vocabulary size {vocab_size}): the "
                f"model collapsed to uniform output" if collapsed else
                f"the training loss rose from {first:.3f} (first step) to {last:.3f} (last steps): the run diverged")
        raise TrainingFailed(
            f"{what}, so its adapter was not saved. Lower training.learning_rate (now {recipe.training.learning_rate:g}) or "
            f"set training.max_grad_norm > 0 (now {recipe.training.max_grad_norm:g})")


class BoundedTrainer(Trainer):
    """Trainer whose loss is `lm_weight * CE(bounded student) + full_lm_weight * CE(full-state pass,
    adapter on) + kl_weight * KL(full-state teacher || student)`. The teacher is the same weights
    with no budget and the adapter off (`loss.teacher: base`) or on and detached (`self`): no copy."""

    def __init__(self, *args, recipe: Recipe, schedule: BudgetScheduleCallback, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg = recipe.loss
        self.schedule = schedule
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean; the Trainer divides by GA
        self.tokens_seen = 0
        self._parts = {"lm_loss": 0.0, "kl_loss": 0.0, "full_lm_loss": 0.0}
        self._parts_n = 0
        self._tokens_since_log = 0
        self._last_log_time = None
        self._step_loss = 0.0  # summed over the micro-batches of one optimizer step (NaN stays NaN)
        self.add_callback(FiniteGuard(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = self._step_loss + loss.detach().float().sum()  # read once per optimizer step
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        labels = inputs.get("labels", input_ids)
        mask = inputs.get("attention_mask")
        cfg = self.loss_cfg
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        outputs = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        lm = causal_lm_loss(outputs.logits, labels) if "loss_weight" not in inputs else \
            weighted_causal_lm_loss(outputs.logits, labels, inputs["loss_weight"])  # retrieval rows' answers
        loss = cfg.lm_weight * lm
        full_lm = teacher = None
        if cfg.full_lm_weight > 0:  # the full-state pass with the adapter on, trained too
            with full_state(self.accelerator.unwrap_model(model)):
                full_logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            full_lm = causal_lm_loss(full_logits, labels)
            loss = loss + cfg.full_lm_weight * full_lm
            if cfg.teacher == "self":
                teacher = full_logits.detach()
        kl = None
        if cfg.kl_weight > 0:
            if teacher is None:
                teacher = self.teacher_logits(model, input_ids, mask)
            kl = distillation_kl(outputs.logits, teacher, labels, cfg.kl_temperature)
            loss = loss + cfg.kl_weight * kl
        if model.training:
            n = int(input_ids.numel())
            self.tokens_seen += n
            self._tokens_since_log += n
            self._parts["lm_loss"] += lm.detach().float()  # device tensors: no host sync per step
            if kl is not None:
                self._parts["kl_loss"] += kl.detach().float()
            if full_lm is not None:
                self._parts["full_lm_loss"] += full_lm.detach().float()
            self._parts_n += 1
        return (loss, outputs) if return_outputs else loss

    def teacher_logits(self, model, input_ids, attention_mask):
        """Distillation targets without gradient: the base model (adapter off) or, with
        `loss.teacher: self`, the current model (adapter on); both with the full state."""
        return full_state_logits(self.accelerator.unwrap_model(model), input_ids, attention_mask,
                                 adapter=self.loss_cfg.teacher == "self")

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._parts_n:
            dev = self.args.device
            parts = torch.stack([torch.as_tensor(self._parts["lm_loss"], dtype=torch.float32).to(dev),
                                 torch.as_tensor(self._parts["kl_loss"], dtype=torch.float32).to(dev),
                                 torch.as_tensor(self._parts["full_lm_loss"], dtype=torch.float32).to(dev),
                                 torch.tensor(float(self._parts_n), device=dev)])
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts, reduction="sum")
            logs["lm_loss"] = parts[0].item() / parts[3].item()
            if self.loss_cfg.kl_weight > 0:
                logs["kl_loss"] = parts[1].item() / parts[3].item()
            if self.loss_cfg.full_lm_weight > 0:
                logs["full_lm_loss"] = parts[2].item() / parts[3].item()
            now = time.perf_counter()
            logs["tokens_per_second"] = self._tokens_since_log * self.args.world_size / max(now - self._last_log_time,
                                                                                            1e-9)
            logs["peak_memory_mb"] = peak_memory_mb()
            logs["tau"] = 0.0 if self.schedule.tau is None else self.schedule.tau  # 0: hard (the inference process)
            if self.schedule.k is not None:
                logs["budget_K"] = self.schedule.k
            self._parts = {"lm_loss": 0.0, "kl_loss": 0.0, "full_lm_loss": 0.0}
            self._parts_n = 0
            self._tokens_since_log = 0
            self._last_log_time = now
        super().log(logs, start_time)


@torch.no_grad()
def full_state_logits(model, input_ids, attention_mask=None, adapter: bool = False) -> torch.Tensor:
    """The distillation teacher: the same weights with no budget, the LoRA adapter disabled
    (`adapter=False`, the base model) or on (the current model's own full-state prediction)."""
    with (contextlib.nullcontext() if adapter else model.disable_adapter()), full_state(model):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _training_arguments(recipe: Recipe) -> TrainingArguments:
    t = recipe.training
    # transformers >= 5.x calls it activation checkpointing; the recipe keeps the familiar name
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    checkpointing = {ckpt: t.gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None}
    return TrainingArguments(
        output_dir=t.output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm, optim=t.optim, seed=t.seed, data_seed=t.seed, bf16=t.bf16, fp16=t.fp16,
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(), remove_unused_columns=False, report_to=[],
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (FiniteGuard then stops the run)
        deepspeed=recipe.deepspeed, run_name=recipe.wandb.name,
        # use_cpu would make transformers build a plain CPU state and skip DeepSpeed's own
        # distributed init (zero.Init would then see world size 1); DeepSpeed on a CPU runs on
        # its CPU accelerator instead
        use_cpu=not torch.cuda.is_available() and not recipe.deepspeed,
        **checkpointing,
    )


# ============================================================================ the output folder
# Recipe keys a resumed (or re-run) run may change: they do not change what the adapter learns.
_FREE_KEYS = ("training.max_steps", "training.output_dir", "training.resume_from_checkpoint",
              "training.overwrite_output_dir", "training.save_steps", "training.save_total_limit",
              "training.logging_steps", "training.dataloader_num_workers", "data.cache_tokens", "eval", "wandb", "hub")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "budget.budget":  # a budget map is one value
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_differences(saved: dict, current: Recipe) -> list[str]:
    """'key: saved -> current' for every recipe key that differs and matters to the adapter."""
    a, b = _flat(saved), _flat(current.to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in _FREE_KEYS):
            continue
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if isinstance(va, dict) or isinstance(vb, dict):  # budget maps: YAML may key layers by int or str
            va, vb = (budget_key(v) if isinstance(v, dict) else v for v in (va, vb))
        if va != vb:
            diffs.append(f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}")
    return diffs


def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of `out`, newest (highest N) first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (None: complete). The Trainer writes the weights, the
    optimizer, the RNG state and trainer_state.json; this run's callback then adds msrnn_budget.json
    and recipe.yaml, so those two mark a checkpoint whose writing finished."""
    from msrnn_train.spec import SPEC_FILENAME

    for name in ("trainer_state.json", SPEC_FILENAME, RECIPE_FILENAME):
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
            return f"no {name}"
    if not any((ckpt / w).is_file() and (ckpt / w).stat().st_size > 0
               for w in ("adapter_model.safetensors", "adapter_model.bin")):
        return "no adapter weights"
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "an unreadable trainer_state.json"
    return None


def _saved_recipe(folder: Path) -> dict | None:
    import yaml

    try:
        raw = yaml.safe_load((folder / RECIPE_FILENAME).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def _resolve_resume(recipe: Recipe, out: Path) -> Path | None:
    """The checkpoint to resume from: the newest complete one (a half-written last checkpoint is
    skipped, with a message), after checking it was written by this recipe."""
    value = recipe.training.resume_from_checkpoint
    if value in (None, False):
        return None
    if value is True or value in ("latest", "last"):
        ckpt = None
        for candidate in _checkpoints(out):
            problem = checkpoint_problem(candidate)
            if problem is None:
                ckpt = candidate
                break
            log(f"training.resume_from_checkpoint: skipping {candidate.name}: incomplete ({problem}; "
                "half-written when the run stopped?)")
        if ckpt is None:
            log(f"training.resume_from_checkpoint: no complete checkpoint in {out} yet; starting from step 0")
            return None
    else:
        ckpt = Path(value)
        problem = checkpoint_problem(ckpt)
        if problem is not None:
            raise RecipeError(f"training.resume_from_checkpoint: {ckpt} is not a complete checkpoint of this "
                              f"project ({problem}); give another checkpoint folder or true (the newest complete)")
    diffs = recipe_differences(_saved_recipe(ckpt) or {}, recipe)
    from msrnn_train.spec import BudgetSpec

    try:
        saved_spec = BudgetSpec.load(ckpt).to_dict()
    except BudgetError as err:
        raise RecipeError(f"training.resume_from_checkpoint: {err}") from None
    for key, value in recipe.budget_spec().to_dict().items():
        if budget_key(saved_spec.get(key)) != budget_key(value) and not any(d.startswith(f"budget.{key}:")
                                                                             for d in diffs):
            diffs.append(f"budget.{key}: {saved_spec.get(key)!r} -> {value!r} (msrnn_budget.json)")
    if diffs:
        raise RecipeError(f"training.resume_from_checkpoint: {ckpt} was written by a different recipe; "
                          f"{'; '.join(diffs)}. Resume with the recipe it was written with, or start afresh in "
                          "another training.output_dir (or with training.overwrite_output_dir: true)")
    log(f"resuming from {ckpt}")
    return ckpt


def _claim_output_dir(recipe: Recipe, out: Path, resume: Path | None) -> list[Path] | None:
    """Refuse an output folder that holds another run, unless training.overwrite_output_dir; then
    returns that run's checkpoints (set aside in out/.replaced-run, so the Trainer's rotation never
    deletes them and a resume never picks them up; removed once this run's adapter is saved).
    None: nothing is replaced."""
    if resume is not None or not out.is_dir():
        return None
    ckpts = _checkpoints(out)
    if not ckpts and not any((out / n).exists() for n in ("adapter_config.json", RECIPE_FILENAME)):
        return None
    saved = _saved_recipe(out) or next((r for c in ckpts if (r := _saved_recipe(c)) is not None), None)
    if saved is None:
        diffs = ["no recipe.yaml says what run it is"]
    else:
        diffs = recipe_differences(saved, recipe)
    if not diffs:
        return None  # the same recipe run again: its files are replaced as it goes
    if not recipe.training.overwrite_output_dir:
        raise RecipeError(
            f"training.output_dir: {out} already holds another run ({'; '.join(diffs)}). Choose another "
            "output_dir, resume that run with its own recipe (training.resume_from_checkpoint: true), or set "
            "training.overwrite_output_dir: true to replace it (its adapter stays until this run succeeds)")
    log(f"training.overwrite_output_dir: replacing the run in {out} ({'; '.join(diffs)}); its adapter stays until "
        f"this run's adapter is saved, its checkpoints wait in {out / _REPLACED} until then")
    return ckpts


def _set_aside(out: Path, ckpts: list[Path] | None) -> None:
    if not ckpts:
        return
    aside = out / _REPLACED
    aside.mkdir(exist_ok=True)  # an earlier failed attempt may have set checkpoints aside already
    for c in ckpts:
        target = aside / c.name
        os.replace(c, target if not target.exists() else aside / f"{c.name}.{time.time_ns()}")


def _zero3_enabled(recipe: Recipe) -> bool:
    if not recipe.deepspeed:
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _drop_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model


# ============================================================================ evaluation
def evaluate_grid(model, windows: torch.Tensor, recipe: Recipe, train_spec: BudgetSpec, desc: str = "",
                  adapter_on: bool = True) -> list[dict]:
    """Held-out perplexity, hard process, under the training spec and every (policy, K) of
    `recipe.eval` (`full` once); the model's training budget is put back afterwards.
    Records: {policy, budget, ppl, nll, tokens}. Uses msrnn_train.evaluate when it is there."""
    bounded = _unwrap(model)
    specs = eval_specs(recipe, train_spec)
    try:
        from msrnn_train import evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None:
        records = evaluate.evaluate_specs(bounded, windows, specs, recipe.eval.batch_size, adapter_on=adapter_on,
                                          desc=f"eval {desc}")
        return [{k: v for k, v in r.items() if k != "adapted"} for r in records]
    was_training = bounded.training
    bounded.eval()
    records = []
    adapter = contextlib.nullcontext() if adapter_on else bounded.disable_adapter()
    try:
        with adapter:
            for spec in specs:
                apply_budget(bounded, spec)
                budget = None if spec.policy == "full" else spec.budget
                records.append({"policy": spec.policy, "budget": budget,
                                **_perplexity(bounded, windows, recipe.eval.batch_size)})
                log(f"{desc} {spec.describe()}: ppl {records[-1]['ppl']:.3f}")
    finally:
        apply_budget(bounded, train_spec)
        bounded.train(was_training)
    return records


def eval_specs(recipe: Recipe, train_spec: BudgetSpec) -> list[BudgetSpec]:
    """The training spec first, then eval.policies x eval.budgets (`full` once), no repeats."""
    specs = [] if train_spec.policy == "full" else [train_spec]
    for policy in recipe.eval.policies:
        budgets = [None] if policy == "full" else recipe.eval.budgets
        for k in budgets:
            spec = BudgetSpec(policy=policy, budget=1 if k is None else k, sinks=recipe.budget.sinks)
            if spec.policy == "full":
                spec = BudgetSpec(policy="full")
            if all(spec.to_dict() != s.to_dict() for s in specs):
                specs.append(spec)
    return specs


@torch.no_grad()
def _perplexity(model, windows, batch_size):
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        n += x[:, 1:].numel()
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


def _periodic_eval_callback(recipe: Recipe, eval_windows, tokenizer, before: list[dict]):
    """msrnn_train.evaluate's BoundedEvalCallback, when eval.every_n_steps > 0 and it is installed."""
    if recipe.eval.every_n_steps <= 0 or len(eval_windows) == 0:
        return None
    try:
        from msrnn_train.evaluate import BoundedEvalCallback
    except ImportError:
        log("eval.every_n_steps: msrnn_train.evaluate is not available; evaluating before and after only")
        return None
    cb = BoundedEvalCallback(eval_windows, recipe.eval.policies, recipe.eval.budgets, recipe.eval.every_n_steps,
                             recipe.eval.batch_size, tokenizer=tokenizer, sinks=recipe.budget.sinks)
    spec = recipe.budget_spec()
    have = {_record_key(r) for r in before}
    wanted = {("full", budget_key(None)), (spec.policy, budget_key(spec.budget))}
    if wanted <= have:  # the base model is measured already
        cb.base_records = [{**r, "adapted": False} for r in before if _record_key(r) in wanted]
    return cb


def _print_records(title: str, records: list[dict], before: list[dict] | None = None) -> None:
    base = {_record_key(r): r["ppl"] for r in before or []}
    lines = [title]
    for r in records:
        key = _record_key(r)
        was = f"  (before {base[key]:.3f})" if key in base else ""
        lines.append(f"  {r['policy']:>9} K={str(r['budget']):>5}: ppl {r['ppl']:.3f}{was}")
    log("\n".join(lines))


def _record_key(record: dict) -> tuple[str, str]:
    """(policy, budget) of an evaluation record, hashable for per-layer lists and maps too."""
    return record["policy"], budget_key(record["budget"])


# ============================================================================ save
def save_outputs(trainer: Trainer, tokenizer, recipe: Recipe, spec: BudgetSpec, out: Path) -> None:
    """Adapter (peft), tokenizer, msrnn_budget.json and recipe.yaml in one folder. Call it on every
    rank: under DeepSpeed ZeRO-3 `save_model` gathers the sharded LoRA weights (a collective);
    only rank 0 writes. Everything is written to a temporary folder first and moved into `out` only
    once complete (and finite), so a run that fails while saving never replaces a good adapter."""
    tmp = out / ".saving"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if not trainer.is_world_process_zero():
        return
    from safetensors.torch import load_file

    weights = tmp / "adapter_model.safetensors"
    if weights.is_file():
        bad = [k for k, v in load_file(str(weights)).items() if not torch.isfinite(v).all()]
        if bad:
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingFailed(f"the adapter holds non-finite weights ({bad[0]}, {len(bad)} tensors); not saved")
    tokenizer.save_pretrained(str(tmp))
    spec.save(tmp)
    recipe.save(tmp)
    base_id = base_model_id(recipe.model.source)
    cfg_path = tmp / "adapter_config.json"
    if base_id and cfg_path.is_file():  # a portable name rather than a local cache path
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_id
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in sorted(tmp.iterdir()):  # each file replaced whole (os.replace), once all are written
        os.replace(f, out / f.name)
    tmp.rmdir()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ============================================================================ W&B
def _wandb_wanted(recipe: Recipe) -> bool:
    w = recipe.wandb
    env = os.environ.get("WANDB_MODE", "").lower()
    disabled_env = os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes")
    return w.project is not None and w.mode != "disabled" and env != "disabled" and not disabled_env


def wandb_has_api_key() -> bool:
    """Whether W&B credentials exist (WANDB_API_KEY, a settings file or ~/.netrc), without prompting."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # an older wandb without `prompt=`
        import netrc

        try:
            return any("wandb" in host for host in netrc.netrc().hosts)
        except (OSError, netrc.NetrcParseError):
            return False
    except Exception:  # noqa: BLE001 - any failure means no usable key
        return False


def setup_wandb(recipe: Recipe, out: Path, resuming: bool = False) -> bool:
    """Start the W&B run (the Trainer's WandbCallback reuses it) with the resolved recipe as its
    config and recipe.yaml as a file. No API key -> offline, with one message saying how to sync."""
    if not _wandb_wanted(recipe):
        return False
    try:
        import wandb
    except ImportError:
        log("wandb is not installed: metrics go to the console only (pip install wandb)")
        return False
    w = recipe.wandb
    mode = os.environ.get("WANDB_MODE", "").lower() or w.mode
    no_key = mode in ("auto", "online") and not wandb_has_api_key()
    if no_key:
        mode = "offline"
    elif mode in ("auto", "run"):
        mode = "online"
    id_file = out / _WANDB_ID
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    try:
        run = wandb.init(project=w.project, name=w.name or out.name, tags=w.tags or None, dir=str(out), mode=mode,
                         id=run_id, resume="allow" if run_id else None,
                         config={"recipe": recipe.to_dict(), "budget_spec": recipe.budget_spec().to_dict()})
    except Exception as err:  # noqa: BLE001 - never lose a training run to the logger
        log(f"W&B could not start ({type(err).__name__}: {err}); continuing without it")
        return False
    id_file.write_text(run.id + "\n")
    files = Path(run.dir)  # the run's own copy: out/recipe.yaml is written with the adapter
    wandb.save(str(recipe.save(files)), base_path=str(files), policy="now")
    run_dir = Path(run.dir).parent
    if no_key:
        log(f"W&B: no API key found (WANDB_API_KEY or `wandb login`), so the run is logged OFFLINE in {run_dir}. "
            f"Upload it later with:  wandb sync {run_dir}")
    else:
        log(f"W&B run ({mode}): {getattr(run, 'url', None) or run_dir}")
    return True


def finish_wandb(summary: dict) -> None:
    import wandb

    if wandb.run is None:
        return
    before = {_record_key(r): r["ppl"] for r in summary["before"]}
    table = wandb.Table(columns=["policy", "budget", "ppl_before", "ppl_after"])
    for r in summary["after"]:
        key = _record_key(r)
        table.add_data(r["policy"], str(r["budget"]), before.get(key), r["ppl"])
        wandb.run.summary[f"eval/{r['policy']}-{r['budget']}/ppl"] = r["ppl"]
        if key in before:
            wandb.run.summary[f"eval/{r['policy']}-{r['budget']}/ppl_before"] = before[key]
    wandb.log({"eval/perplexity": table})
    wandb.run.summary["tokens_per_second"] = summary["tokens_per_second"]
    wandb.run.summary["peak_memory_mb"] = summary["peak_memory_mb"]
    wandb.finish()


if __name__ == "__main__":
    sys.exit(main())
