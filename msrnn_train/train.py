"""Fine-tune a decoder LLM to keep its quality as a finite multi-state RNN (bounded KV cache).

    accelerate launch msrnn_train/train.py recipes/mistral_tova512.yaml [--key value ...]
    python -m msrnn_train.train recipes/smollm2_gutenberg.yaml --training.max_steps 10
    python -m msrnn_train.train RECIPE.yaml --validate     # every check that needs no weights; print the recipe
    python -m msrnn_train.train                            # the embedded default (SmolLM2 on Gutenberg)

One run, in named stages (`train()` runs `BoundedRun`'s, top to bottom):
  setup    - every check that needs no weights (`preflight`, also `--validate`), seeds, output folder,
             W&B; the base model and tokenizer, a LoRA adapter (peft), the budget (apply_budget);
             documents -> held-out split by document -> cached tokens -> fixed windows;
  evaluate - held-out perplexity under the budget before training (the baseline) ...
  train    - transformers.Trainer with the bounded LM loss, optionally an LM term on the full-state
             pass and a KL from a full-state teacher (the same weights, no budget; adapter off or
             on), soft-TOVA annealed to hard, K fixed, ramped or sampled per step (multi-budget);
  save     - adapter, tokenizer, msrnn_budget.json, recipe.yaml: `hub.load_bounded(dir)` restores
             the bounded model in one call;
  evaluate - ... and after it;
  publish  - eval_results.json, a model card, optionally a push to the Hugging Face Hub.
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

from msrnn_train.controller import (apply_budget, calibrate_sinks, get_controller, load_budget_modules,
                                   set_soft_temperature)
from msrnn_train.data import DataWarning, build_windows, looks_like_path, readable_offline, training_texts
from msrnn_train.errors import log
from msrnn_train.evaluate import record_key
from msrnn_train.hub import HubPushError, model_card, push_adapter
from msrnn_train.models import add_lora, base_model_id, load_base_model, model_config
from msrnn_train.recipe import Recipe, RecipeError, RecipeWarning, load_recipe
from msrnn_train.hybrid import resolve_hybrid
from msrnn_train.retrieval_data import training_dataset
from msrnn_train.run_folder import REPLACED, claim_output_dir, resolve_resume, set_aside
from msrnn_train.sink import sinks
from msrnn_train.spec import BudgetError
from msrnn_train.tracking import finish_wandb, setup_wandb, wandb_wanted
from msrnn_train.trainer import (BoundedTrainer, BudgetScheduleCallback, CheckpointingCallback, SaveSpecCallback,
                                 TrainingFailed, check_loss_curve, evaluate_run, peak_memory_mb,
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


# ============================================================================ the run, in stages
def train(recipe: Recipe, callbacks: list | tuple = ()) -> dict:
    """Run one recipe, stage by stage (`BoundedRun`); returns a summary (output_dir, eval records
    before/after, throughput, the model and tokenizer)."""
    run = BoundedRun(recipe, callbacks)
    run.setup()
    run.evaluate("before")
    run.train()
    run.save()
    run.evaluate("after")
    return run.publish()


class BoundedRun:
    """One training run in named stages (torchtune's recipe class): `setup` (run folder, model and
    tokenizer, adapter, budget, data), `evaluate("before")`, `train`, `save` (the adapter folder),
    `evaluate("after")`, `publish` (results, model card, W&B, the Hub). The parts it wires live in
    the library; which rank does what, ZeRO-3 included, is decided once, in `_ranks`."""

    def __init__(self, recipe: Recipe, callbacks: list | tuple = ()):
        self.recipe, self.callbacks = recipe, list(callbacks)
        self.out = Path(recipe.training.output_dir)
        self.before: list[dict] = []  # held-out records of the untrained model ...
        self.after: list[dict] = []  # ... and of the trained one
        self.summary: dict = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        self._setup_run()
        self.model, self.tokenizer = self._setup_model()
        self.model = add_lora(self.model, self.recipe)  # the adapter (lora section; lora.init_adapter's weights)
        self._setup_budget()
        self.model.to(self.args.device)  # this rank's device (ZeRO-2 keeps whole weights on every rank)
        self._setup_data()
        self._setup_sinks()

    def _setup_run(self) -> None:
        """Every check that needs no weights (`preflight`: bad data, a taken output folder, ... stop
        here), the TrainingArguments, the seed, the output folder and W&B."""
        r = self.recipe
        self.texts, self.resume, self.replaced = preflight(r)
        self.spec = r.budget_spec()
        self.args = training_arguments(r)
        self.args.distributed_state.wait_for_everyone()  # every rank decided on the same files before any are written
        set_seed(r.training.seed)
        self._ranks()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            set_aside(self.out, self.replaced)
            if not (self.out / "adapter_config.json").exists():  # marks the folder as this run's; an adapter
                r.save(self.out)  # already there keeps its own recipe until this run's adapter replaces it
        self.use_wandb = setup_wandb(r, self.out, resuming=self.resume is not None) if self.is_main \
            else wandb_wanted(r)
        self.args.report_to = ["wandb"] if self.use_wandb else []

    def _ranks(self) -> None:
        """Which rank does what: the one place DeepSpeed ZeRO-3 changes the run. Rank 0 writes every
        file. ZeRO-3 shards the weights, so every forward pass is a collective: all ranks evaluate
        (rank 0 still writes); and weights loaded under zero.Init have no gather hooks until the
        Trainer's engine exists, so the untrained baseline waits until after training, measured with
        the adapter off (the untrained model is the base: LoRA starts at B = 0). Saving is every
        rank's under any launch (`trainer.save_outputs` gathers ZeRO-3's shards collectively)."""
        self.is_main = self.args.process_index == 0
        zero3 = False
        if self.recipe.deepspeed:
            from transformers.integrations import is_deepspeed_zero3_enabled

            zero3 = is_deepspeed_zero3_enabled()
        self.evaluates = self.is_main or zero3  # the ranks that run evaluation forwards
        self.baseline_after_training = zero3

    def _setup_model(self):
        """The base model and its tokenizer (model section); the budget must fit its config."""
        m = self.recipe.model
        try:
            model, tokenizer = load_base_model(m.source, m.dtype, attn_implementation=m.attn_implementation)
        except (OSError, RuntimeError, ValueError) as err:
            if isinstance(err, RecipeError):
                raise
            raise RecipeError(f"model.source: {m.source!r} could not be loaded: {err}") from None
        try:
            self.spec.validate_for(model.config)
        except BudgetError as err:
            raise RecipeError(f"budget.{err}") from None
        model.config.use_cache = False
        return model, tokenizer

    def _setup_budget(self) -> None:
        """The bounded process on the adapted model (budget section): which layers stay unbounded
        (budget.hybrid; auto:N probes the model), then `apply_budget`; a learned policy's scorer
        as the resumed checkpoint (or lora.init_adapter) left it (the LoRA weights: the Trainer / add_lora)."""
        r = self.recipe
        if r.budget.hybrid is not None:
            self.spec = resolve_hybrid(r, self.model, self.tokenizer, self.spec)
            log(f"budget.hybrid {r.budget.hybrid!r}: unbounded layers "
                f"{[i for i, k in enumerate(self.spec.budget) if k is None]}")
        apply_budget(self.model, self.spec)
        if self.resume is not None:
            load_budget_modules(self.model, self.resume)
        elif r.lora.init_adapter:
            load_budget_modules(self.model, r.lora.init_adapter)

    def _setup_data(self) -> None:
        """Documents -> held-out split by document -> cached tokens -> fixed windows (data section)."""
        seq_len = self.recipe.data.seq_len
        self.train_windows, self.eval_windows = build_windows(self.recipe, self.tokenizer, self.texts)
        log(f"data: {len(self.train_windows)} training windows, {len(self.eval_windows)} held-out windows of "
            f"{seq_len} tokens")
        if len(self.train_windows) == 0:
            raise RecipeError(f"data.seq_len: no training document is {seq_len} tokens long")

    def _setup_sinks(self) -> None:
        """A sink policy's sinks at a fresh start (budget.sink_init): the logit one number for every
        head and the value 0, or both calibrated per head on the first training windows
        (`calibrate_sinks`). With budget.sink_value false the values stay 0 and frozen. A resumed
        run or an init_adapter keeps the sinks it loaded."""
        r = self.recipe
        found = sinks(self.model)
        if not found:
            return
        if not r.budget.sink_value:
            for s in found.values():
                s.value.requires_grad_(False)
        if self.resume is not None or r.lora.init_adapter:
            return
        if r.budget.sink_init == "calibrate":
            windows = self.train_windows[:4].to(self.args.device)
            values = calibrate_sinks(self.model, self.spec.budget, windows, first=r.budget.sinks,
                                     value=r.budget.sink_value)
            flat = torch.cat(list(values.values()))
            log(f"budget.sink_init calibrate: {flat.numel()} sink logits on {windows.shape[0]} training windows, "
                f"mean {flat.mean():.2f}, range [{flat.min():.2f}, {flat.max():.2f}]"
                + (f"; sink values, mean norm per key/value head "
                   f"{torch.stack([s.value.norm(dim=-1).mean() for s in found.values()]).mean():.2f}"
                   if r.budget.sink_value else ""))
        else:
            with torch.no_grad():
                for s in found.values():
                    s.logit.fill_(float(r.budget.sink_init))
                    s.value.zero_()

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        """`BoundedTrainer` with the budget's schedule (soft temperature, ramp or sampled K) and the
        periodic evaluation; a diverged run stops here, unsaved. Afterwards the model runs the
        exact, full-K process."""
        r = self.recipe
        schedule = BudgetScheduleCallback(r, self.spec)
        cbs = [schedule, SaveSpecCallback(r, self.spec)]
        if r.training.gradient_checkpointing and r.loss.full_lm_weight > 0:
            cbs.append(CheckpointingCallback(r))
        self.trainer = trainer = BoundedTrainer(
            model=self.model, args=self.args, train_dataset=training_dataset(r, self.train_windows, self.tokenizer),
            data_collator=default_data_collator,
            processing_class=self.tokenizer, callbacks=[*cbs, *self.callbacks], recipe=r, schedule=schedule)
        self.periodic = periodic_eval_callback(r, self.eval_windows, self.tokenizer, self.before) \
            if self.evaluates else None
        if self.periodic is not None:
            self.periodic.attach(trainer)  # its metrics go through trainer.log (console, W&B, log_history)
        t0 = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
        seconds = time.perf_counter() - t0
        check_loss_curve(trainer.state.log_history, r, self.model.config.vocab_size)  # a diverged run is not saved
        set_soft_temperature(self.model, None)
        bare = trainer.accelerator.unwrap_model(self.model)
        apply_budget(bare, self.spec)  # the exact, full-K process from here on
        get_controller(bare).relaxation = None
        self.summary = {
            "output_dir": str(self.out), "train_metrics": output.metrics, "train_seconds": seconds,
            "tokens_per_second": trainer.tokens_seen * self.args.world_size / max(seconds, 1e-9),
            "peak_memory_mb": peak_memory_mb(), "log_history": trainer.state.log_history,
            "before": self.before, "after": [], "model": self.model, "tokenizer": self.tokenizer}

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, when: str) -> list[dict]:
        """Held-out perplexity under the budget (`trainer.evaluate_run`: the training spec and
        recipe.eval's grid, exact process), `before` or `after` training; rank 0 prints it. The
        untrained baseline is measured once (eval_before.json keeps it for a resumed run); after
        training, the periodic evaluation's final records are reused when there are any."""
        r, windows = self.recipe, self.eval_windows
        if when == "before":
            if r.eval.at_start and len(windows) and self.is_main and not self.baseline_after_training:
                self.before = self._baseline()
                _print_records("held-out perplexity before training", self.before)
            self.args.distributed_state.wait_for_everyone()  # other ranks wait for the baseline evaluation
            return self.before
        if not (len(windows) and self.evaluates):
            return self.after
        if self.baseline_after_training and r.eval.at_start and not self.before:
            self.before = self._baseline()
        final = [rec for rec in getattr(self.periodic, "final_records", None) or [] if rec.get("adapted", True)]
        self.after = [{k: v for k, v in rec.items() if k != "adapted"} for rec in final] or \
            evaluate_run(self.model, windows, r, self.spec, desc="after")
        if self.is_main:
            _print_records("held-out perplexity after training", self.after, self.before)
        return self.after

    def _baseline(self) -> list[dict]:
        """The untrained model's records: eval_before.json's when a resumed run (or a late ZeRO-3
        baseline) finds it, else measured (adapter off when measured after training) and written."""
        late = self.baseline_after_training
        cached = _load_json(self.out / _EVAL_BEFORE) if self.resume is not None or late else None
        if cached:
            return cached
        records = evaluate_run(self.model, self.eval_windows, self.recipe, self.spec, desc="before",
                                adapter_on=not late)
        if self.is_main:
            _write_json(self.out / _EVAL_BEFORE, records)
        return records

    # ---------------------------------------------------------------- save
    def save(self) -> None:
        """The adapter folder `hub.load_bounded` reloads: adapter, tokenizer, msrnn_budget.json,
        recipe.yaml (`trainer.save_outputs`, on every rank); a replaced run's checkpoints go now."""
        self.trainer.accelerator.wait_for_everyone()
        save_outputs(self.trainer, self.tokenizer, self.recipe, self.spec, self.out)
        if self.is_main and self.replaced is not None:
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)  # the replaced run's checkpoints: now superseded

    # ---------------------------------------------------------------- publish
    def publish(self) -> dict:
        """eval_results.json and the model card (README.md) beside the adapter, the W&B summary, and
        optionally the push to the Hub (a failed push is reported in the summary, not raised)."""
        r, out, summary = self.recipe, self.out, self.summary
        summary["before"], summary["after"] = self.before, self.after
        if self.is_main:
            _write_json(out / EVAL_FILENAME, {k: summary[k] for k in ("before", "after", "train_metrics",
                                                                      "train_seconds", "tokens_per_second",
                                                                      "peak_memory_mb")})
            (out / "README.md").write_text(model_card(r, self.spec, self.after, base_model_id(r.model.source),
                                                      baseline_records=self.before))
            log(f"saved the bounded adapter to {out}  (reload: msrnn_train.hub.load_bounded({str(out)!r}))")
            log(f"throughput {summary['tokens_per_second']:.1f} tokens/s, peak memory "
                f"{summary['peak_memory_mb']:.0f} MB, {summary['train_seconds']:.1f} s")
            if self.use_wandb:
                finish_wandb(summary)
        if r.hub.push_to_hub and self.is_main:
            try:
                summary["hub_url"] = push_adapter(out, r.hub.repo_id, private=r.hub.private)
            except HubPushError as err:
                log(str(err))
                summary["push_error"] = str(err)
        self.trainer.accelerator.wait_for_everyone()
        return summary


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
