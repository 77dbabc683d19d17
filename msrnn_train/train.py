"""Fine-tune a decoder LLM to keep its quality as a finite multi-state RNN (bounded KV cache).

    accelerate launch msrnn_train/train.py recipes/mistral_tova512.yaml [--key value ...]
    python -m msrnn_train.train recipes/smollm2_gutenberg.yaml --training.max_steps 10
    python -m msrnn_train.train RECIPE.yaml --validate     # every check that needs no weights; print the recipe
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
import shutil
import time
import warnings
from pathlib import Path

import torch

with contextlib.redirect_stdout(sys.stderr):  # transformers' W&B integration prints a banner when the
    # Trainer is first imported (here, quietly, before trainer.py); stdout is kept for `--validate`'s YAML
    from transformers import Trainer, default_data_collator, set_seed  # noqa: F401

from msrnn_train.controller import apply_budget, get_controller, set_soft_temperature
from msrnn_train.data import DataWarning, build_windows, looks_like_path, readable_offline, training_texts
from msrnn_train.errors import log
from msrnn_train.evaluate import record_key
from msrnn_train.hub import HubPushError, model_card, push_adapter
from msrnn_train.models import add_lora, base_model_id, load_base_model, model_config
from msrnn_train.recipe import Recipe, RecipeError, RecipeWarning, load_recipe
from msrnn_train.retention import load_scorers
from msrnn_train.retrieval_data import resolve_hybrid, training_dataset
from msrnn_train.run_folder import REPLACED, claim_output_dir, resolve_resume, set_aside
from msrnn_train.spec import BudgetError
from msrnn_train.tracking import finish_wandb, setup_wandb, wandb_wanted
from msrnn_train.trainer import (BoundedTrainer, BudgetScheduleCallback, CheckpointingCallback, SaveSpecCallback,
                                 TrainingFailed, check_loss_curve, evaluate_grid, peak_memory_mb,
                                 periodic_eval_callback, save_outputs, training_arguments)

USAGE = """usage: python -m msrnn_train.train [RECIPE.yaml] [--validate] [--section.key VALUE ...]

  RECIPE.yaml   a recipe (default: the embedded default, SmolLM2-135M on Gutenberg, TOVA K=64)
  --validate    make every check a run makes before weights load (recipe, model config, budget,
                data, output folder, resume), print the recipe resolved (YAML) and exit
  --a.b VALUE   override a recipe key, e.g. --budget.budget 32 --training.max_steps 10
                (values are YAML scalars: null, true, 1e-4, [64, 128])
"""
EVAL_FILENAME = "eval_results.json"
_EVAL_BEFORE = "eval_before.json"


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
            if validate_only:  # every check train() makes before weights load, in the same order
                preflight(recipe, read_data=readable_offline(recipe.data.source))
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


@contextlib.contextmanager
def _warnings_to_log():
    """Recipe and data warnings go to the run's log as one line each, as they happen."""
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


def preflight(recipe: Recipe, read_data: bool = True):
    """Every check that needs no weights, in one place for `train()` and `--validate`: the machine
    (`check_runtime`: output folder, data path, DeepSpeed, resume path), the model's config and the
    budget (`check_model`), the data (read and split: an empty folder or too few documents stops
    here; `read_data=False` skips a source that would have to be downloaded), and the output folder's
    run (`resolve_resume`, `claim_output_dir`; nothing is written). RecipeError names the key.
    Returns (documents or None, the checkpoint to resume from, the checkpoints a replaced run leaves)."""
    check_runtime(recipe)
    check_model(recipe)
    texts = training_texts(recipe) if read_data else None
    if not read_data:
        log(f"data.source {recipe.data.source!r}: not read (it would be downloaded); training reads and checks it")
    out = Path(recipe.training.output_dir)
    resume = resolve_resume(recipe, out)
    replaced = claim_output_dir(recipe, out, resume)  # a folder holding another run is refused
    return texts, resume, replaced


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
    if not src.startswith("gutenberg") and looks_like_path(src) and not Path(src).expanduser().exists():
        raise RecipeError(f"data.source: no such file or folder: {src}")


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
    texts, resume, replaced = preflight(recipe)  # bad data, a taken output folder, ... stop here
    spec = recipe.budget_spec()
    args = training_arguments(recipe)
    args.distributed_state.wait_for_everyone()  # every rank decided on the same files before any are written
    set_seed(t_cfg.seed)
    is_main = args.process_index == 0
    # ZeRO-3 shards the weights: every forward pass is a collective (all ranks evaluate, rank 0
    # writes), and weights loaded under zero.Init have no gather hooks until the engine exists.
    zero3 = _zero3_enabled(recipe)
    evaluates = is_main or zero3
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        set_aside(out, replaced)
        if not (out / "adapter_config.json").exists():  # marks the folder as this run's; an adapter
            recipe.save(out)  # already there keeps its own recipe until this run's adapter replaces it
    use_wandb = setup_wandb(recipe, out, resuming=resume is not None) if is_main else wandb_wanted(recipe)
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
        spec = resolve_hybrid(recipe, model, tokenizer, spec)
        log(f"budget.hybrid {recipe.budget.hybrid!r}: unbounded layers "
            f"{[i for i, k in enumerate(spec.budget) if k is None]}")
    apply_budget(model, spec)
    if resume is not None:
        load_scorers(model, resume)  # a learned policy's scorer as the checkpoint left it (the LoRA: the Trainer)
    elif recipe.lora.init_adapter:
        load_scorers(model, recipe.lora.init_adapter)  # its learned scorer, if it has one
    model.to(args.device)  # this rank's device (ZeRO-2 keeps whole weights on every rank)

    # ---------------------------------------------------------------- 3. data
    train_windows, eval_windows = build_windows(recipe, tokenizer, texts)
    log(f"data: {len(train_windows)} training windows, {len(eval_windows)} held-out windows of "
        f"{recipe.data.seq_len} tokens")
    if len(train_windows) == 0:
        raise RecipeError(f"data.seq_len: no training document is {recipe.data.seq_len} tokens long")
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
    periodic = periodic_eval_callback(recipe, eval_windows, tokenizer, before) if evaluates else None
    if periodic is not None:
        periodic.attach(trainer)  # its metrics go through trainer.log (console, W&B, log_history)
    t0 = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - t0
    check_loss_curve(trainer.state.log_history, recipe, model.config.vocab_size)  # a diverged run is not saved
    set_soft_temperature(model, None)
    apply_budget(trainer.accelerator.unwrap_model(model), spec)  # the exact, full-K process from here on
    get_controller(trainer.accelerator.unwrap_model(model)).relaxation = None

    # ---------------------------------------------------------------- 5. save
    summary = {"output_dir": str(out), "train_metrics": train_output.metrics, "train_seconds": train_seconds,
               "tokens_per_second": trainer.tokens_seen * args.world_size / max(train_seconds, 1e-9),
               "peak_memory_mb": peak_memory_mb(), "log_history": trainer.state.log_history,
               "before": before, "after": [], "model": model, "tokenizer": tokenizer}
    trainer.accelerator.wait_for_everyone()
    save_outputs(trainer, tokenizer, recipe, spec, out)  # every rank: ZeRO-3 gathers the LoRA weights collectively
    if is_main and replaced is not None:
        shutil.rmtree(out / REPLACED, ignore_errors=True)  # the replaced run's checkpoints: now superseded

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
        (out / "README.md").write_text(model_card(recipe, spec, summary["after"], base_model_id(recipe.model.source),
                                                  baseline_records=before))
        log(f"saved the bounded adapter to {out}  (reload: msrnn_train.hub.load_bounded({str(out)!r}))")
        log(f"throughput {summary['tokens_per_second']:.1f} tokens/s, peak memory {summary['peak_memory_mb']:.0f} MB, "
            f"{train_seconds:.1f} s")
        if use_wandb:
            finish_wandb(summary)

    # ---------------------------------------------------------------- 7. push
    if recipe.hub.push_to_hub and is_main:
        try:
            summary["hub_url"] = push_adapter(out, recipe.hub.repo_id, private=recipe.hub.private)
        except HubPushError as err:
            log(str(err))
            summary["push_error"] = str(err)
    trainer.accelerator.wait_for_everyone()
    return summary


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


def _print_records(title: str, records: list[dict], before: list[dict] | None = None) -> None:
    base = {record_key(r): r["ppl"] for r in before or []}
    lines = [title]
    for r in records:
        key = record_key(r)
        was = f"  (before {base[key]:.3f})" if key in base else ""
        lines.append(f"  {r['policy']:>9} K={str(r['budget']):>5}: ppl {r['ppl']:.3f}{was}")
    log("\n".join(lines))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
