"""Recipes: every knob of a training run, as YAML, checked before any weights load.

A recipe is a few flat sections whose names follow `transformers.TrainingArguments`
(torchtune / axolotl style):

    model:    {source, dtype, attn_implementation}
    data:     {source, seq_len, heldout, ...}
    budget:   {policy, budget, sinks, recent, retention, scorer_hidden} -> msrnn_train.BudgetSpec;
              {mode, ramp_start, ramp_fraction, train_budgets, hybrid, hybrid_probe_tasks}: how training
              runs it (K over the steps, the unbounded layers)
    lora:     {r, alpha, dropout, target_modules, bias}
    loss:     {bounded_lm_weight, full_lm_weight, kl_weight, kl_temperature, teacher}: one weight per pass
    soft:     {tau_start, tau_end, hard_fraction}: soft-TOVA's temperature schedule (budget.mode soft)
    learned:  {relaxation, tau, capacity_weight, hard_fraction, train_lora, scorer_learning_rate}
    training: {output_dir, max_steps, learning_rate, ...}      -> TrainingArguments
    eval:     {every_n_steps, policies, budgets, max_windows, batch_size, at_start}
    wandb:    {project, name, mode}
    hub:      {push_to_hub, repo_id, private}
    deepspeed: path to a DeepSpeed JSON config, or null

The dataclass defaults *are* the embedded-default recipe (`recipes/smollm2_gutenberg.yaml`):
the real SmolLM2-135M on the Gutenberg books, TOVA with K = T/8, a run of a few minutes on a
laptop CPU. `load_recipe(path, overrides)` reads a YAML file, applies `--key value` overrides
(dotted keys for sections: `budget.budget=32`), checks every key, type and cross-field rule,
and raises one `RecipeError` whose message names the key and what is allowed. A key renamed since
a recipe was written (`RENAMED`) is read under its new name, with one warning naming both, so old
recipes and the recipe.yaml of saved runs keep loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError, RecipeWarning
from .hybrid import parse_hybrid
from .policies import POLICIES
from .retention import RELAXATIONS
from .retrieval_tasks import TASKS
from .spec import BudgetError, BudgetSpec

RECIPE_FILENAME = "recipe.yaml"

DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
BUDGET_MODES = ("hard", "soft")
TEACHERS = ("base", "self")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- sections
def knob(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):  # noqa: A002
    """A recipe key: its default and its help, in one declaration (TRL's `field(metadata={"help"})`).
    docs/recipes.md is generated from these (scripts/recipe_reference.py)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class ModelConfig:
    source: str = knob("smollm2", (
        '"smollm2" (embedded GGUF), a Hub id, a local dir, a .gguf file, "random:tiny-llama"'))
    dtype: str = knob("float32", "weights dtype: float32 | bfloat16 | float16")
    attn_implementation: str = knob("sdpa", "attention of the full-state teacher (and unbounded layers)")


@dataclass
class DataConfig:
    source: str = knob("gutenberg", '"gutenberg", .txt file/dir, .json/.jsonl/.parquet, a Hub dataset id')
    seq_len: int = knob(512, "training/eval window T; windows never cross a document")
    heldout: list[str] | int | float | None = knob(None, (
        "held-out documents: a list of names, a count, a fraction of the documents, or null (gutenberg: "
        "data.DEFAULT_HELDOUT; other sources: 10% of the documents, at least one)"))
    split_seed: int = knob(0, "which documents a count/fraction holds out")
    max_train_windows: int | None = knob(None, "cap on training windows (null: all)")
    stride: int | None = knob(None, "window stride within a document (null: seq_len, no overlap)")
    cache_tokens: bool = knob(True, "cache token ids under models.cache_dir()/tokens")
    retrieval_fraction: float = knob(0.0, (
        "share of the training rows that are generated retrieval prompts of seq_len tokens (0: none)"))
    retrieval_tasks: list[str] = knob(factory=lambda: ["mqar", "kv", "needles", "vartrack"], help=(
        "their tasks (msrnn_train.retrieval_tasks): mqar, kv, needles, vartrack"))
    augment_fraction: float = knob(0.0, (
        "share of the retrieval rows trained with retrieval augmentation: the best BM25 chunks of the row's "
        "context re-inserted before its question (msrnn_train.augment), as evaluate --augment shows them (0: none)"))
    augment_tokens: int | None = knob(None, (
        "tokens re-inserted at most in an augmented row (null: the budget's K minus 8, room for the question)"))
    augment_chunk_words: int = knob(4, "words per BM25 chunk of an augmented row (a chunk is shown with half a chunk more)")


@dataclass
class BudgetConfig:
    policy: str = knob("tova", "full | window | window_sink | sinks | h2o | tova | tova_head | learned | learned_head")
    budget: Any = knob(64, (
        'K: an int, a per-layer list, or {layer: K, "default": K}; a hybrid (some layers unbounded) is written '
        "as budget.hybrid (null layers here still load, with a warning)"))
    sinks: int = knob(4, "sinks (window+i) keeps the first i positions")
    recent: int | None = knob(None, "h2o's protected recent window (null: K // 2)")
    retention: str = knob("decay", (
        "learned policies: how a member's retention logit ranks it: decay (age * log sigmoid(logit); starts as "
        "window) | logit (the logit alone)"))
    scorer_hidden: int = knob(0, "learned policies: the retention scorer's hidden width (0: one linear layer)")
    mode: str = knob("hard", (
        "training only (not saved with the adapter; inference is always the exact process): hard: the exact "
        "process throughout (the measured default, results/headline_validation.md); soft: anneal the soft-TOVA "
        "relaxation to hard (soft.tau_start, tau_end, hard_fraction)"))
    ramp_start: int | None = knob(None, (
        "budget ramp (training only): K starts here and falls linearly to `budget` (null: no ramp; not with "
        "train_budgets)"))
    ramp_fraction: float = knob(0.5, "the ramp reaches `budget` after this fraction of the steps")
    train_budgets: list[int] | None = knob(None, (
        "multi-budget training: each optimizer step samples K from this list (null: always `budget`), so one "
        "adapter serves a range of budgets; `budget` stays the K saved with the adapter (not with ramp_start)"))
    hybrid: str | int | None = knob(None, (
        'layers kept unbounded (a hybrid): null (none), "auto:N" (the N layers whose heads put most attention'
        " on the answer's source over generated hybrid_probe_tasks prompts), \"random:N\", "
        '"first"/"middle"/"last", an index, or several joined by "+" ("3+17"); needs one integer budget for the '
        "other layers. The one notation for a hybrid: evaluate --full-layers reads the same strings"))
    hybrid_probe_tasks: list[str] | None = knob(None, (
        "the tasks of hybrid auto:N's probe set: mqar, kv, needles, vartrack (null: data.retrieval_tasks)"))
    sink_learning_rate: float = knob(0.05, (
        "window_sink: learning rate of the sink logits and values (no weight decay; a logit must move by units, "
        "which the LoRA's rate would take thousands of steps to do)"))
    sink_init: Any = knob(1.0, (
        "window_sink: the sink logits' start: a number for every head (1.0: the best constant, results/sink_init.md), "
        "or \"calibrate\": per head, the mean logsumexp of its logits on the first budget.sinks tokens under `sinks`, "
        "over the first 4 training windows, minus 2 (minus 1 with budget.sink_value), and with budget.sink_value "
        "each key/value head's sink value from the same windows (controller.calibrate_sinks; not for a resumed run)"))
    sink_value: bool = knob(True, (
        "window_sink: the virtual sink key also has a learned value per key/value head (starts at 0, or calibrated "
        "with sink_init: calibrate; exported as GraniteSWA v_proj/o_proj biases, results/sink_value.md); false: "
        "gpt-oss's logit-only sink (value 0, frozen)"))


@dataclass
class LoraConfigSection:
    r: int = knob(16, "LoRA rank")
    alpha: int = knob(32, "LoRA scale numerator (the update is scaled by alpha / r)")
    dropout: float = knob(0.0, "dropout on the LoRA input")
    target_modules: list[str] = knob(factory=lambda: list(LORA_TARGETS), help=(
        "the linear layers to adapt (their names in the model)"))
    bias: str = knob("none", "none | all | lora_only (peft)")
    init_adapter: str | None = knob(None, (
        "start from this trained adapter folder (its LoRA weights, and its scorer if it has one) instead of a "
        "fresh LoRA; its r/alpha/targets are used"))


@dataclass
class LossConfig:
    """One weight per pass (losses.bounded_objective): the bounded pass (the student, under the budget),
    the full-state pass (adapter on, no budget) and the KL that ties the two."""

    bounded_lm_weight: float = knob(1.0, "cross-entropy of the bounded pass (the student, under the budget)")
    full_lm_weight: float = knob(1.0, (
        "cross-entropy of the full-state pass (adapter on, no budget), so full-state quality keeps up"))
    kl_weight: float = knob(1.0, (
        "KL(full-state teacher || bounded student): the bounded pass imitates a full-state one; 0 turns the "
        "teacher off"))
    kl_temperature: float = knob(1.0, "softmax temperature of the distillation (the KL is scaled by T^2)")
    teacher: str = knob("self", (
        "the distillation teacher: base = the adapter off, full state (anchors to the base model); self = the"
        " adapter on, full state, detached (the bounded pass imitates the current full-state model)"))
    answer_weight: float = knob(1.0, (
        "weight of the answer tokens' cross-entropy in retrieval rows (data.retrieval_fraction)"))


@dataclass
class SoftConfig:
    """soft-TOVA's temperature schedule (budget.mode soft); how K varies is the budget section's."""

    tau_start: float = knob(1.0, "soft-TOVA temperature at step 0 ...")
    tau_end: float = knob(0.05, "... annealed geometrically to this ...")
    hard_fraction: float = knob(0.25, "... and the last fraction of the steps runs the exact (hard) process")


@dataclass
class LearnedConfig:
    relaxation: str = knob("ste", (
        "how gradients reach a learned policy's scorer: ste (hard forward, sigmoid keep probability backward) | "
        "decay (retention decay as an attention bias + capacity loss) | none (the scorer does not train)"))
    tau: float = knob(1.0, "ste: temperature of the keep probability sigmoid((priority - threshold) / tau)")
    capacity_weight: float = knob(1.0, "decay: weight of the capacity loss (expected held members above K)")
    hard_fraction: float = knob(0.25, (
        "the last fraction of the steps runs the exact hard process (no relaxation), as at inference (with "
        "train_lora: false nothing could train there, so the relaxation runs to the end)"))
    train_lora: bool = knob(True, "false: train the scorer only (the LoRA weights stay as loaded)")
    scorer_learning_rate: float | None = knob(None, "the scorer's learning rate (null: training.learning_rate)")


@dataclass
class TrainingConfig:
    output_dir: str = knob("outputs/smollm2-tova64", (
        "where checkpoints, the adapter, msrnn_budget.json and recipe.yaml go"))
    max_steps: int = knob(40, "optimizer steps")
    per_device_train_batch_size: int = knob(1, "windows per device per micro-batch")
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step")
    learning_rate: float = knob(1e-3, "peak learning rate of the LoRA weights")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    lr_scheduler_type: str = knob("cosine", "a transformers scheduler name: cosine, linear, constant, ...")
    warmup_steps: int = knob(2, "linear warm-up steps")
    max_grad_norm: float = knob(1.0, "gradient clipping (0: none)")
    optim: str = knob("adamw_torch", "a transformers optimizer name: adamw_torch, adamw_torch_fused, ...")
    seed: int = knob(42, "seeds the run: weights of random sources, data order, multi-budget sampling")
    bf16: bool = knob(False, "bfloat16 mixed precision")
    fp16: bool = knob(False, "float16 mixed precision (GPU)")
    gradient_checkpointing: bool = knob(False, (
        "activation checkpointing (non-reentrant: a layer's recompute runs the attention its forward ran)"))
    logging_steps: int = knob(1, "log the loss parts, tau, K and tokens/s every N steps")
    save_steps: int = knob(20, "checkpoint every N steps")
    save_total_limit: int | None = knob(2, "checkpoints kept (null: all)")
    resume_from_checkpoint: bool | str | None = knob(None, (
        "true: the last complete checkpoint in output_dir; or a path"))
    overwrite_output_dir: bool = knob(False, (
        "a run owns its output_dir: one holding another run (a different recipe) is refused unless this is "
        "true; its adapter is then replaced only when the new run succeeds"))
    dataloader_num_workers: int = knob(0, "DataLoader worker processes")


@dataclass
class EvalConfig:
    every_n_steps: int = knob(0, "bounded perplexity during training every N steps (0: only before/after)")
    policies: list[str] = knob(factory=lambda: ["tova", "full"], help=(
        "policies evaluated before and after training (full: once)"))
    budgets: list[int] = knob(help="K values for every bounded policy", factory=lambda: [64])
    max_windows: int = knob(8, "held-out windows, spread evenly over the held-out documents")
    batch_size: int = knob(1, "windows per evaluation forward")
    at_start: bool = knob(True, 'also measure the untrained model (the "before" column)')


@dataclass
class WandbConfig:
    project: str | None = knob("msrnn-train", "null: no W&B")
    name: str | None = knob(None, "the run's name (null: W&B picks one)")
    mode: str = knob("auto", "auto: online with an API key, else offline (with a message); online | offline | disabled")
    tags: list[str] = knob(help="W&B tags", factory=list)


@dataclass
class HubConfig:
    push_to_hub: bool = knob(False, "push the adapter folder to the Hugging Face Hub after training")
    repo_id: str | None = knob(None, "the Hub repository (user/name)")
    private: bool = knob(True, "create the repository private")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    loss: LossConfig = field(default_factory=LossConfig)
    soft: SoftConfig = field(default_factory=SoftConfig)
    learned: LearnedConfig = field(default_factory=LearnedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    deepspeed: str | None = knob(None, "DeepSpeed JSON config (e.g. recipes/deepspeed/zero2.json)")

    # ------------------------------------------------------------------ views
    def budget_spec(self) -> BudgetSpec:
        """The inference spec this run trains for (what gets saved; budget.mode is training's alone)."""
        b = self.budget
        return BudgetSpec(policy=b.policy, budget=b.budget, sinks=b.sinks, recent=b.recent, retention=b.retention,
                          scorer_hidden=b.scorer_hidden)

    def augment_max_tokens(self) -> int | None:
        """Tokens re-inserted at most in an augmented retrieval row: data.augment_tokens, else K - 8
        (at least 8); None when no row is augmented."""
        d = self.data
        if d.augment_fraction <= 0:
            return None
        return d.augment_tokens if d.augment_tokens is not None else max(int(self.budget.budget) - 8, 8)

    def probe_tasks(self) -> list[str]:
        """The tasks of budget.hybrid auto:N's probe set: budget.hybrid_probe_tasks, else data.retrieval_tasks."""
        b = self.budget
        return list(b.hybrid_probe_tasks if b.hybrid_probe_tasks is not None else self.data.retrieval_tasks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / RECIPE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, raw: dict | None) -> "Recipe":
        """A recipe from its sections (old key names read as their new ones, see `RENAMED`), validated."""
        recipe = _build(cls, rename_old_keys(raw or {}), "")
        recipe.validate()
        return recipe

    # ------------------------------------------------------------------ cross-field rules
    def validate(self) -> "Recipe":
        m, d, b, lo, ls, s, t, e, w, h = (self.model, self.data, self.budget, self.lora, self.loss, self.soft,
                                         self.training, self.eval, self.wandb, self.hub)
        _one_of("model.dtype", m.dtype, DTYPES)
        if not m.source:
            raise RecipeError("model.source: empty; give 'smollm2', a Hub id, a local directory or a .gguf file")
        if not str(d.source).strip():
            raise RecipeError("data.source: empty; give 'gutenberg', a .txt file, a folder of .txt files, a "
                              ".json/.jsonl/.parquet file with a 'text' column or a Hub dataset id")
        _at_least("data.seq_len", d.seq_len, 2)
        _at_least("data.max_train_windows", d.max_train_windows, 1)
        _at_least("data.stride", d.stride, 1)
        if isinstance(d.heldout, int) and not isinstance(d.heldout, bool) and d.heldout < 0:
            raise RecipeError(f"data.heldout: a count of documents must be >= 0, got {d.heldout}")
        if isinstance(d.heldout, float) and not 0.0 < d.heldout < 1.0:
            raise RecipeError(f"data.heldout: a fraction of documents must be in (0, 1), got {d.heldout}")

        if not 0.0 <= d.retrieval_fraction < 1.0:
            raise RecipeError(f"data.retrieval_fraction: must be in [0, 1), got {d.retrieval_fraction}")
        for i, task in enumerate(d.retrieval_tasks):
            _one_of(f"data.retrieval_tasks[{i}]", task, tuple(TASKS))
        if d.retrieval_fraction > 0 and not d.retrieval_tasks:
            raise RecipeError(f"data.retrieval_tasks: empty, but data.retrieval_fraction is {d.retrieval_fraction}; "
                              f"name at least one of {', '.join(TASKS)}")
        if not 0.0 <= d.augment_fraction <= 1.0:
            raise RecipeError(f"data.augment_fraction: must be in [0, 1], got {d.augment_fraction}")
        if d.augment_fraction > 0 and d.retrieval_fraction == 0:
            raise RecipeError(f"data.augment_fraction: {d.augment_fraction} augments retrieval rows, but "
                              f"data.retrieval_fraction is 0 (no retrieval rows)")
        if d.augment_tokens is not None:
            _at_least("data.augment_tokens", d.augment_tokens, 1)
        _at_least("data.augment_chunk_words", d.augment_chunk_words, 2)
        if d.augment_fraction > 0 and d.augment_tokens is None and not isinstance(self.budget.budget, int):
            raise RecipeError(f"data.augment_tokens: null means K - 8, but budget.budget is not one int "
                              f"({self.budget.budget!r}); set data.augment_tokens")
        if d.retrieval_fraction > 0 and d.seq_len < 64:
            raise RecipeError(f"data.seq_len: retrieval rows (data.retrieval_fraction) need >= 64 tokens, "
                              f"got {d.seq_len}")

        # the budget: BudgetSpec's own rules (K >= 1, known policy, h2o's recent <= K), then training's
        try:
            self.budget_spec().validate()
        except BudgetError as err:
            raise RecipeError(f"budget.{err}") from None
        _one_of("budget.mode", b.mode, BUDGET_MODES)
        if isinstance(b.sink_learning_rate, bool) or not isinstance(b.sink_learning_rate, (int, float)) or \
                not b.sink_learning_rate > 0:
            raise RecipeError(f"budget.sink_learning_rate: must be a number > 0, got {b.sink_learning_rate!r}")
        if b.sink_init != "calibrate" and (isinstance(b.sink_init, bool) or not isinstance(b.sink_init, (int, float))
                                           or not math.isfinite(b.sink_init)):
            raise RecipeError(f"budget.sink_init: a finite number or \"calibrate\", got {b.sink_init!r}")
        relaxable = [name for name, cls in POLICIES.items() if cls.relaxable]  # soft-TOVA's score rule
        if b.mode == "soft" and b.policy not in relaxable:
            raise RecipeError(
                f"budget.mode: 'soft' relaxes TOVA's evictions and needs policy {' or '.join(relaxable)}; "
                f"policy {b.policy!r} has no relaxation: use mode: hard")
        if b.train_budgets is not None:
            if b.policy == "full" or not isinstance(b.budget, int) or isinstance(b.budget, bool):
                raise RecipeError("budget.train_budgets: multi-budget training needs a bounded policy and one "
                                  f"integer budget.budget (got policy={b.policy!r}, budget={b.budget!r}); "
                                  "set it to null")
            if not b.train_budgets:
                raise RecipeError("budget.train_budgets: empty; give the K values to sample, e.g. [16, 32, 64], "
                                  "or null")
            for i, k in enumerate(b.train_budgets):
                _at_least(f"budget.train_budgets[{i}]", k, 1)
            if b.ramp_start is not None:
                raise RecipeError("budget.train_budgets: cannot be combined with budget.ramp_start; "
                                  "set one of them to null")
        if b.hybrid is not None:
            try:
                parse_hybrid(b.hybrid)
            except ValueError as err:
                raise RecipeError(f"budget.hybrid: {err}") from None
            if b.policy == "full" or not isinstance(b.budget, int) or isinstance(b.budget, bool):
                raise RecipeError(f"budget.hybrid: {b.hybrid!r} keeps some layers unbounded and bounds the others to "
                                  f"one integer budget.budget (got policy={b.policy!r}, budget={b.budget!r})")
        if b.hybrid_probe_tasks is not None:
            if not b.hybrid_probe_tasks:
                raise RecipeError(f"budget.hybrid_probe_tasks: empty; name at least one of {', '.join(TASKS)}, or "
                                  "null (data.retrieval_tasks)")
            for i, task in enumerate(b.hybrid_probe_tasks):
                _one_of(f"budget.hybrid_probe_tasks[{i}]", task, tuple(TASKS))
        if b.hybrid is not None and parse_hybrid(b.hybrid)[0] == "auto" and not self.probe_tasks():
            raise RecipeError(f"budget.hybrid_probe_tasks: {b.hybrid!r} probes the model, but data.retrieval_tasks "
                              f"(its default) is empty; name at least one of {', '.join(TASKS)}")
        as_hybrid = _null_layers_as_hybrid(b.budget) if b.policy != "full" else None
        if as_hybrid is not None:
            warnings.warn(f"budget.budget: {b.budget} makes a hybrid with null layers; write it as budget.budget: "
                          f"{as_hybrid[0]} with budget.hybrid: \"{as_hybrid[1]}\" (the one documented notation; this "
                          "form still loads)", RecipeWarning, stacklevel=2)
        if b.policy != "full" and isinstance(b.budget, dict) and "default" not in b.budget:
            warnings.warn(f"budget.budget: the map {b.budget} has no 'default', so every layer it does not name "
                          "is unbounded (full state); add e.g. default: 64 to bound them", RecipeWarning, stacklevel=2)
        ks = self.budget_spec().bounded_budgets()
        if ks and min(ks) >= d.seq_len:
            warnings.warn(f"budget.budget: K={min(ks)} >= data.seq_len={d.seq_len}: no state is ever evicted, "
                          f"so the bound has no effect; use K < seq_len (e.g. {max(1, d.seq_len // 8)} = T/8)",
                          RecipeWarning, stacklevel=2)

        ln = self.learned
        learned_policy = b.policy in POLICIES and POLICIES[b.policy].carries_value
        _one_of("learned.relaxation", ln.relaxation, RELAXATIONS)
        if ln.tau <= 0:
            raise RecipeError(f"learned.tau: must be > 0, got {ln.tau}")
        if ln.capacity_weight < 0:
            raise RecipeError(f"learned.capacity_weight: must be >= 0, got {ln.capacity_weight}")
        if not 0.0 <= ln.hard_fraction <= 1.0:
            raise RecipeError(f"learned.hard_fraction: must be in [0, 1], got {ln.hard_fraction}")
        if ln.scorer_learning_rate is not None and ln.scorer_learning_rate <= 0:
            raise RecipeError(f"learned.scorer_learning_rate: must be > 0 or null, got {ln.scorer_learning_rate}")
        if ln.relaxation == "decay" and ln.hard_fraction == 0 and ln.train_lora:
            raise RecipeError("learned.hard_fraction: 0 with relaxation 'decay' would never train under the exact "
                              "process that inference runs; give e.g. 0.25")
        changed = [f"learned.{f.name}" for f in dataclasses.fields(LearnedConfig)
                   if getattr(ln, f.name) != getattr(LearnedConfig(), f.name)]
        if changed and not learned_policy:
            learned_names = [n for n, c in POLICIES.items() if c.carries_value]
            raise RecipeError(f"{changed[0]}: has no effect with budget.policy {b.policy!r}; it applies to "
                              f"{' or '.join(learned_names)}")
        if not ln.train_lora and not lo.init_adapter:
            warnings.warn("learned.train_lora: false without lora.init_adapter trains the scorer on the untuned "
                          "base model (LoRA stays zero)", RecipeWarning, stacklevel=2)

        _at_least("lora.r", lo.r, 1)
        _at_least("lora.alpha", lo.alpha, 1)
        if not 0.0 <= lo.dropout < 1.0:
            raise RecipeError(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules:
            raise RecipeError("lora.target_modules: empty; name the projections to adapt, e.g. "
                              f"{LORA_TARGETS}")
        _one_of("lora.bias", lo.bias, ("none", "all", "lora_only"))

        for key in ("bounded_lm_weight", "full_lm_weight", "kl_weight"):
            if getattr(ls, key) < 0:
                raise RecipeError(f"loss.{key}: must be >= 0, got {getattr(ls, key)}")
        if ls.answer_weight < 0:
            raise RecipeError(f"loss.answer_weight: must be >= 0, got {ls.answer_weight}")
        if ls.answer_weight != 1.0 and d.retrieval_fraction == 0:
            warnings.warn("loss.answer_weight: has no effect without retrieval rows (data.retrieval_fraction: 0)",
                          RecipeWarning, stacklevel=2)
        if ls.bounded_lm_weight == 0 and ls.full_lm_weight == 0 and ls.kl_weight == 0:
            raise RecipeError("loss: bounded_lm_weight, full_lm_weight and kl_weight are all 0; nothing to train")
        _one_of("loss.teacher", ls.teacher, TEACHERS)

        if ls.kl_temperature <= 0:
            raise RecipeError(f"loss.kl_temperature: must be > 0, got {ls.kl_temperature}")

        if not 0 < s.tau_end <= s.tau_start:
            raise RecipeError(f"soft.tau_start/tau_end: need 0 < tau_end <= tau_start, got "
                              f"tau_start={s.tau_start}, tau_end={s.tau_end}")
        if not 0.0 <= s.hard_fraction < 1.0:
            raise RecipeError(f"soft.hard_fraction: must be in [0, 1), got {s.hard_fraction}")
        if not 0.0 < b.ramp_fraction <= 1.0:
            raise RecipeError(f"budget.ramp_fraction: must be in (0, 1], got {b.ramp_fraction}")
        if b.ramp_start is not None:
            if b.policy == "full" or not isinstance(b.budget, int) or isinstance(b.budget, bool):
                raise RecipeError("budget.ramp_start: a budget ramp needs one integer budget.budget "
                                  f"(got policy={b.policy!r}, budget={b.budget!r}); set it to null")
            if b.ramp_start < b.budget:
                raise RecipeError(f"budget.ramp_start: the ramp starts large and ends at budget.budget="
                                  f"{b.budget}; got {b.ramp_start} < {b.budget}")

        for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "save_steps"):
            _at_least(f"training.{key}", getattr(t, key), 1)
        _at_least("training.save_total_limit", t.save_total_limit, 1)
        _at_least("training.warmup_steps", t.warmup_steps, 0)
        _at_least("training.dataloader_num_workers", t.dataloader_num_workers, 0)
        if t.learning_rate <= 0:
            raise RecipeError(f"training.learning_rate: must be > 0, got {t.learning_rate}")
        if t.bf16 and t.fp16:
            raise RecipeError("training.bf16/fp16: choose at most one mixed precision")
        if not t.output_dir:
            raise RecipeError("training.output_dir: empty")
        if t.resume_from_checkpoint is False:
            t.resume_from_checkpoint = None
        schedulers, optimizers = _transformers_choices()
        if schedulers:
            _one_of("training.lr_scheduler_type", t.lr_scheduler_type, schedulers)
        if optimizers:
            _one_of("training.optim", t.optim, optimizers)

        _at_least("eval.every_n_steps", e.every_n_steps, 0)
        _at_least("eval.max_windows", e.max_windows, 0)
        _at_least("eval.batch_size", e.batch_size, 1)
        for i, p in enumerate(e.policies):
            _one_of(f"eval.policies[{i}]", p, tuple(POLICIES))
        for i, k in enumerate(e.budgets):
            _at_least(f"eval.budgets[{i}]", k, 1)
        if any(p != "full" for p in e.policies) and not e.budgets:
            raise RecipeError("eval.budgets: empty, but eval.policies has bounded policies; give at least one K")

        _one_of("wandb.mode", w.mode, WANDB_MODES)
        if h.push_to_hub and not h.repo_id:
            raise RecipeError("hub.repo_id: required when hub.push_to_hub is true (e.g. 'your-name/smollm2-tova64')")
        if h.repo_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", h.repo_id):
            raise RecipeError(f"hub.repo_id: {h.repo_id!r} is not a repository id like 'owner/name'")
        self._warn_no_effect()
        return self

    def _warn_no_effect(self) -> None:
        """A RecipeWarning naming each key set away from its default where nothing reads it."""
        d, b, ls, s, ln = self.data, self.budget, self.loss, self.soft, self.learned

        def changed(section, names) -> list[str]:
            default = type(section)()
            return [n for n in names if getattr(section, n) != getattr(default, n)]

        def warn(prefix: str, names: list[str], why: str) -> None:
            if names:
                keys = ", ".join(f"{prefix}.{n}" for n in names)
                warnings.warn(f"{keys}: {'has' if len(names) == 1 else 'have'} no effect {why}", RecipeWarning,
                              stacklevel=4)

        def users(key: str) -> str:
            return " or ".join(n for n, c in POLICIES.items() if key in c.spec_params)

        warn("loss", changed(ls, ("teacher", "kl_temperature")) if ls.kl_weight == 0 else [],
             "with loss.kl_weight 0 (no distillation)")
        warn("soft", changed(s, ("tau_start", "tau_end", "hard_fraction")) if b.mode == "hard" else [],
             "with budget.mode hard (only budget.mode soft anneals a relaxation)")
        warn("budget", changed(b, ("ramp_fraction",)) if b.ramp_start is None else [],
             "without budget.ramp_start (no budget ramp)")
        own = POLICIES[b.policy].spec_params if b.policy in POLICIES else {}
        warn("budget", ["recent"] if b.recent is not None and "recent" not in own else [],
             f"with budget.policy {b.policy!r} (it is {users('recent')}'s protected recent window)")
        eval_sinks = any("sinks" in POLICIES[p].spec_params for p in self.eval.policies if p in POLICIES)
        warn("budget", changed(b, ("sinks",)) if "sinks" not in own and not eval_sinks else [],
             f"with budget.policy {b.policy!r} and no policy that keeps sinks in eval.policies ({users('sinks')})")
        learned_policy = b.policy in POLICIES and POLICIES[b.policy].carries_value
        warn("budget", changed(b, ("retention", "scorer_hidden")) if not learned_policy else [],
             f"with budget.policy {b.policy!r} (they belong to a learned policy's scorer: "
             f"{' or '.join(n for n, c in POLICIES.items() if c.carries_value)})")
        sink_policy = b.policy in POLICIES and POLICIES[b.policy].attention_sink
        warn("budget", changed(b, ("sink_learning_rate", "sink_init", "sink_value")) if not sink_policy else [],
             f"with budget.policy {b.policy!r} (it trains the sink logits and values of "
             f"{' or '.join(n for n, c in POLICIES.items() if c.attention_sink)})")
        probe = b.hybrid is not None and parse_hybrid(b.hybrid)[0] == "auto"
        probe_reads_data = probe and b.hybrid_probe_tasks is None
        warn("data", changed(d, ("retrieval_tasks",)) if d.retrieval_fraction == 0 and not probe_reads_data else [],
             "without retrieval rows (data.retrieval_fraction: 0) or a budget.hybrid auto:N probe that reads it "
             "(budget.hybrid_probe_tasks: null)")
        warn("budget", ["hybrid_probe_tasks"] if b.hybrid_probe_tasks is not None and not probe else [],
             "without budget.hybrid auto:N (only auto:N probes the model)")
        if learned_policy:
            warn("learned", changed(ln, ("tau",)) if ln.relaxation != "ste" else [],
                 f"with learned.relaxation {ln.relaxation!r} (it is ste's temperature)")
            warn("learned", changed(ln, ("capacity_weight",)) if ln.relaxation != "decay" else [],
                 f"with learned.relaxation {ln.relaxation!r} (it weighs decay's capacity loss)")
            warn("learned", changed(ln, ("hard_fraction",)) if ln.relaxation == "none" else [],
                 "with learned.relaxation 'none' (the exact process runs throughout)")


def _null_layers_as_hybrid(budget) -> tuple[int, str] | None:
    """(K, budget.hybrid choice) for a per-layer budget whose layers are either one K or null
    (unbounded), i.e. a hybrid that budget.hybrid writes; None for anything else."""
    def unbounded(v):
        return v is None or v in ("full", "inf")

    if isinstance(budget, list):
        layers = dict(enumerate(budget))
    elif isinstance(budget, dict) and isinstance(budget.get("default"), int):
        layers = {k: v for k, v in budget.items() if k != "default"}
    else:
        return None
    full = sorted(int(k) for k, v in layers.items() if unbounded(v))
    ks = {v for v in layers.values() if not unbounded(v)} | ({budget["default"]} if isinstance(budget, dict) else set())
    if not full or len(ks) != 1 or any(isinstance(k, bool) or not isinstance(k, int) for k in ks):
        return None
    return ks.pop(), "+".join(map(str, full))


# ----------------------------------------------------------------------------- renamed keys
# old dotted key -> its new name. Old recipes and saved runs' recipe.yaml keep loading: each old key
# is read as its new one, with one RecipeWarning naming both; setting both is an error.
RENAMED = {
    "soft.budget_ramp_start": "budget.ramp_start",  # how K varies lives in `budget` (issue 23)
    "soft.ramp_fraction": "budget.ramp_fraction",
    "loss.lm_weight": "loss.bounded_lm_weight",  # each loss weight names its pass
}


def rename_old_keys(raw: dict, warn: bool = True) -> dict:
    """A copy of the recipe mapping `raw` with every old key of `RENAMED` moved to its new name
    (a RecipeWarning each when `warn`); a recipe that sets both names of one key is a RecipeError."""
    if not isinstance(raw, dict):
        return raw
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in RENAMED.items():
        (old_sec, old_key), (new_sec, new_key) = old.split("."), new.split(".")
        section = out.get(old_sec)
        if not isinstance(section, dict) or old_key not in section:
            continue
        if not isinstance(out.get(new_sec) or {}, dict):
            continue  # not a section: _build names the problem
        target = out[new_sec] = out.get(new_sec) or {}
        if new_key in target:
            raise RecipeError(f"{old}: set together with {new}, its new name; keep only {new}")
        target[new_key] = section.pop(old_key)
        if warn:
            warnings.warn(f"recipe: {old} is now {new}; read as such", RecipeWarning, stacklevel=3)
    return out


def _rename_old_overrides(pairs: dict) -> dict:
    """`rename_old_keys` for dotted override keys: an old name overrides the recipe's new one."""
    out = {}
    for key, value in pairs.items():
        new = RENAMED.get(key)
        if new is not None:
            if new in pairs:
                raise RecipeError(f"{key}: set together with {new}, its new name; keep only {new}")
            warnings.warn(f"recipe: {key} is now {new}; read as such", RecipeWarning, stacklevel=3)
        out[new or key] = value
    return out


# ----------------------------------------------------------------------------- loading
def load_recipe(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Read a recipe (None: the embedded default), apply overrides, validate; raises RecipeError.

    `overrides` is either CLI tokens (`["--budget.budget", "32", "--training.max_steps=10"]`) or a
    dict of dotted keys (`{"budget.budget": 32}`); values given as strings are parsed as YAML scalars.
    Relative paths in the recipe (deepspeed) are resolved against the working directory, then the
    recipe's folder and its parent.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{path}: not a text (UTF-8 YAML) file; is it a recipe?") from None
        except OSError as err:
            raise RecipeError(f"{path}: cannot read the recipe ({err.strerror or err})") from None
        if "\x00" in text:
            raise RecipeError(f"{path}: a binary file, not a YAML recipe")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        if raw is None or raw == {}:
            raise RecipeError(f"{path}: the recipe is empty; start from a shipped one (recipes/tiny.yaml, "
                              "recipes/smollm2_gutenberg.yaml), or give no recipe path to run the embedded default")
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
        raw = rename_old_keys(raw)  # before the overrides, which may name a key by either name
    if overrides:
        pairs = _rename_old_overrides(
            parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides))
        for key, value in pairs.items():
            _set_dotted(raw, key, _yaml_scalar(value) if isinstance(value, str) else value)
    recipe = Recipe.from_dict(raw)
    if recipe.deepspeed and path is not None:
        recipe.deepspeed = _resolve_relative(recipe.deepspeed, path.parent)
    return recipe


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """`--a.b value` / `--a.b=value` tokens -> {"a.b": "value"} (values still strings)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise RecipeError(f"override {tok!r}: expected --key value (e.g. --training.max_steps 10)")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise RecipeError(f"override --{key}: needs a value (e.g. --{key} VALUE or --{key}=VALUE)")
            value = tokens[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _yaml_scalar(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_relative(value: str, recipe_dir: Path) -> str:
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    for base in (recipe_dir, recipe_dir.parent):
        if (base / p).exists():
            return str((base / p).resolve())
    return value  # checked when the run starts (see train.check_runtime)


# ----------------------------------------------------------------------------- typed building
def _build(cls, raw, where: str):
    """Instantiate dataclass `cls` from `raw`, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a section (a mapping of keys), got {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" Did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise RecipeError(f"{dotted}: unknown key.{hint} Allowed in {where or 'a recipe'}: {', '.join(allowed)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, dotted)
        else:
            kwargs[key] = _check_type(dotted, value, hint)
    return cls(**kwargs)


def _check_type(key: str, value, hint):
    """Return `value` (ints widened to float where a float is expected) or raise RecipeError."""
    ok, coerced = _matches(value, hint)
    if not ok:
        raise RecipeError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return coerced


def _matches(value, hint):
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        # try exact kinds first so that 1 stays an int in `int | float`
        for arg in sorted(args, key=lambda a: a is float):
            ok, coerced = _matches(value, arg)
            if ok:
                return True, coerced
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = _matches(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # PyYAML reads `1e-3` (no dot) as a string; accept what is plainly a number
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
            return True, float(value)
        return False, None
    if hint is str:
        return isinstance(value, str), value
    return isinstance(value, hint), value


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_type_name(item)}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}: {value!r} is not allowed.{hint} Allowed: {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low: int) -> None:
    if value is not None and value < low:
        raise RecipeError(f"{key}: must be >= {low}, got {value}")


def _transformers_choices() -> tuple[tuple, tuple]:
    try:
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames
    except Exception:  # noqa: BLE001 - the values are then checked by TrainingArguments itself
        return (), ()
    return tuple(s.value for s in SchedulerType), tuple(o.value for o in OptimizerNames)
