"""Training: losses, the soft/budget schedule, a full tiny run, resume, W&B offline, data split."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_recipe, tiny_run_env
from msrnn_train import BudgetSpec, apply_budget
from msrnn_train.controller import get_controller
from msrnn_train.losses import causal_lm_loss, distillation_kl
from msrnn_train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, token caches in a temp folder


def train_logs(history, key):
    return {h["step"]: h[key] for h in history if key in h}


# ----------------------------------------------------------------------------- losses
def test_causal_lm_loss_matches_the_model_loss():
    from msrnn_train.models import random_model

    model, _ = random_model()
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(causal_lm_loss(out.logits, ids), out.loss, atol=1e-5)
    labels = ids.clone()
    labels[:, :9] = -100  # unscored positions are ignored, as in transformers
    assert torch.allclose(causal_lm_loss(out.logits, labels), model(input_ids=ids, labels=labels).loss, atol=1e-5)


def test_distillation_kl_is_the_kl_divergence():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    assert distillation_kl(t, t, ids).item() == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 2.0):
        p = torch.softmax(t[:, :-1] / temp, -1)
        manual = (p * (p.log() - torch.log_softmax(s[:, :-1] / temp, -1))).sum(-1).mean() * temp**2
        assert distillation_kl(s, t, ids, temp).item() == pytest.approx(manual.item(), rel=1e-5)
    labels = ids.clone()
    labels[0, 3] = -100  # position 2 predicts token 3: not scored
    p = torch.softmax(t[:, :-1], -1)
    per = (p * (p.log() - torch.log_softmax(s[:, :-1], -1))).sum(-1)
    keep = torch.ones_like(per, dtype=torch.bool)
    keep[0, 2] = False
    assert distillation_kl(s, t, labels).item() == pytest.approx(per[keep].mean().item(), rel=1e-5)
    s.requires_grad_(True)
    distillation_kl(s, t, ids).backward()
    assert s.grad.abs().sum() > 0


def adapted_tiny(budget: int = 8, scale: float = 0.5, seed: int = 0):
    """The tiny random Llama with a LoRA adapter that is not the identity (as after training),
    under TOVA-`budget`; seeded, so two calls build the same model."""
    from msrnn_train.recipe import Recipe
    from msrnn_train.models import add_lora, random_model

    recipe = Recipe()
    recipe.lora.r = 4
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    model = add_lora(random_model()[0], recipe)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    apply_budget(model, BudgetSpec("tova", budget))
    return model


def test_teacher_is_the_full_state_base_model():
    """Adapter disabled and no budget: exactly the base model, with no second copy of the weights."""
    from msrnn_train.trainer import full_state_logits
    from msrnn_train.models import random_model

    base, _ = random_model()
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(input_ids=ids, use_cache=False).logits
    model = adapted_tiny()  # a trained adapter changes the student
    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False).logits
    teacher = full_state_logits(model, ids)
    assert torch.allclose(teacher, expected, atol=1e-5)
    assert not torch.allclose(student, expected, atol=1e-2)
    assert get_controller(model).enabled  # the student's budget is back on
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, student)


def test_self_teacher_is_the_adapted_model_with_the_full_state():
    """loss.teacher: self - the adapter on, no budget: what the current model predicts with every state."""
    from msrnn_train.controller import full_state
    from msrnn_train.trainer import full_state_logits

    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(2))
    model = adapted_tiny()
    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False).logits
        with full_state(model):
            expected = model(input_ids=ids, use_cache=False).logits
        base = full_state_logits(model, ids)
    teacher = full_state_logits(model, ids, adapter=True)
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert not torch.allclose(teacher, base, atol=1e-2)  # not the base model ...
    assert not torch.allclose(teacher, student, atol=1e-2)  # ... and not the bounded student
    assert get_controller(model).enabled


@pytest.mark.parametrize("teacher", ["base", "self"])
def test_bounded_objective_is_the_sum_of_its_terms(teacher):
    """losses.bounded_objective (the trainer's and the benchmark's objective) is the hand-assembled
    bounded_lm_weight * CE(bounded) + capacity + full_lm_weight * CE(full state, adapter on) + kl_weight * KL
    to the named teacher, with answer weights; without the full-state pass the self teacher is a
    separate full-state forward with the adapter on."""
    import dataclasses

    from msrnn_train.controller import full_state
    from msrnn_train.losses import bounded_objective, weighted_causal_lm_loss
    from msrnn_train.recipe import LossConfig
    from msrnn_train.trainer import full_state_logits

    model = adapted_tiny(budget=6, scale=0.3).eval()  # eval: no LoRA dropout, so every pass is repeatable
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 200, (2, 32), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    weight = 1.0 + torch.rand(2, 32, generator=g)
    cfg = LossConfig(bounded_lm_weight=0.7, full_lm_weight=0.5, kl_weight=0.3, kl_temperature=2.0, teacher=teacher)
    calls = []

    def teacher_fn(i, m, adapter):
        calls.append(adapter)
        return full_state_logits(model, i, m, adapter=adapter)

    capacity = torch.tensor(0.25)
    kwargs = dict(teacher_fn=teacher_fn, full_state_ctx=lambda: full_state(model), capacity_weight=2.0)
    batch = {"input_ids": ids, "labels": labels, "loss_weight": weight}
    loss, parts, out = bounded_objective(model, batch, cfg, capacity_fn=lambda: capacity, **kwargs)

    with torch.no_grad():
        student = model(input_ids=ids, use_cache=False).logits
        with full_state(model):
            full = model(input_ids=ids, use_cache=False).logits
        target = full if teacher == "self" else full_state_logits(model, ids)
    lm = weighted_causal_lm_loss(student, labels, weight)
    full_lm, kl = causal_lm_loss(full, labels), distillation_kl(student, target, labels, 2.0)
    expected = 0.7 * lm + 2.0 * capacity + 0.5 * full_lm + 0.3 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for key, value in (("lm_loss", lm), ("full_lm_loss", full_lm), ("kl_loss", kl), ("capacity_loss", capacity)):
        assert parts[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert torch.allclose(out.logits, student, atol=1e-6) and loss.requires_grad
    assert calls == ([] if teacher == "self" else [False])  # self: the full-state pass is the teacher

    # LM + KL only: no full-state pass with gradients, the teacher from teacher_fn; no capacity term
    calls.clear()
    cfg2 = dataclasses.replace(cfg, full_lm_weight=0.0)
    loss2, parts2, _ = bounded_objective(model, {"input_ids": ids}, cfg2, **kwargs)
    assert parts2["full_lm_loss"] is None and parts2["capacity_loss"] is None
    expected2 = 0.7 * causal_lm_loss(student, ids) + 0.3 * distillation_kl(student, target, ids, 2.0)
    assert loss2.item() == pytest.approx(expected2.item(), rel=1e-5)
    assert calls == [teacher == "self"]


def _two_pass_grads(checkpointing: str | None):
    """LoRA gradients of one step with a bounded pass and a full-state pass (loss.full_lm_weight)."""
    from msrnn_train.controller import checkpoint_context_fn, full_state
    from msrnn_train.trainer import enable_checkpointing

    model = adapted_tiny(budget=6, scale=0.3)
    if checkpointing is not None:
        kwargs = {"use_reentrant": False}
        if checkpointing == "context":
            kwargs["context_fn"] = checkpoint_context_fn(model)
        enable_checkpointing(model, kwargs)
    model.train()
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(5))
    loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    with full_state(model):
        loss = loss + causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
    loss.backward()  # after full_state() exited, as in the Trainer
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_recomputes_each_pass_with_its_own_attention():
    plain, ctx = _two_pass_grads(None), _two_pass_grads("context")
    assert all(torch.allclose(plain[n], ctx[n], atol=1e-6, rtol=1e-4) for n in plain)
    # without the context function the full-state pass is recomputed bounded, which torch detects
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _two_pass_grads("naive")


def test_run_with_checkpointing_and_a_full_state_lm_term(tmp_path):
    """Trainer.train() enables checkpointing itself; CheckpointingCallback re-enables it with the
    context function (a plain re-enable would raise CheckpointError at the first backward)."""
    from msrnn_train.train import train

    over = {"training.max_steps": 2, "eval.max_windows": 0, "budget.ramp_start": None, "budget.mode": "hard",
            "loss.full_lm_weight": 1.0, "loss.kl_weight": 0.0, "training.gradient_checkpointing": True}
    summary = train(tiny_recipe(tmp_path, **over))
    assert sorted(train_logs(summary["log_history"], "full_lm_loss")) == [1, 2]


def test_sampled_budget_is_uniform_over_the_set_and_reproducible():
    from msrnn_train.trainer import sampled_budget

    ks = [sampled_budget([16, 32, 64], seed=3, step=s) for s in range(300)]
    assert ks == [sampled_budget([16, 32, 64], seed=3, step=s) for s in range(300)]  # a resumed run agrees
    assert set(ks) == {16, 32, 64} and all(70 < ks.count(k) < 130 for k in (16, 32, 64))
    assert ks != [sampled_budget([16, 32, 64], seed=4, step=s) for s in range(300)]


@pytest.mark.parametrize("overrides, message", [
    ({"loss.teacher": "student"}, "loss.teacher"),
    ({"loss.full_lm_weight": -1.0}, "loss.full_lm_weight"),
    ({"loss.bounded_lm_weight": 0.0, "loss.kl_weight": 0.0}, "nothing to train"),
    ({"budget.train_budgets": [4, 8], "budget.policy": "full", "budget.mode": "hard"}, "budget.train_budgets"),
    ({"budget.train_budgets": []}, "budget.train_budgets"),
    ({"budget.train_budgets": [4, 0], "budget.ramp_start": None}, "budget.train_budgets[1]"),
    ({"budget.train_budgets": [4, 8], "budget.ramp_start": 16}, "budget.ramp_start"),
])
def test_objective_keys_are_checked(overrides, message):
    from msrnn_train.recipe import RecipeError

    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)


def test_full_state_lm_self_distillation_and_multi_budget_run(tmp_path):
    """LM on the bounded pass + LM on the full-state pass + KL to the model's own full-state
    prediction, K sampled per step: every part is logged, adds up, and K follows the sampler."""
    from msrnn_train.trainer import sampled_budget
    from msrnn_train.train import train

    over = {"training.max_steps": 6, "eval.max_windows": 0, "budget.ramp_start": None,
            "budget.mode": "hard", "loss.teacher": "self", "loss.full_lm_weight": 0.5, "loss.kl_weight": 0.25,
            "budget.train_budgets": [4, 8, 16]}
    summary = train(tiny_recipe(tmp_path, **over))
    hist = summary["log_history"]
    lm, full, kl, total, k = (train_logs(hist, key) for key in ("lm_loss", "full_lm_loss", "kl_loss", "loss",
                                                                   "budget_K"))
    assert sorted(lm) == sorted(full) == sorted(kl) == list(range(1, 7))
    for s in lm:
        assert total[s] == pytest.approx(lm[s] + 0.5 * full[s] + 0.25 * kl[s], rel=1e-5)
        assert k[s] == sampled_budget([4, 8, 16], 0, s - 1)  # logged after step s-1 began
    assert all(v > 0 for v in kl.values())  # the bounded student differs from its own full state
    assert all(abs(full[s] - lm[s]) > 1e-4 for s in lm)  # two different passes (full state vs K states)
    assert BudgetSpec.load(summary["output_dir"]).budget == 8  # the saved K is budget.budget


# ----------------------------------------------------------------------------- schedules
def test_schedule_callback_anneals_tau_and_ramps_k():
    from msrnn_train.trainer import BudgetScheduleCallback
    from msrnn_train.models import random_model

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", {"training.max_steps": 20, "soft.tau_start": 1.0,
                                                         "soft.tau_end": 0.1, "soft.hard_fraction": 0.25,
                                                         "budget.ramp_start": 16, "budget.budget": 8})
    model, _ = random_model()
    spec = recipe.budget_spec()
    apply_budget(model, spec)
    cb = BudgetScheduleCallback(recipe, spec)

    class State:
        global_step = 0

    taus, ks = [], []
    for step in range(20):
        State.global_step = step
        cb.on_step_begin(None, State, None, model=model)
        ctrl = get_controller(model)
        taus.append(ctrl.soft_temperature)
        ks.append({lb.budget for lb in ctrl.layers})
    assert taus[0] == pytest.approx(1.0)
    soft = [t for t in taus if t is not None]
    assert len(soft) == 15 and all(a > b for a, b in zip(soft, soft[1:])) and soft[-1] > 0.1 - 1e-9
    assert taus[15:] == [None] * 5  # the last quarter runs the exact process
    assert ks[0] == {16} and ks[-1] == {8} and ks[10:] == [{8}] * 10
    assert all(max(a) >= max(b) for a, b in zip(ks, ks[1:]))
    # an evaluation in between left another spec: the next step puts the training spec back
    apply_budget(model, BudgetSpec("window", 4))
    cb.on_step_begin(None, State, None, model=model)
    assert get_controller(model).spec == spec


# ----------------------------------------------------------------------------- evaluation
def test_eval_specs_put_the_training_spec_first():
    from msrnn_train.trainer import eval_specs

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", {"budget.policy": "h2o", "budget.mode": "hard",
                                                         "budget.ramp_start": None, "eval.policies": ["tova", "full"],
                                                         "eval.budgets": [8, 16]})
    specs = eval_specs(recipe, recipe.budget_spec())
    assert [(s.policy, s.budget if s.policy != "full" else None) for s in specs] == [
        ("h2o", 8), ("tova", 8), ("tova", 16), ("full", None)]


def test_training_evaluation_matches_a_plain_perplexity_loop():
    """The run's evaluation (evaluate.evaluate_specs over the recipe's grid, the one evaluator)
    gives the numbers of a plain teacher-forced perplexity loop under each spec."""
    import math

    import torch.nn.functional as F

    from msrnn_train.models import add_lora, random_model
    from msrnn_train.trainer import evaluate_run

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", {"eval.budgets": [4], "eval.batch_size": 2})
    model = add_lora(random_model()[0], recipe)
    spec = recipe.budget_spec()
    apply_budget(model, spec)
    windows = torch.randint(3, 250, (3, 24), generator=torch.Generator().manual_seed(0))
    with_evaluator = evaluate_run(model, windows, recipe, spec)

    @torch.no_grad()
    def plain(policy, budget):  # the loop train.py used to carry as a second evaluator
        apply_budget(model, BudgetSpec(policy="full") if budget is None else
                     BudgetSpec.from_dict({**spec.to_dict(), "policy": policy, "budget": budget, "mode": "hard"}))
        model.eval()
        nll, n = 0.0, 0
        for i in range(0, len(windows), 2):
            x = windows[i:i + 2]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
        return {"policy": policy, "budget": budget, "ppl": math.exp(nll / n), "tokens": n}

    inline = [plain(p, k) for p, k in [("tova", 8), ("tova", 4), ("full", None)]]
    apply_budget(model, spec)
    model.train()
    assert [(r["policy"], r["budget"]) for r in with_evaluator] == [("tova", 8), ("tova", 4), ("full", None)]
    for a, b in zip(with_evaluator, inline):
        assert (a["policy"], a["budget"], a["tokens"]) == (b["policy"], b["budget"], b["tokens"])
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    with_evaluator = evaluate_run(model, windows, recipe, spec)
    assert get_controller(model).spec == spec  # the training budget is back


# ----------------------------------------------------------------------------- data
def test_windows_split_by_document_and_never_cross(tmp_path):
    from msrnn_train.data import build_windows
    from msrnn_train.models import random_model

    folder = tmp_path / "docs"
    folder.mkdir()
    for i, ch in enumerate("abcde"):  # each document one repeated letter: a window shows its origin
        (folder / f"d{i}.txt").write_text(ch * (100 + 37 * i))
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", {"data.source": str(folder), "data.seq_len": 32,
                                                         "data.heldout": ["d1"], "eval.max_windows": 100,
                                                         "data.max_train_windows": None})
    _, tok = random_model()
    train, held = build_windows(recipe, tok)
    letters = lambda w: set(tok.decode(w))  # noqa: E731
    assert all(len(letters(w)) == 1 for w in torch.cat([train, held]))  # no window crosses a document
    assert {next(iter(letters(w))) for w in held} == {"b"}
    assert "b" not in {next(iter(letters(w))) for w in train}
    assert len(train) == sum((100 + 37 * i) // 32 for i in (0, 2, 3, 4))


def test_single_document_cannot_be_split(tmp_path):
    from msrnn_train.recipe import RecipeError
    from msrnn_train.data import split_documents

    with pytest.raises(RecipeError, match="data.heldout: cannot hold out 1 of 1 document"):
        split_documents({"only": "text"}, "x.txt", None, 0)


# ----------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run through `train()`: 8 steps, soft-TOVA annealed, budget ramp, KL on,
    a push to the Hub that cannot succeed (HF_HUB_OFFLINE)."""
    from msrnn_train.train import train

    tmp = tmp_path_factory.mktemp("run")
    with tiny_run_env(tmp / "cache"):
        recipe = tiny_recipe(tmp, **{"hub.push_to_hub": True, "hub.repo_id": "someone/tiny-tova8",
                                     "training.max_steps": 12, "training.save_steps": 6})
        summary = train(recipe)
    return recipe, summary


def test_run_writes_a_complete_output_folder(trained):
    recipe, summary = trained
    out = Path(summary["output_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "msrnn_budget.json", "recipe.yaml", "eval_results.json", "README.md"):
        assert (out / name).is_file(), name
    assert BudgetSpec.load(out) == recipe.budget_spec() and "mode" not in BudgetSpec.load(out).to_dict()
    assert load_recipe(out / "recipe.yaml") == recipe
    results = json.loads((out / "eval_results.json").read_text())
    assert results["tokens_per_second"] > 0 and results["peak_memory_mb"] > 0
    # every checkpoint also holds the budget and the recipe
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts and all((c / "msrnn_budget.json").is_file() and (c / "recipe.yaml").is_file() for c in ckpts)
    # the push could not happen; the run says so and the folder is all there
    assert "push_error" in summary and str(out.resolve()) in summary["push_error"]
    assert "intact" in summary["push_error"]


def test_run_logs_both_losses_tau_k_and_throughput(trained):
    recipe, summary = trained
    hist = summary["log_history"]
    lm, kl, tau, k = (train_logs(hist, key) for key in ("lm_loss", "kl_loss", "tau", "budget_K"))
    steps = recipe.training.max_steps
    assert sorted(lm) == list(range(1, steps + 1)) and sorted(kl) == sorted(lm)
    assert all(v >= 0 for v in kl.values()) and max(kl.values()) > 0
    total = train_logs(hist, "loss")
    for s in lm:  # loss = bounded_lm_weight * CE + kl_weight * KL
        assert total[s] == pytest.approx(recipe.loss.bounded_lm_weight * lm[s] + recipe.loss.kl_weight * kl[s], rel=1e-5)
    assert tau[1] == pytest.approx(recipe.soft.tau_start)
    assert tau[steps] == 0.0  # logged 0 = hard: training ends on the inference process
    assert k[1] == recipe.budget.ramp_start and k[steps] == recipe.budget.budget
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_mb"] > 0 for h in hist if "lm_loss" in h)


def test_bounded_heldout_perplexity_goes_down(trained):
    recipe, summary = trained
    before = {(r["policy"], r["budget"]): r["ppl"] for r in summary["before"]}
    after = {(r["policy"], r["budget"]): r["ppl"] for r in summary["after"]}
    key = ("tova", recipe.budget.budget)
    assert after[key] < 0.9 * before[key]
    assert all(math.isfinite(v) for v in after.values())
    lm = train_logs(summary["log_history"], "lm_loss")
    assert sum(list(lm.values())[-3:]) < sum(list(lm.values())[:3])


# ----------------------------------------------------------------------------- resume
class Crash(TrainerCallback):
    """Kill the run right after the checkpoint at `step` is written (a pre-emption)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("pre-empted")


def test_resume_continues_the_same_run(tmp_path):
    from msrnn_train.train import train

    over = {"training.max_steps": 8, "training.save_steps": 4, "eval.max_windows": 0, "training.save_total_limit": 5,
            "lora.dropout": 0.1}  # dropout: the RNG state must be restored too
    whole = train(tiny_recipe(tmp_path / "a", **over))

    interrupted = tiny_recipe(tmp_path / "b", **over)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, callbacks=[Crash(4)])
    out_b = Path(interrupted.training.output_dir)
    assert (out_b / "checkpoint-4").is_dir() and not (out_b / "adapter_model.safetensors").exists()
    resumed = train(tiny_recipe(tmp_path / "b", **over, **{"training.resume_from_checkpoint": True}))

    for key in ("loss", "lm_loss", "kl_loss", "grad_norm", "learning_rate", "tau", "budget_K"):
        a, b = train_logs(whole["log_history"], key), train_logs(resumed["log_history"], key)
        assert sorted(a) == sorted(b) == list(range(1, 9)), key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)
    wa = load_file(str(Path(whole["output_dir"]) / "adapter_model.safetensors"))
    wb = load_file(str(out_b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name


# ----------------------------------------------------------------------------- W&B
def test_wandb_goes_offline_without_a_key_and_keeps_the_recipe(tmp_path, monkeypatch, capsys):
    from msrnn_train.train import train

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tiny_recipe(tmp_path, **{"wandb.mode": "auto", "wandb.project": "msrnn-tests", "wandb.name": "tiny",
                                      "training.max_steps": 2, "eval.max_windows": 2})
    summary = train(recipe)
    err = capsys.readouterr().err
    assert "no API key found" in err and "OFFLINE" in err and "wandb sync" in err
    runs = sorted((Path(summary["output_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in err
    files = runs[0] / "files"
    assert yaml.safe_load((files / "recipe.yaml").read_text()) == recipe.to_dict()
    logged = list(runs[0].glob("run-*.wandb"))  # the offline record stream `wandb sync` uploads
    assert len(logged) == 1
    stream = logged[0].read_bytes()
    for needle in (b"kl_temperature", b"budget_spec", b"lm_loss", b"kl_loss", b"tokens_per_second", b"peak_memory_mb",
                   b"tau"):
        assert needle in stream, needle  # the resolved recipe as run config, and the metrics


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_embedded_default_recipe_runs_on_the_real_model(tmp_path, monkeypatch):
    """The embedded-default recipe end to end on the real SmolLM2-135M and Gutenberg books, cut
    short (T=128, 2 steps); the full acceptance run is `python -m msrnn_train.train`."""
    from msrnn_train.hub import load_bounded
    from msrnn_train.train import train

    monkeypatch.delenv("MSRNN_CACHE")  # the converted model and the books live in the real cache
    recipe = load_recipe(None, {"data.seq_len": 128, "budget.budget": 16, "eval.budgets": [16], "eval.max_windows": 1,
                                "training.max_steps": 2, "training.save_steps": 2, "wandb.mode": "disabled",
                                "training.output_dir": str(tmp_path / "out"), "data.max_train_windows": 64})
    summary = train(recipe)
    lm = train_logs(summary["log_history"], "lm_loss")
    assert sorted(lm) == [1, 2] and all(math.isfinite(v) and 0 < v < 10 for v in lm.values())
    assert {(r["policy"], r["budget"]) for r in summary["after"]} == {("tova", 16), ("full", None)}
    model, tok = load_bounded(summary["output_dir"])
    ids = tok("To be, or not to be, that is the question: " * 4, return_tensors="pt")["input_ids"]
    summary["model"].eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits,
                              summary["model"](input_ids=ids, use_cache=False).logits, atol=1e-4)


def test_training_arguments_are_the_recipe_training_section():
    """Every recipe.training key but the run's own is the TrainingArguments field of that name, with
    the recipe's value: renaming either side breaks this test, not a run."""
    import dataclasses

    from transformers import TrainingArguments

    from msrnn_train.recipe import TrainingConfig
    from msrnn_train.trainer import RUN_KEYS, training_arguments

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", {"training.max_steps": 7, "training.learning_rate": 3e-4,
                                                          "training.warmup_steps": 1, "training.save_total_limit": 1})
    args = training_arguments(recipe)
    passed = [f.name for f in dataclasses.fields(TrainingConfig) if f.name not in RUN_KEYS]
    assert set(passed) <= set(TrainingArguments.__dataclass_fields__)
    assert all(getattr(args, k) == getattr(recipe.training, k) or k in ("lr_scheduler_type", "optim", "output_dir")
               for k in passed)
    assert (args.max_steps, args.learning_rate, args.warmup_steps, args.save_total_limit) == (7, 3e-4, 1, 1)
    assert str(args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value") else args.lr_scheduler_type) \
        == recipe.training.lr_scheduler_type
    assert args.data_seed == recipe.training.seed and args.remove_unused_columns is False
