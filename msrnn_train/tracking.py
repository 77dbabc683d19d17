"""Weights & Biases for a run: started with the resolved recipe as its config (offline, with one
message saying how to sync, when there is no API key), resumed with the run it continues, and
finished with the before/after perplexity table. The Trainer's own WandbCallback logs the steps."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import log
from .recipe import Recipe
from .evaluate import record_key

WANDB_ID = "wandb_run_id.txt"  # in the output folder: a resumed run continues the same W&B run


def wandb_wanted(recipe: Recipe) -> bool:
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
    if not wandb_wanted(recipe):
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
    id_file = out / WANDB_ID
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
    before = {record_key(r): r["ppl"] for r in summary["before"]}
    table = wandb.Table(columns=["policy", "budget", "ppl_before", "ppl_after"])
    for r in summary["after"]:
        key = record_key(r)
        table.add_data(r["policy"], str(r["budget"]), before.get(key), r["ppl"])
        wandb.run.summary[f"eval/{r['policy']}-{r['budget']}/ppl"] = r["ppl"]
        if key in before:
            wandb.run.summary[f"eval/{r['policy']}-{r['budget']}/ppl_before"] = before[key]
    wandb.log({"eval/perplexity": table})
    wandb.run.summary["tokens_per_second"] = summary["tokens_per_second"]
    wandb.run.summary["peak_memory_mb"] = summary["peak_memory_mb"]
    wandb.finish()
