"""The Trainer of a bounded run and the callbacks that drive it.

* `BoundedTrainer` - transformers' Trainer with the bounded LM loss, an optional LM term on the
  full-state pass and a KL from a full-state teacher (`losses.bounded_objective`);
* callbacks - `BudgetScheduleCallback` (soft-TOVA's temperature, the budget ramp, multi-budget K
  before every step), `CheckpointingCallback`, `SaveSpecCallback`, `FiniteGuard`, and the periodic
  held-out evaluation (`BoundedEvalCallback`);
* `training_arguments(recipe)` - the TrainingArguments of a recipe;
* `save_outputs` - the adapter folder that `hub.load_bounded` reloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .controller import (apply_budget, checkpoint_context_fn, full_state, get_budget, get_controller, hard,
                         save_budget_modules, set_layer_budget, set_soft_temperature)
from .evaluate import evaluate_specs, record_key, full_ppl_of, grid_specs, markdown_table
from .losses import bounded_objective
from .models import base_model_id
from .recipe import Recipe
from .retention import scorers
from .sink import sinks
from .soft import tau_at
from .spec import BudgetSpec, budget_key, budget_label


class TrainingFailed(RuntimeError):
    """The run went wrong (a non-finite loss or gradient, a diverged loss); nothing was saved."""


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model


# ----------------------------------------------------------------------------- training
class BudgetScheduleCallback(TrainerCallback):
    """Before every optimizer step: soft-TOVA's temperature (recipe.soft) and K (recipe.budget: the
    ramp's or a multi-budget run's sample)."""

    def __init__(self, recipe: Recipe, spec: BudgetSpec):
        self.recipe, self.spec = recipe, spec
        self.tau: float | None = None
        self.k: int | None = spec.budget if isinstance(spec.budget, int) and spec.policy != "full" else None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        s, b, total, step = self.recipe.soft, self.recipe.budget, self.recipe.training.max_steps, state.global_step
        bounded = _unwrap(model)
        if get_budget(bounded) is None or get_budget(bounded).to_dict() != self.spec.to_dict():
            apply_budget(bounded, self.spec)  # an evaluation in between may have left another spec
        self.tau = tau_at(step, total, s.tau_start, s.tau_end, s.hard_fraction) \
            if b.mode == "soft" else None
        set_soft_temperature(bounded, self.tau)
        ln = self.recipe.learned  # a learned policy: relaxed until the last hard_fraction of the steps
        ctrl = get_controller(bounded)
        # (training the scorer alone, the hard process has nothing to train: the relaxation runs to the end)
        relaxed = ln.relaxation != "none" and (step < round(total * (1.0 - ln.hard_fraction)) or not ln.train_lora)
        ctrl.relaxation, ctrl.relax_tau = (ln.relaxation if relaxed else None), ln.tau
        if b.ramp_start is not None:
            self.k = budget_at(step, total, b.ramp_start, b.budget, b.ramp_fraction)
            set_layer_budget(bounded, self.k)
        elif b.train_budgets:
            self.k = sampled_budget(b.train_budgets, self.recipe.training.seed, step)
            set_layer_budget(bounded, self.k)


def budget_at(step: int, total: int, start: int, end: int, ramp_fraction: float = 0.5) -> int:
    """The budget ramp's K at a step (budget.ramp_start): linear from `start` states down to `end`
    over the first ramp_fraction of training, then `end`."""
    ramp = max(1, int(total * ramp_fraction))
    if step >= ramp:
        return end
    return int(round(start + (end - start) * step / ramp))


def sampled_budget(budgets: list[int], seed: int, step: int) -> int:
    """Multi-budget training's K at an optimizer step: uniform over `budgets`, a function of
    (seed, step) alone, so a resumed run samples the same sequence."""
    return int(random.Random(seed * 1_000_003 + step).choice(list(budgets)))


class CheckpointingCallback(TrainerCallback):
    """Activation checkpointing whose recompute runs each layer's forward attention again
    (`controller.checkpoint_context_fn`): needed when one step has a bounded and a full-state pass
    with gradients (loss.full_lm_weight > 0). Trainer.train() enables checkpointing just before
    on_train_begin; this re-enables it with the context function."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        enable_checkpointing(_unwrap(model), {"use_reentrant": False, "context_fn": checkpoint_context_fn(
            _unwrap(model))})


def enable_checkpointing(model, kwargs: dict) -> None:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class SaveSpecCallback(TrainerCallback):
    """Every checkpoint folder also holds the budget, the recipe and a learned policy's scorer, so
    it reloads bounded too and a resumed run continues the same scorer."""

    def __init__(self, recipe: Recipe, spec: BudgetSpec):
        self.recipe, self.spec = recipe, spec

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                self.spec.save(ckpt)
                self.recipe.save(ckpt)
                if model is not None:
                    save_budget_modules(_unwrap(model), ckpt)


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
    """Trainer whose loss is `losses.bounded_objective`: `bounded_lm_weight * CE(bounded student) +
    full_lm_weight * CE(full-state pass, adapter on) + kl_weight * KL(full-state teacher || student)`
    (+ a learned policy's capacity term). The teacher is the same weights with no budget and the
    adapter off (`loss.teacher: base`) or on and detached (`self`): no copy."""

    def __init__(self, *args, recipe: Recipe, schedule: BudgetScheduleCallback, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg = recipe.loss
        self.learned_cfg = recipe.learned
        self.sink_learning_rate = recipe.budget.sink_learning_rate
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
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        bare = self.accelerator.unwrap_model(model)
        loss, parts, outputs = bounded_objective(
            model, inputs, self.loss_cfg,
            teacher_fn=lambda ids, mask, adapter: full_state_logits(bare, ids, mask, adapter=adapter),
            full_state_ctx=lambda: full_state(bare),
            capacity_fn=lambda: self._capacity_term(model),  # the decay relaxation's capacity loss (learned policies)
            capacity_weight=self.learned_cfg.capacity_weight)
        if model.training:
            n = int(inputs["input_ids"].numel())
            self.tokens_seen += n
            self._tokens_since_log += n
            for key in ("lm_loss", "kl_loss", "full_lm_loss"):  # device tensors: no host sync per step
                if parts[key] is not None:
                    self._parts[key] += parts[key].detach().float()
            self._parts_n += 1
        return (loss, outputs) if return_outputs else loss

    def _capacity_term(self, model):
        ctrl = get_controller(self.accelerator.unwrap_model(model))
        if ctrl is None or not ctrl.aux_losses:
            return None
        term = torch.stack(ctrl.aux_losses).mean()
        ctrl.aux_losses.clear()
        return term

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer; a learned policy's scorer in its own group when
        `learned.scorer_learning_rate` is set, a sink policy's logits and values in theirs at
        `budget.sink_learning_rate` (no weight decay in either)."""
        opt = super().create_optimizer(*args, **kwargs)
        lr = self.learned_cfg.scorer_learning_rate
        found = [p for s in scorers(self.model).values() for p in s.parameters() if p.requires_grad]
        if lr is not None and found:
            _own_group(opt, found, lr)
        found = [p for s in sinks(self.model).values() for p in (s.logit, s.value) if p.requires_grad]
        if found:
            _own_group(opt, found, self.sink_learning_rate)
        return opt

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


# recipe.training keys the run handles itself (train.py); every other one is the TrainingArguments
# field of the same name, passed through as it is
RUN_KEYS = ("resume_from_checkpoint", "overwrite_output_dir", "gradient_checkpointing")


def training_arguments(recipe: Recipe) -> TrainingArguments:
    """The TrainingArguments of a recipe: its `training` section, plus what every bounded run sets."""
    t = recipe.training
    same = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name not in RUN_KEYS}
    # transformers >= 5.x calls it activation checkpointing; the recipe keeps the familiar name
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    checkpointing = {ckpt: t.gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None}
    return TrainingArguments(
        **same, **checkpointing, data_seed=t.seed, logging_first_step=True, save_strategy="steps",
        dataloader_pin_memory=torch.cuda.is_available(), remove_unused_columns=False, report_to=[],
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every forward
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (FiniteGuard then stops the run)
        deepspeed=recipe.deepspeed, run_name=recipe.wandb.name,
        # use_cpu would make transformers build a plain CPU state and skip DeepSpeed's own
        # distributed init (zero.Init would then see world size 1); DeepSpeed on a CPU runs on
        # its CPU accelerator instead
        use_cpu=not torch.cuda.is_available() and not recipe.deepspeed,
    )


# ----------------------------------------------------------------------------- evaluation during training
def evaluate_run(model, windows: torch.Tensor, recipe: Recipe, train_spec: BudgetSpec, desc: str = "",
                 adapter_on: bool = True) -> list[dict]:
    """A run's held-out evaluation: perplexity, hard process, of every spec of `eval_specs`; the
    model's training budget is put back afterwards. Records: {policy, budget, ppl, nll, tokens}
    (`evaluate.evaluate_specs`)."""
    return evaluate_specs(_unwrap(model), windows, eval_specs(recipe, train_spec), recipe.eval.batch_size,
                          adapter_on=adapter_on, desc=f"eval {desc}")


def eval_specs(recipe: Recipe, train_spec: BudgetSpec) -> list[BudgetSpec]:
    """The training spec first, then eval.policies x eval.budgets (`full` once), no repeats
    (`evaluate.grid_specs`: the training policy's entries keep its spec's form, K changed)."""
    return grid_specs(recipe.eval.policies, recipe.eval.budgets, own=train_spec, own_first=True,
                      sinks=recipe.budget.sinks)


def periodic_eval_callback(recipe: Recipe, eval_windows, tokenizer, before: list[dict]):
    """A BoundedEvalCallback when eval.every_n_steps > 0 (None: evaluate before and after only)."""
    if recipe.eval.every_n_steps <= 0 or len(eval_windows) == 0:
        return None
    cb = BoundedEvalCallback(eval_windows, recipe.eval.policies, recipe.eval.budgets, recipe.eval.every_n_steps,
                             recipe.eval.batch_size, tokenizer=tokenizer, sinks=recipe.budget.sinks)
    spec = recipe.budget_spec()
    have = {record_key(r) for r in before}
    wanted = {("full", budget_key(None)), (spec.policy, budget_key(spec.budget))}
    if wanted <= have:  # the base model is measured already
        cb.base_records = [{**r, "adapted": False} for r in before if record_key(r) in wanted]
    return cb


def _own_group(opt, params, lr: float) -> None:
    """Move `params` out of the optimizer's groups into one of their own (lr, no weight decay)."""
    ids = {id(p) for p in params}
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    opt.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})


# ----------------------------------------------------------------------------- save
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
    save_budget_modules(trainer.accelerator.unwrap_model(trainer.model), tmp)  # scorers, sink logits (if any)
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


# ----------------------------------------------------------------------------- periodic evaluation
class BoundedEvalCallback(TrainerCallback):
    """Bounded evaluation during training (a `transformers.TrainerCallback`).

    Every ``every_n_steps`` optimizer steps (0: never) and at the end of training, the
    current model is evaluated under its training spec (hard mode, the target budget) and the
    baselines ``policies`` x ``budgets``; the full-state base model (adapter disabled, full
    state) and the base model under the training spec are evaluated once, at the start, and
    reused. Metrics ``eval_bounded/<policy>_<K>_ppl``, ``eval_bounded/base_full_ppl``,
    ``eval_bounded/base_<policy>_<K>_ppl`` and ``eval_bounded/recovered`` (share of the
    bounded-vs-full gap that training closed) go through ``trainer.log`` when the callback
    knows its trainer (``attach(trainer)`` or ``trainer=``) - so W&B, TensorBoard and
    ``state.log_history`` all see them - and otherwise into ``state.log_history`` and W&B
    directly; a ``wandb.Table`` of the records is logged when ``wandb.run`` is active. The final
    records are kept on ``final_records`` (``final_table()`` gives the Markdown for the model
    card). The model is put back as it was: train mode, spec, ramped budget, soft temperature.

    ``eval_windows``: LongTensor [N, seq_len], or texts (a str, or a dict name -> text) to be
    cut into windows of ``seq_len`` tokens with ``tokenizer``.
    """

    def __init__(self, eval_windows, policies=("tova",), budgets=(), every_n_steps: int = 0, batch_size: int = 1,
                 tokenizer=None, seq_len: int | None = None, max_windows: int | None = None,
                 prefix: str = "eval_bounded", trainer=None, progress: bool = False, **spec_kwargs):
        if not isinstance(eval_windows, torch.Tensor):
            if tokenizer is None or seq_len is None:
                raise ValueError("BoundedEvalCallback: texts as eval_windows need tokenizer= and seq_len=")
            from .data import make_windows, tokenize_documents

            texts = {"eval": eval_windows} if isinstance(eval_windows, str) else dict(eval_windows)
            eval_windows = make_windows(tokenize_documents(texts, tokenizer, cache=False), seq_len, max_windows)
        elif max_windows is not None:
            eval_windows = eval_windows[:max_windows]
        if eval_windows.shape[0] == 0:
            raise ValueError("BoundedEvalCallback: no evaluation windows (text shorter than seq_len?)")
        self.windows = eval_windows
        self.policies = [p for p in policies]
        self.budgets = [int(k) for k in budgets]
        self.every_n_steps = int(every_n_steps or 0)
        self.batch_size = batch_size
        self.prefix = prefix
        self.trainer = trainer
        self.progress = progress
        self.spec_kwargs = spec_kwargs
        self.base_records: list[dict] | None = None
        self.final_records: list[dict] | None = None
        self.history: list[tuple[int, list[dict]]] = []
        self._last_step = -1

    def attach(self, trainer) -> "BoundedEvalCallback":
        """Register with ``trainer`` and log through ``trainer.log``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # -- what to evaluate
    def _train_spec(self, model) -> BudgetSpec | None:
        spec = get_budget(model)
        return None if spec is None or spec.policy == "full" else hard(spec)

    def _specs(self, model) -> list[BudgetSpec]:
        return grid_specs(self.policies, self.budgets, own=self._train_spec(model), own_first=True,
                          **self.spec_kwargs)

    def _base(self, model) -> list[dict]:
        """Full-state base model and base model under the training spec: computed once."""
        if self.base_records is None:
            specs = [BudgetSpec(policy="full")]
            train = self._train_spec(model)
            if train is not None:
                specs.append(train)
            self.base_records = evaluate_specs(model, self.windows, specs, self.batch_size, adapter_on=False,
                                               adapted=False, progress=self.progress, desc="eval_bounded base")
        return self.base_records

    # -- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._base(model)  # before the first step: for full fine-tuning this is the only chance

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.evaluate(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            records = self.evaluate(model, state) if self._last_step != state.global_step else self.history[-1][1]
            self.final_records = records

    def evaluate(self, model, state=None) -> list[dict]:
        """Evaluate now and log; returns base + current records."""
        step = state.global_step if state is not None else 0
        base = self._base(model)
        current = evaluate_specs(model, self.windows, self._specs(model), self.batch_size, adapter_on=True,
                                 adapted=True, progress=self.progress, desc=f"eval_bounded step {step}")
        records = base + current
        self.history.append((step, records))
        self._last_step = step
        self._log(self.metrics(records, model), records, state)
        return records

    def metrics(self, records: list[dict], model=None) -> dict[str, float]:
        out = {}
        base_full = full_ppl_of(records)
        for r in records:
            name = "full" if r["policy"] == "full" else _metric_name(r["policy"], r["budget"])
            out[f"{self.prefix}/{'' if r.get('adapted') else 'base_'}{name}_ppl"] = r["ppl"]
        train = self._train_spec(model) if model is not None else None
        if train is not None and base_full is not None:
            name = _metric_name(train.policy, train.budget)
            base_b, now = out.get(f"{self.prefix}/base_{name}_ppl"), out.get(f"{self.prefix}/{name}_ppl")
            if base_b is not None and now is not None and base_b - base_full > 1e-9:
                out[f"{self.prefix}/recovered"] = (base_b - now) / (base_b - base_full)
        return out

    def final_table(self) -> str:
        return markdown_table(self.final_records or [])

    def _log(self, metrics: dict, records: list[dict], state) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        elif state is not None:
            state.log_history.append({**metrics, "step": state.global_step})
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        if self.trainer is None:  # the trainer's W&B integration did not see them
            wandb.log(dict(metrics))
        step = state.global_step if state is not None else 0
        base_full = full_ppl_of(records)
        columns = ["step", "policy", "budget", "adapted", "ppl", "nll", "tokens", "ppl_minus_full"]
        rows = [[step, r["policy"], json.dumps(r["budget"]), bool(r.get("adapted")), r["ppl"], r["nll"],
                 r["tokens"], r["ppl"] - base_full if base_full is not None else None] for r in records]
        wandb.log({f"{self.prefix}/table": wandb.Table(columns=columns, data=rows)})


def _metric_name(policy: str, budget) -> str:
    """`tova_64`, `tova_64+full[15]`: the budget's label, without the "/" that W&B reads as a section."""
    return f"{policy}_{budget_label(budget).replace('/', '-')}"
