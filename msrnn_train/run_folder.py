"""A run's output folder: which checkpoint a run resumes from, and which folder it may claim.

A folder belongs to one run (one recipe): a resumed run must match the recipe its checkpoint was
written with, and a new run refuses a folder holding another run unless
training.overwrite_output_dir, which sets the other run's checkpoints aside until this run's
adapter is saved.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import yaml

from .errors import RecipeError, log
from .recipe import RECIPE_FILENAME, Recipe, rename_old_keys
from .spec import SPEC_FILENAME, BudgetError, BudgetSpec, budget_key

REPLACED = ".replaced-run"  # another run's checkpoints, set aside by training.overwrite_output_dir
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
    """'key: saved -> current' for every recipe key that differs and matters to the adapter. A key
    the saved recipe lacks (added to the project after that run) counts as its default, so a run
    written before a new key existed is still the same run when the key keeps its default."""
    a, b = _flat(saved), _flat(current.to_dict())
    defaults = _flat(Recipe().to_dict())
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in _FREE_KEYS):
            continue
        va, vb = a.get(key, defaults.get(key, "(absent)")), b.get(key, "(absent)")
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
    """The recipe a run saved, its keys under today's names (a run saved before a rename compares equal)."""
    try:
        raw = yaml.safe_load((folder / RECIPE_FILENAME).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    try:
        return rename_old_keys(raw, warn=False)
    except RecipeError:  # both names of a key: compared as it is (the difference is then named)
        return raw


def resolve_resume(recipe: Recipe, out: Path) -> Path | None:
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


def claim_output_dir(recipe: Recipe, out: Path, resume: Path | None) -> list[Path] | None:
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
        f"this run's adapter is saved, its checkpoints wait in {out / REPLACED} until then")
    return ckpts


def set_aside(out: Path, ckpts: list[Path] | None) -> None:
    if not ckpts:
        return
    aside = out / REPLACED
    aside.mkdir(exist_ok=True)  # an earlier failed attempt may have set checkpoints aside already
    for c in ckpts:
        target = aside / c.name
        os.replace(c, target if not target.exists() else aside / f"{c.name}.{time.time_ns()}")
