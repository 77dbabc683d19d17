"""export_servable: a window-bounded hybrid written as a plain transformers folder serves, with no
msrnn_train code at load time, exactly the toolkit's bounded process (teacher-forced logits and
bounded greedy decoding), and its sliding layers' cache holds K states."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_model
from msrnn_train import BudgetSpec, apply_budget, cache_kwargs, make_cache
from msrnn_train.export import PROVENANCE_FILENAME, ExportError, export_servable, main, servable_layout

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
HYBRID = BudgetSpec(policy="window", budget={"default": K, "1": None})  # 3 layers: window-4, full, window-4
SINK_HYBRID = BudgetSpec(policy="window_sink", budget={"default": K, "1": None})  # the same with sink logits
PROMPT, NEW = 12, 30  # prompt + generated tokens run far past the window of K + 1

# Runs in a fresh interpreter with a poisoned `msrnn_train` first on the path: it must never be
# imported, and the final assert checks it was not.
SERVE = textwrap.dedent(r"""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicSlidingWindowLayer
    torch.set_num_threads(1)
    folders, ids_path, out_path = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    data = torch.load(ids_path)
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(data["ids"]).logits
        seen = []  # after every generate step: (layer type, sliding?, keys held) per layer
        def record(module, args, kwargs, output):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            seen.append([(type(l).__name__, isinstance(l, DynamicSlidingWindowLayer), int(l.keys.shape[-2]))
                         for l in cache.layers])
        hook = model.model.register_forward_hook(record, with_kwargs=True)
        with torch.no_grad():
            gen = model.generate(data["prompt"], max_new_tokens=data["new"], min_new_tokens=data["new"],
                                 do_sample=False)
        hook.remove()
        results[folder] = {"logits": logits, "generated": gen, "seen": seen, "class": type(model).__name__,
                           "layer_types": list(model.config.layer_types), "window": model.config.sliding_window}
    assert "msrnn_train" not in sys.modules, "the served model imported msrnn_train"
    torch.save(results, out_path)
""")


def _bounded(seed=0):
    model = tiny_model("llama", seed=seed)
    apply_budget(model, HYBRID)
    return model


def test_exported_hybrid_serves_the_bounded_process_without_msrnn_train(tmp_path):
    model = _bounded()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 48), generator=g)
    prompt = torch.randint(3, 128, (1, PROMPT), generator=g)
    with torch.no_grad():
        want = model(ids).logits  # the toolkit's teacher-forced simulation of the budget
        full = tiny_model("llama")(ids).logits
        want_gen = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  **cache_kwargs(make_cache(model)))  # bounded greedy decoding
    assert (want - full).abs().max() > 1e-2  # the window matters at this length: the check has teeth

    targets = ["qwen2"] + (["ministral"] if importlib.util.find_spec("transformers.models.ministral") else [])
    folders = [export_servable(model, tmp_path / target, target=target) for target in targets]
    prov = json.loads((folders[0] / PROVENANCE_FILENAME).read_text())
    assert prov["sliding_window"] == K + 1 and prov["per_layer_K"] == [K, None, K]
    assert "auto_map" not in json.loads((folders[0] / "config.json").read_text())  # no custom code

    results = _serve_elsewhere(tmp_path, folders, ids, prompt)
    for folder, cls in zip(folders, ("Qwen2ForCausalLM", "MinistralForCausalLM")):
        _check_served(results[str(folder)], cls, want, want_gen)


def _serve_elsewhere(tmp_path, folders, ids, prompt) -> dict:
    """SERVE's results for `folders`, run in a fresh interpreter where importing msrnn_train fails."""
    poison = tmp_path / "poison" / "msrnn_train"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('msrnn_train must not be imported to serve')\n")
    torch.save({"ids": ids, "prompt": prompt, "new": NEW}, tmp_path / "inputs.pt")
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = {**os.environ, "PYTHONPATH": str(poison.parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script), *map(str, folders), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _check_served(r, cls, want, want_gen):
    """A served window-K hybrid [bounded, full, bounded]: its class and layout, its logits against the
    toolkit's simulation, its greedy tokens against bounded decoding, and its own cache's size."""
    assert r["class"] == cls
    assert r["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert r["window"] == K + 1
    diff = (r["logits"] - want).abs().max().item()
    assert diff <= 1e-4, f"{cls}: max |logit diff| {diff:.2e} vs the toolkit's teacher-forced simulation"
    assert torch.equal(r["generated"], want_gen), f"{cls}: greedy generation differs from bounded decoding"
    assert len(r["seen"]) == NEW  # one forward per generated token (prefill included)
    for step, layers in enumerate(r["seen"]):
        held = PROMPT + step  # tokens written so far
        (n0, s0, k0), (n1, s1, k1), (n2, s2, k2) = layers
        assert s0 and s2 and not s1, layers
        assert k0 == k2 == min(K, held), f"step {step}: sliding layers hold {k0}/{k2} keys, the budget is {K}"
        assert k1 == held  # the full layer keeps everything


def _sink_adapter(tmp_path, values=False):
    """A train.py-style adapter folder of a window_sink hybrid on the tiny GQA Llama: a LoRA that is
    not the identity, trained-looking sink logits (and with `values`, sink values; else 0) in
    msrnn_sink.safetensors, the budget and a recipe."""
    import yaml

    from conftest import tiny_peft
    from msrnn_train.controller import save_budget_modules
    from msrnn_train.sink import SINK_FILENAME, sinks

    model = tiny_peft(tiny_model("llama"), scale=0.05, seed=5, init_lora_weights=False)
    apply_budget(model, SINK_HYBRID)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for s in sinks(model).values():
            s.logit.copy_(torch.randn(s.logit.shape, generator=g) * 2)  # per head: from "never" to "often"
            if values:
                s.value.copy_(torch.randn(s.value.shape, generator=g))
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    save_budget_modules(model, adapter)  # what trainer.save_outputs calls: the sink logits go beside the adapter
    SINK_HYBRID.save(adapter)
    from msrnn_train.models import random_model

    tiny_model("llama").save_pretrained(str(tmp_path / "base"))  # the same seed-0 weights the LoRA sits on
    random_model("tiny-llama")[1].save_pretrained(str(tmp_path / "base"))  # a tokenizer (the ids are made up)
    (adapter / "recipe.yaml").write_text(yaml.safe_dump({"model": {"source": str(tmp_path / "base"),
                                                                    "dtype": "float32"}}))
    assert (adapter / SINK_FILENAME).is_file()
    return adapter


@pytest.mark.parametrize("values", [False, True], ids=["logit-only", "with-values"])
def test_exported_sink_hybrid_serves_the_bounded_process_without_msrnn_train(tmp_path, values):
    """window_sink (a window with learned per-head sink logits, and values or not) + one full layer,
    from an adapter folder: exported (LoRA merged) to GraniteSWAForCausalLM, served by plain
    transformers in a process that never imports msrnn_train: logits, greedy decoding and its own
    sliding cache. Trained values travel as v_proj/o_proj biases; zero values add no bias at all."""
    from msrnn_train.hub import load_bounded
    from msrnn_train.sink import sinks

    adapter = _sink_adapter(tmp_path, values=values)
    model, _ = load_bounded(adapter)  # base + LoRA + budget + the saved sink logits (and values)
    assert sorted(sinks(model)) == [0, 2]  # the bounded layers only
    assert all(bool(s.value.ne(0).any()) == values for s in sinks(model).values())  # the values came back
    if values:  # the values matter: the same logits with the values zeroed differ
        with torch.no_grad():
            saved = {i: s.value.clone() for i, s in sinks(model).items()}
            for s in sinks(model).values():
                s.value.zero_()
            logit_only = model(torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(9)),
                               use_cache=False).logits
            for i, s in sinks(model).items():
                s.value.copy_(saved[i])
            with_values = model(torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(9)),
                                use_cache=False).logits
        assert (with_values - logit_only).abs().max() > 1e-2
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 48), generator=g)
    prompt = torch.randint(3, 128, (1, PROMPT), generator=g)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits  # the toolkit's teacher-forced simulation
        want_gen = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  **cache_kwargs(make_cache(model)))  # bounded greedy decoding
        apply_budget(model, HYBRID)  # the same hybrid without the sink: the sink matters here
        no_sink = model(ids, use_cache=False).logits
    assert (want - no_sink).abs().max() > 1e-2

    folder = export_servable(adapter, tmp_path / "granite")  # the default target of a sink policy
    prov = json.loads((folder / PROVENANCE_FILENAME).read_text())
    assert prov["target"] == "GraniteSWAForCausalLM" and prov["sink_layers"] == [0, 2]
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "granite_swa"
    assert [config[k] for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")] == [1.0] * 3
    assert config["attention_multiplier"] == 16 ** -0.5  # head_dim 16: Llama's scaling
    assert config["attention_bias"] is values and (prov["sink_values"] is not None) is values

    r = _serve_elsewhere(tmp_path, [folder], ids, prompt)[str(folder)]
    _check_served(r, "GraniteSWAForCausalLM", want, want_gen)


def test_sink_policy_refuses_a_target_without_sinks(tmp_path):
    model = tiny_model("llama")
    apply_budget(model, SINK_HYBRID)
    with pytest.raises(ExportError, match="'qwen2' has no attention sink.*'granite_swa'"):
        export_servable(model, tmp_path / "out", target="qwen2")
    assert not (tmp_path / "out").exists()


def test_a_sink_budget_on_a_model_without_sink_logits_is_refused(tmp_path, capsys):
    rc = main(["random:tiny-llama", str(tmp_path / "out"), "--budget", '{"default": 4, "1": null}',
               "--policy", "window_sink"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export:")]
    assert rc == 2 and len(lines) == 1 and "no sink logits" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_plain_window_exports_to_granite_swa_with_no_sink(tmp_path):
    """A `window` hybrid written as GraniteSWA: every layer's sink is the most negative float, which
    leaves the attention exactly as it was."""
    from transformers import AutoModelForCausalLM

    model = _bounded()
    served = AutoModelForCausalLM.from_pretrained(str(export_servable(model, tmp_path / "g", target="granite_swa")))
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (served.eval()(ids).logits - model(ids).logits).abs().max() <= 1e-4
    assert all((layer.self_attn.sinks == torch.finfo(torch.float32).min).all() for layer in served.model.layers)


def test_export_from_an_adapter_folder_merges_the_lora(tmp_path):
    """The train.py layout (adapter + msrnn_budget.json + recipe.yaml naming the base): the LoRA is
    merged into the exported weights, and a live peft model passed in is left as it was."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from msrnn_train.hub import load_bounded
    from msrnn_train.models import random_model

    base, tokenizer = random_model("tiny-llama")
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    BudgetSpec(policy="window", budget=[3, None]).save(adapter)
    (adapter / "recipe.yaml").write_text(yaml.safe_dump({"model": {"source": "random:tiny-llama",
                                                                    "dtype": "float32"}}))

    out = export_servable(adapter, tmp_path / "servable")
    served = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    bounded, _ = load_bounded(adapter)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = bounded(ids).logits
        got = served(ids).logits
        base_only = random_model("tiny-llama")[0]
        apply_budget(base_only, BudgetSpec(policy="window", budget=[3, None]))
        no_lora = base_only(ids).logits
    assert (want - no_lora).abs().max() > 1e-3  # the adapter changes the model
    assert (got - want).abs().max() <= 1e-4
    assert served.config.layer_types == ["sliding_attention", "full_attention"] and served.config.sliding_window == 4
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    export_servable(bounded, tmp_path / "from-live")  # a live peft model: a merged copy is written
    assert any("lora_A" in n for n, _ in bounded.named_parameters())  # ... and the model keeps its adapter


@pytest.mark.parametrize("spec, words", [
    (BudgetSpec(policy="tova", budget={"default": K, "1": None}), ["'tova'", "'window'"]),
    (BudgetSpec(policy="tova_head", budget=K), ["'tova_head'", "head-wise", "'window'"]),
    (BudgetSpec(policy="sinks", budget=K), ["'sinks'", "'window'"]),
    (BudgetSpec(policy="window", budget=[4, 8, None]), ["4/8", "one K"]),
])
def test_export_refuses_what_stock_sliding_windows_cannot_serve(tmp_path, spec, words):
    model = tiny_model("llama")
    apply_budget(model, spec)
    with pytest.raises(ExportError) as err:
        export_servable(model, tmp_path / "out")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_refuses_a_tova_budget_with_one_line(tmp_path, capsys):
    rc = main(["random:tiny-llama", str(tmp_path / "out"), "--budget", '{"default": 4, "1": null}',
               "--policy", "tova"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export:")]
    assert rc == 2 and len(lines) == 1 and "'tova'" in lines[0] and "'window'" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_layout_of_a_hybrid_and_the_window_off_by_one():
    layout = servable_layout(BudgetSpec(policy="window", budget={"default": 32, "18": None}), 30)
    assert layout["sliding_window"] == 33  # K states held + the query's own key
    assert layout["layer_types"][18] == "full_attention" and layout["layer_types"].count("full_attention") == 1
    assert servable_layout(BudgetSpec(policy="full"), 3)["sliding_window"] is None


def test_exported_hybrid_matches_with_padding(tmp_path):
    """Left- and right-padded batches (teacher forcing) and left-padded greedy decoding."""
    from transformers import AutoModelForCausalLM

    from conftest import padded_batch

    model = _bounded()
    served = AutoModelForCausalLM.from_pretrained(str(export_servable(model, tmp_path / "out"))).eval()
    for side in ("left", "right"):
        ids, mask = padded_batch([24, 13], 24, side=side)
        with torch.no_grad():
            diff = (model(ids, attention_mask=mask).logits - served(ids, attention_mask=mask).logits).abs().amax(-1)
        assert (diff * mask).max() <= 1e-4, side  # real positions only
    ids, mask = padded_batch([12, 7], 12, side="left")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              **cache_kwargs(make_cache(model)))
        got = served.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(want, got)
