"""window_sink: a window with a learned virtual sink key (a logit per head, a value per key/value
head). The reference attention equals its definition and GraniteSWA's eager form; teacher-forced
simulation == token-by-token decoding with trained-looking sinks on a GQA hybrid; the logits and
values train with the LoRA at their own rate, are saved beside the adapter and come back with
hub.load_bounded (and a resumed run); calibration recomputed from the layer's own q/k/v."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_corpus, padded_batch, tiny_model, tiny_run_env
from msrnn_train import BudgetSpec, apply_budget
from msrnn_train.fidelity import compare
from msrnn_train.sink import SINK_FILENAME, SINK_INIT, sink_attention, sinks

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID = [4, None, 3]  # tiny_model: 3 layers, 4 query heads over 2 key/value heads (GQA)


def _random_sinks(model, seed=0, scale=2.0, values=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in sinks(model).values():
            s.logit.copy_(torch.randn(s.logit.shape, generator=g) * scale)
            if values:
                s.value.copy_(torch.randn(s.value.shape, generator=g))


def test_sink_attention_is_graniteswa_eager_and_no_sink_is_plain_attention():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 5, 9, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    visible = torch.rand(B, 1, T, S, generator=g) < 0.6
    visible[..., -1] = True  # every query sees at least one key
    sink = torch.randn(Hq, generator=g) * 2
    got = sink_attention(q, k, v, visible, D ** -0.5, sink)

    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = (q @ kk.transpose(-1, -2) * D ** -0.5).masked_fill(~visible, -torch.inf)
    virtual = sink.view(1, Hq, 1, 1).expand(B, Hq, T, 1)  # the definition: one more key, logit s_h, value 0
    spec = torch.cat([logits, virtual], -1).softmax(-1)[..., :-1] @ vv
    assert (got - spec).abs().max() < 1e-6
    scale = (torch.logsumexp(logits, -1) - sink.view(1, -1, 1)).sigmoid()  # GraniteSWA's eager_attention_forward
    assert (got - (logits.softmax(-1) @ vv) * scale.unsqueeze(-1)).abs().max() < 1e-6
    none = sink_attention(q, k, v, visible, D ** -0.5, torch.full((Hq,), torch.finfo(torch.float32).min))
    plain = F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible, scale=D ** -0.5)
    assert (none - plain).abs().max() < 1e-6
    assert (got - plain).abs().max() > 1e-2  # the sink takes mass away: the check has teeth

    u = torch.randn(Hkv, D, generator=g)  # a value per key/value head: the virtual key's value
    got_v = sink_attention(q, k, v, visible, D ** -0.5, sink, sink_value=u)
    uu = u.repeat_interleave(2, 0).view(1, Hq, 1, D).expand(B, Hq, 1, D)
    spec_v = torch.cat([logits, virtual], -1).softmax(-1) @ torch.cat([vv, uu], -2)  # the definition
    assert (got_v - spec_v).abs().max() < 1e-5
    assert (got_v - got).abs().max() > 1e-2
    assert torch.equal(sink_attention(q, k, v, visible, D ** -0.5, sink, sink_value=torch.zeros(Hkv, D)), got)


@pytest.mark.parametrize("side, prompt_len", [("left", 0), ("right", 0), ("left", 9)])
def test_simulation_equals_bounded_decoding_with_trained_sinks(side, prompt_len):
    """GQA, a hybrid (layer 1 full, no sink), padding, chunked prefill of a prompt (prompt_len)."""
    model = tiny_model("llama")
    spec = BudgetSpec(policy="window_sink", budget=HYBRID, prefill_chunk=4)
    apply_budget(model, spec)
    assert sorted(sinks(model)) == [0, 2]  # bounded layers only
    _random_sinks(model)
    ids, mask = padded_batch([24, 17, 20], 24, side=side, seed=1)
    result = compare(model, ids, mask, prompt_len=prompt_len)
    assert result["max_abs_diff"] < 1e-4, result
    assert result["held_mismatch"] is None, result["held_mismatch"]
    assert result["state_sizes"][0] <= 4 and result["state_sizes"][2] <= 3

    with torch.no_grad():
        with_sink = model(ids, attention_mask=mask).logits
        apply_budget(model, BudgetSpec(policy="window", budget=HYBRID))  # the sinks stay attached, unused
        without = model(ids, attention_mask=mask).logits
    assert ((with_sink - without).abs().amax(-1) * mask).max() > 1e-2


def test_sinks_start_at_the_init_and_receive_gradients():
    model = tiny_model("llama").train()
    apply_budget(model, BudgetSpec(policy="window_sink", budget=HYBRID))
    found = sinks(model)
    assert all(torch.equal(s.logit.detach(), torch.full((4,), SINK_INIT)) for s in found.values())
    assert all(s.value.shape == (2, 16) and not s.value.detach().any() for s in found.values())  # (Hkv, D), 0
    ids, _ = padded_batch([16, 16], 16, seed=2)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(s.logit.grad is not None and s.logit.grad.abs().sum() > 0 for s in found.values())
    assert all(s.value.grad is not None and s.value.grad.abs().sum() > 0 for s in found.values())


def test_sinks_round_trip_and_a_file_without_values_loads_them_as_zero(tmp_path):
    from safetensors.torch import load_file, save_file

    from msrnn_train.sink import load_sinks, save_sinks

    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="window_sink", budget=HYBRID))
    _random_sinks(model, seed=3)
    path = save_sinks(model, tmp_path)
    assert sorted(load_file(str(path))) == ["0", "0.value", "2", "2.value"]
    other = tiny_model("llama")
    apply_budget(other, BudgetSpec(policy="window_sink", budget=HYBRID))
    assert load_sinks(other, tmp_path)
    for i, s in sinks(model).items():
        assert torch.equal(sinks(other)[i].logit, s.logit) and torch.equal(sinks(other)[i].value, s.value)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v for k, v in load_file(str(path)).items() if "." not in k}, str(old / SINK_FILENAME))
    assert load_sinks(other, old)  # written before sink values existed: the logits, and zero values
    for i, s in sinks(other).items():
        assert torch.equal(s.logit, sinks(model)[i].logit) and not s.value.detach().any()


def _tiny_sink_run(tmp_path, name, **overrides):
    from msrnn_train.recipe import load_recipe
    from msrnn_train.train import train

    root = Path(__file__).resolve().parents[1]
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus, n_docs=3, words=300)
    keys = {"data.source": str(corpus), "data.heldout": 1, "data.seq_len": 32, "budget.policy": "window_sink",
            "budget.mode": "hard", "budget.budget": [6, None], "soft.budget_ramp_start": None,
            "training.output_dir": str(tmp_path / name), "training.max_steps": 4, "training.save_steps": 2,
            "training.save_total_limit": 5, "eval.max_windows": 0, "eval.at_start": False, "wandb.project": None,
            "eval.policies": ["window_sink", "full"], "eval.budgets": [6], "budget.sink_learning_rate": 0.1}
    keys.update(overrides)
    with tiny_run_env(tmp_path / "cache"):
        return train(load_recipe(root / "recipes" / "tiny.yaml", keys))


@pytest.mark.slow
def test_training_moves_the_sinks_saves_them_load_bounded_and_resume_restore_them(tmp_path):
    from safetensors.torch import load_file

    from msrnn_train.hub import load_bounded

    summary = _tiny_sink_run(tmp_path, "whole")
    out = tmp_path / "whole"
    assert (out / SINK_FILENAME).is_file() and (out / "checkpoint-2" / SINK_FILENAME).is_file()
    trained = sinks(summary["model"])
    assert sorted(trained) == [0]  # the bounded layer; layer 1 is full
    moved = (trained[0].logit.detach().cpu() - SINK_INIT).abs()
    assert moved.min() > 0.05, moved  # 4 Adam steps at 0.1 (the LoRA's rate would move it by ~0.01)
    assert trained[0].value.detach().abs().min() > 0.01  # the values train too (budget.sink_value default)
    model, _ = load_bounded(out)  # no extra step: the logits and values come back with the adapter
    assert torch.equal(sinks(model)[0].logit.detach(), trained[0].logit.detach().cpu())
    assert torch.equal(sinks(model)[0].value.detach(), trained[0].value.detach().cpu())

    _tiny_sink_run(tmp_path, "cut")  # the same run, then killed after checkpoint-2 and resumed
    cut = tmp_path / "cut"
    import shutil

    shutil.rmtree(cut / "checkpoint-4")
    (cut / SINK_FILENAME).unlink()
    _tiny_sink_run(tmp_path, "cut", **{"training.resume_from_checkpoint": True})
    whole, resumed = load_file(str(out / SINK_FILENAME)), load_file(str(cut / SINK_FILENAME))
    assert whole.keys() == resumed.keys() and all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)


def test_sink_learning_rate_is_checked():
    from msrnn_train.recipe import RecipeError, RecipeWarning, load_recipe

    for bad in (0, -1.0, "fast"):
        with pytest.raises(RecipeError) as err:
            load_recipe(None, {"budget.policy": "window_sink", "budget.sink_learning_rate": bad})
        assert str(err.value).startswith("budget.sink_learning_rate:") and "\n" not in str(err.value)
    with pytest.warns(RecipeWarning, match="budget.sink_learning_rate: has no effect with budget.policy 'tova'"):
        load_recipe(None, {"budget.sink_learning_rate": 0.1})


def test_calibrated_sinks_are_each_heads_mean_first_token_lse_minus_the_shift():
    """controller.calibrate_sinks: s_h = mean over queries past first + K of logsumexp of head h's
    logits on the first tokens (recomputed here from the layer's own q, k), plus the shift."""
    from msrnn_train.controller import CALIBRATION_SHIFT, budget_scope, calibrate_sinks

    model = tiny_model()
    windows = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    seen = {}

    def grab(layer):
        def hook(mod, args, kwargs, out):
            seen.setdefault(layer, []).append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return hook

    attn = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_hook(grab(i), with_kwargs=True) for i, a in enumerate(attn)]
    with budget_scope(model, BudgetSpec(policy="window_sink", budget=HYBRID)):
        values = calibrate_sinks(model, HYBRID, windows, first=2, value=False)
        got = {i: s.logit.detach().clone() for i, s in sinks(model).items()}
    for h in handles:
        h.remove()
    assert sorted(values) == sorted(got) == [0, 2]  # the bounded layers; layer 1 is full
    for layer in (0, 2):
        a, cfg = attn[layer], model.config
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
        per_window = []
        for x in seen[layer]:  # (1, T, hidden): the layer's input, under `sinks`
            T = x.shape[1]
            q = a.q_proj(x).view(1, T, hq, d).transpose(1, 2)
            k = a.k_proj(x).view(1, T, hkv, d).transpose(1, 2)
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k[:, :, :2].repeat_interleave(hq // hkv, 1)
            lse = torch.logsumexp(q @ k.transpose(-1, -2) * d ** -0.5, -1)
            per_window.append(lse[0, :, 2 + HYBRID[layer]:].mean(-1))
        want = torch.stack(per_window).mean(0) + CALIBRATION_SHIFT
        assert torch.allclose(got[layer], want, atol=1e-5), (layer, got[layer], want)
        assert torch.equal(values[layer], got[layer])
    assert not all(torch.allclose(v, torch.full_like(v, SINK_INIT)) for v in got.values())


def test_calibrated_sink_values_are_the_first_tokens_values_as_the_sink_mixes_them():
    """calibrate_sinks(value=True): u_g = mean over the query heads h of group g of
    sum_t exp(lse_th) softmax(l_th) @ V_first / sum_t exp(lse_th) (recomputed from q/k/v), and the
    logits at CALIBRATION_SHIFT_WITH_VALUE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from msrnn_train.controller import budget_scope, calibrate_sinks, first_tokens_lse
    from msrnn_train.sink import CALIBRATION_SHIFT_WITH_VALUE

    model = tiny_model()
    windows = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    lse_only = first_tokens_lse(model, HYBRID, windows, first=2)
    inputs = {}
    attn = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_hook(lambda m, a_, kw, o, i=i: inputs.setdefault(i, []).append(kw["hidden_states"]),
                                       with_kwargs=True) for i, a in enumerate(attn)]
    with budget_scope(model, BudgetSpec(policy="window_sink", budget=HYBRID)):
        calibrate_sinks(model, HYBRID, windows, first=2)
        got = {i: (s.logit.detach().clone(), s.value.detach().clone()) for i, s in sinks(model).items()}
    for h in handles:
        h.remove()
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for layer in (0, 2):
        a, num, den = attn[layer], 0, 0
        for x in inputs[layer]:
            T = x.shape[1]
            q = a.q_proj(x).view(1, T, hq, d).transpose(1, 2)
            k = a.k_proj(x).view(1, T, hkv, d).transpose(1, 2)
            v = a.v_proj(x).view(1, T, hkv, d).transpose(1, 2)[:, :, :2].repeat_interleave(hq // hkv, 1)
            cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            logits = (q @ k[:, :, :2].repeat_interleave(hq // hkv, 1).transpose(-1, -2) * d ** -0.5)
            logits = logits[0, :, 2 + HYBRID[layer]:].double()  # (Hq, t, 2)
            w = torch.logsumexp(logits, -1).exp()
            num = num + (w.unsqueeze(-1) * (logits.softmax(-1) @ v[0].double())).sum(1)
            den = den + w.sum(1)
        want = (num / den.unsqueeze(-1)).view(hkv, hq // hkv, d).mean(1).float()
        assert torch.allclose(got[layer][1], want, atol=1e-5), (layer, got[layer][1], want)
        assert got[layer][1].abs().max() > 1e-2
        assert torch.allclose(got[layer][0], lse_only[layer] + CALIBRATION_SHIFT_WITH_VALUE, atol=1e-6)


@pytest.mark.slow
def test_sink_init_starts_training_from_the_number_or_the_calibration(tmp_path, monkeypatch):
    import msrnn_train.train as T

    started = {}
    real = T.BoundedRun.train

    def spy(self):
        started["logits"] = {i: s.logit.detach().clone() for i, s in sinks(self.model).items()}
        started["values"] = {i: s.value.detach().clone() for i, s in sinks(self.model).items()}
        started["value_grad"] = all(s.value.requires_grad for s in sinks(self.model).values())
        return real(self)

    monkeypatch.setattr(T.BoundedRun, "train", spy)
    _tiny_sink_run(tmp_path, "number", **{"budget.sink_init": -0.5, "training.max_steps": 1, "training.save_steps": 1})
    assert all(torch.equal(v, torch.full_like(v, -0.5)) for v in started["logits"].values())
    _tiny_sink_run(tmp_path, "calibrated", **{"budget.sink_init": "calibrate", "training.max_steps": 1,
                                              "training.save_steps": 1})
    cal = started["logits"][0]
    assert cal.shape == (4,) and torch.isfinite(cal).all() and cal.std() > 0  # per head, from data
    assert started["values"][0].abs().max() > 0 and started["value_grad"]  # calibrated values, trained

    summary = _tiny_sink_run(tmp_path, "logit_only", **{"budget.sink_init": "calibrate", "budget.sink_value": False,
                                                        "training.max_steps": 2, "training.save_steps": 1})
    assert not started["values"][0].any() and not started["value_grad"]  # zero and frozen from the start ...
    assert not sinks(summary["model"])[0].value.detach().any()  # ... and after training
    assert (started["logits"][0] - cal).abs().max() > 0.5  # the logit-only shift (-2 instead of -1)


def test_sink_init_is_checked():
    from msrnn_train.recipe import RecipeError, RecipeWarning, load_recipe

    for bad in ("calibrated", float("nan"), True):
        with pytest.raises(RecipeError, match=r"^budget.sink_init: a finite number or \"calibrate\""):
            load_recipe(None, {"budget.policy": "window_sink", "budget.sink_init": bad})
    assert load_recipe(None, {"budget.policy": "window_sink", "budget.sink_init": "calibrate"}).budget.sink_init \
        == "calibrate"
    with pytest.warns(RecipeWarning, match="budget.sink_init: has no effect with budget.policy 'tova'"):
        load_recipe(None, {"budget.sink_init": 2.0})


def test_sink_value_is_checked():
    from msrnn_train.recipe import RecipeError, RecipeWarning, load_recipe

    for bad in (1, None, "maybe"):
        with pytest.raises(RecipeError, match=r"^budget.sink_value: expected true/false, got"):
            load_recipe(None, {"budget.policy": "window_sink", "budget.sink_value": bad})
    assert load_recipe(None, {"budget.policy": "window_sink"}).budget.sink_value is True
    with pytest.warns(RecipeWarning, match="budget.sink_value: has no effect with budget.policy 'tova'"):
        load_recipe(None, {"budget.sink_value": False})
