"""BudgetSpec: which policy and how many states per layer (what inference runs).

A spec is plain data (it round-trips through JSON and YAML) and is validated twice:
once on its own (`validate()`, before any weights load) and once against a model
config (`validate_for(config)`: number of layers, head grouping).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .policies import POLICIES
from .policies.learned import RETENTION_FORMS

SPEC_FILENAME = "msrnn_budget.json"
# once saved in msrnn_budget.json, never read: ignored when loading. `mode` ("hard"/"soft") changed no
# computation (soft training is the controller's temperature, set from the recipe's budget.mode).
RETIRED_KEYS = ("temperature", "mode")


class BudgetError(ValueError):
    """A budget spec that cannot be applied; the message names the key and what is allowed."""


@dataclass
class BudgetSpec:
    """What a bounded (finite multi-state) model holds.

    policy:      one of `POLICIES` (full, window, sinks, h2o, tova, tova_head).
    budget:      states per layer. An int for every layer; a list with one entry per layer;
                 or a dict {layer index: K, ..., "default": K}. `None` (or "full") for a layer
                 makes it unbounded (a hybrid).
    sinks:       number of sink positions kept by `sinks` (window+i).
    recent:      h2o's protected recent window r (default K // 2).
    retention:   the learned policies: how a member's retention logit ranks it, "decay"
                 (age * log sigmoid(logit), starts as window) or "logit" (the logit alone).
    scorer_hidden: the learned policies: the scorer's hidden width (0: one linear layer).
    prefill_chunk: inference only: a prompt enters a BoundedCache c tokens at a time (generate()
                 feeds c tokens per forward; a longer forward is split per layer), so prefill
                 holds O(K + c) keys per layer and builds O(c (K + c)) masks. Exact: chunked
                 prefill equals one-token-at-a-time decoding.
    """

    policy: str = "tova"
    budget: Any = 512
    sinks: int = 4
    recent: int | None = None
    retention: str = "decay"
    scorer_hidden: int = 0
    prefill_chunk: int = 128

    # ------------------------------------------------------------------ validation
    def validate(self) -> "BudgetSpec":
        if self.policy not in POLICIES:
            raise BudgetError(
                f"policy: unknown policy {self.policy!r}; allowed: {', '.join(POLICIES)}"
            )
        if self.retention not in RETENTION_FORMS:
            raise BudgetError(f"retention: unknown form {self.retention!r}; allowed: {', '.join(RETENTION_FORMS)}")
        if isinstance(self.scorer_hidden, bool) or not isinstance(self.scorer_hidden, int) or self.scorer_hidden < 0:
            raise BudgetError(f"scorer_hidden: must be an integer >= 0 (0: a linear scorer), got {self.scorer_hidden!r}")
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise BudgetError(f"sinks: must be an integer >= 0, got {self.sinks!r}")
        if self.recent is not None and (
            not isinstance(self.recent, int) or isinstance(self.recent, bool) or self.recent < 0
        ):
            raise BudgetError(f"recent: must be an integer >= 0 or null, got {self.recent!r}")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise BudgetError(f"prefill_chunk: must be an integer >= 1 (tokens per prefill chunk), got {self.prefill_chunk!r}")
        if self.policy == "full":
            return self
        b = self.budget
        if isinstance(b, dict):
            for key, value in b.items():
                if key != "default":
                    try:
                        int(key)
                    except (TypeError, ValueError):
                        raise BudgetError(
                            f"budget: dict keys must be layer indices or 'default', got {key!r}"
                        ) from None
                _check_k(value, f"budget[{key!r}]")
        elif isinstance(b, (list, tuple)):
            if len(b) == 0:
                raise BudgetError("budget: an empty list; give one entry per layer")
            for i, value in enumerate(b):
                _check_k(value, f"budget[{i}]")
        else:
            _check_k(b, "budget", allow_none=False)
        if self.recent is not None:
            for i, k in enumerate(self.bounded_budgets()):
                if self.recent > k:
                    raise BudgetError(
                        f"recent: h2o's recent window r={self.recent} exceeds the budget K={k}; allowed 0 <= r <= K"
                    )
        return self

    def bounded_budgets(self) -> list[int]:
        """Every K the budget names, in order ([] for the full state); unbounded layers left out."""
        if self.policy == "full":
            return []
        b = self.budget
        values = b.values() if isinstance(b, dict) else (b if isinstance(b, (list, tuple)) else [b])
        return [_as_k(v) for v in values if _as_k(v) is not None]

    def validate_for(self, config) -> "BudgetSpec":
        """Check the spec against a transformers model config."""
        self.validate()
        n_layers = config.num_hidden_layers
        b = self.budget
        if self.policy != "full" and isinstance(b, (list, tuple)) and len(b) != n_layers:
            raise BudgetError(
                f"budget: a per-layer list must have one entry per layer: the model has {n_layers} layers, "
                f"the list has {len(b)}"
            )
        if self.policy != "full" and isinstance(b, dict):
            for key in b:
                if key != "default" and not 0 <= int(key) < n_layers:
                    raise BudgetError(f"budget: layer index {key} out of range; allowed 0..{n_layers - 1}")
        if POLICIES[self.policy].head_wise:
            hq, hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            if hq % hkv != 0:
                raise BudgetError(
                    f"policy: {self.policy!r} is head-wise and needs the query heads ({hq}) to divide into "
                    f"key/value heads ({hkv}) evenly; use 'tova' (layer-wise) for this model"
                )
        if getattr(config, "attn_logit_softcapping", None) or getattr(config, "sinks", None):
            raise BudgetError("the model uses attention soft-capping or learned sinks, which msrnn-train does not support")
        if getattr(config, "use_bidirectional_attention", False):  # e.g. EmbeddingGemma: not a decoder
            raise BudgetError("the model attends bidirectionally (use_bidirectional_attention); a bounded state "
                              "needs a causal decoder")
        return self

    # ------------------------------------------------------------------ per-layer view
    def layer_budget(self, layer_idx: int) -> int | None:
        """K for a layer, or None when the layer is unbounded."""
        if self.policy == "full":
            return None
        b = self.budget
        if isinstance(b, dict):
            if layer_idx in b:
                return _as_k(b[layer_idx])
            if str(layer_idx) in b:
                return _as_k(b[str(layer_idx)])
            return _as_k(b.get("default"))
        if isinstance(b, (list, tuple)):
            return _as_k(b[layer_idx])
        return _as_k(b)

    def per_layer(self, n_layers: int) -> list[int | None]:
        """The normal form of the budget: K of each of `n_layers` layers (None: unbounded)."""
        return [self.layer_budget(i) for i in range(n_layers)]

    @property
    def label(self) -> str:
        """A short name: ``full``, ``tova-128``, ``tova-64/128`` (per-layer K), ``tova-128+full[15]``
        (a hybrid: the listed layers unbounded). The one name tables, logs and cards use."""
        if self.policy == "full":
            return "full"
        return f"{self.policy}-{budget_label(self.budget)}"

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["budget"], dict):
            d["budget"] = {str(k): v for k, v in d["budget"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetSpec":
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}  # budget files saved by older versions
        unknown = set(d) - known
        if unknown:
            raise BudgetError(f"unknown budget key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d).validate()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "BudgetSpec":
        path = Path(directory)
        if path.is_dir():
            path = path / SPEC_FILENAME
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise BudgetError(f"{path}: not a readable budget file ({type(err).__name__}: {err})") from None
        if not isinstance(raw, dict):
            raise BudgetError(f"{path}: a budget file is a JSON object like {{\"policy\": \"tova\", \"budget\": 64}}, "
                              f"got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except (BudgetError, TypeError) as err:
            raise BudgetError(f"{path}: {err}") from None


def budget_label(budget) -> str:
    """The budget part of `BudgetSpec.label`: ``full`` (None), ``128``, ``64/128``, ``128+full[15]``."""
    if budget is None or budget in ("full", "inf"):
        return "full"
    if not isinstance(budget, (list, tuple, dict)):
        return str(budget)
    items = budget.items() if isinstance(budget, dict) else enumerate(budget)
    ks = sorted({_as_k(k) for _, k in items if _as_k(k) is not None})
    items = budget.items() if isinstance(budget, dict) else enumerate(budget)
    full = sorted(int(i) for i, k in items if _as_k(k) is None and str(i) != "default")
    text = "/".join(map(str, ks)) or "full"
    if isinstance(budget, dict) and _as_k(budget.get("default")) is None:
        return f"{text}+full[rest]" if ks else "full"
    return f"{text}+full{full}" if full and ks else text


def budget_key(budget) -> str:
    """A hashable, order-independent name of a budget (an int, a per-layer list or a map), for
    matching evaluation records: `(record["policy"], budget_key(record["budget"]))`."""
    if isinstance(budget, dict):
        budget = {str(k): v for k, v in budget.items()}
    return json.dumps(budget, sort_keys=True)


def _as_k(value) -> int | None:
    if value is None or value == "full" or value == "inf":
        return None
    return int(value)


def _check_k(value, key: str, allow_none: bool = True) -> None:
    if allow_none and (value is None or value in ("full", "inf")):
        return
    if isinstance(value, bool) or not isinstance(value, int):
        extra = " or null/'full' for an unbounded layer" if allow_none else ""
        raise BudgetError(f"{key}: a budget must be an integer >= 1{extra}, got {value!r}")
    if value < 1:
        raise BudgetError(f"{key}: a budget must be >= 1 state, got {value}")
