"""Multi-process training, run for real on the CPU.

* DDP (always; CI): `accelerate launch` with the shipped `recipes/accelerate/multi_gpu.yaml`, two
  processes over gloo, per-device batch 1, against one process with per-device batch 2 - the same
  global batch of 2 x 2 (gradient accumulation) windows. accelerate's data loader gives batch i to
  rank i mod 2, so micro-step m of rank r reads window 2m + r of the (seeded, rank-synchronised)
  permutation, and the single process reads windows 2m and 2m + 1 in one batch. Every window has
  seq_len tokens and the loss is a per-batch mean, so the DDP-averaged gradient is the single
  process's gradient up to float32 summation order.
* Config hygiene (always, cheap): the DeepSpeed JSONs leave every option that the recipe sets to
  the Trainer ("auto"), the accelerate configs describe machines and processes only.
* DeepSpeed ZeRO-2 and ZeRO-3 on DeepSpeed's CPU accelerator (only when `deepspeed` is importable:
  `pip install 'msrnn-train[deepspeed]'`; the first run JIT-compiles DeepSpeed's shared-memory
  communication op, a few minutes): same curve as one plain process, the LoRA weights in every
  checkpoint (gathered under ZeRO-3), resume, and the final adapter reloading without DeepSpeed.

Tolerances: float32 with reordered sums differs by ~1e-7 relative per step, and Adam's
normalisation amplifies that for near-zero gradient coordinates. Measured over the 8 steps: at most
2.7e-7 relative on the loss, 6.6e-7 absolute on the LoRA weights (ZeRO-3's flattened partitions;
DDP: 3e-8), 2.5e-7 on reloaded logits. We allow 1e-5 relative on losses and 1e-5 absolute on
weights and logits. A real mistake is far outside: a wrong global batch (one process with per-device
batch 1, which is what `accelerate launch --cpu --num_processes 2` silently runs) is off by 3.5e-3
relative at step 1, and one Adam step at lr 5e-3 moves a weight by ~5e-3.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_corpus, tiny_run_env
from msrnn_train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "msrnn_train" / "train.py"
TINY = ROOT / "recipes" / "tiny.yaml"
DS_DIR = ROOT / "recipes" / "deepspeed"
ACCEL_DIR = ROOT / "recipes" / "accelerate"
MULTI_GPU = ACCEL_DIR / "multi_gpu.yaml"
STEPS = 8
LOSS_REL = 1e-5
WEIGHT_ATOL = 1e-5
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'msrnn-train[deepspeed]'); "
                              "ZeRO runs on a GPU machine: scripts/run_zero.sh")
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


# ----------------------------------------------------------------------------- helpers
def run_overrides(out: Path, corpus: Path, **more) -> dict:
    """tiny.yaml (8 steps, per-device batch 2, gradient accumulation 2, checkpoints at 4 and 8)."""
    over = {"data.source": str(corpus), "data.heldout": 1, "training.output_dir": str(out), "eval.max_windows": 0,
            "training.max_steps": STEPS, "training.save_steps": 4, "training.save_total_limit": 5,
            "wandb.mode": "disabled"}
    over.update(more)
    return over


def cli(over: dict) -> list[str]:
    return [tok for key, value in over.items() for tok in (f"--{key}", json.dumps(value) if not isinstance(value, str)
                                                           else value)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp: Path, **extra) -> dict:
    """No inherited launcher state; W&B and the Hub off; one thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_")) and k not in _DIST_VARS}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MSRNN_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_launch(launcher: list[str], script: Path, over: dict, env: dict, port: int | None = None):
    """`python -m accelerate.commands.launch LAUNCHER SCRIPT tiny.yaml --key value ...` in its own
    process group (so that a hung collective can be killed with all its workers)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port",
           str(port or free_port()), str(script), str(TINY), *cli(over)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True), cmd


def finish_launch(proc, cmd, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{out[-6000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}"
    return out


def accelerate_launch(launcher: list[str], script: Path, over: dict, env: dict, timeout: float) -> str:
    return finish_launch(*start_launch(launcher, script, over, env), timeout)


def step_logs(out: Path, key: str, checkpoint: str = f"checkpoint-{STEPS}") -> dict[int, float]:
    state = json.loads((out / checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h and "train_runtime" not in h}


def assert_same_curve(run: Path, ref: Path, steps=range(1, STEPS + 1)):
    for key in ("loss", "lm_loss", "grad_norm", "learning_rate"):
        a, b = step_logs(ref, key), step_logs(run, key)
        assert set(steps) <= set(a) and set(steps) <= set(b), (key, sorted(a), sorted(b))
        for s in steps:
            assert b[s] == pytest.approx(a[s], rel=LOSS_REL, abs=1e-9), (key, s, a[s], b[s])
    a, b = step_logs(ref, "kl_loss"), step_logs(run, "kl_loss")  # ~1e-4 .. 2e-2: relative and absolute
    for s in steps:
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-7), ("kl_loss", s, a[s], b[s])


def assert_same_adapter(run_dir: Path, ref_dir: Path):
    a = load_file(str(ref_dir / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and any("lora_B" in k for k in a)
    for name in a:
        assert b[name].shape == a[name].shape and b[name].dtype == a[name].dtype, name  # gathered, not a shard
        assert torch.allclose(b[name], a[name], atol=WEIGHT_ATOL, rtol=0), (name, (b[name] - a[name]).abs().max())
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # trained (B starts at zero)


def assert_same_logits(run_dir: Path, ref_dir: Path):
    """The saved adapter reloads with plain transformers + peft (no DeepSpeed engine) under its budget
    and gives the reference run's logits."""
    from msrnn_train import get_budget
    from msrnn_train.hub import load_bounded

    (m_run, tok), (m_ref, _) = load_bounded(run_dir), load_bounded(ref_dir)
    assert get_budget(m_run) == get_budget(m_ref) and get_budget(m_run).policy == "tova"
    ids = torch.randint(3, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = m_ref(input_ids=ids, use_cache=False).logits
        lb = m_run(input_ids=ids, use_cache=False).logits
    assert torch.allclose(lb, la, atol=1e-5, rtol=0), (lb - la).abs().max()


def resume_from(run: Path, step: int, new: Path) -> Path:
    """A fresh output folder holding only checkpoint-`step` of `run` (as if pre-empted right after it)."""
    new.mkdir(parents=True)
    shutil.copytree(run / f"checkpoint-{step}", new / f"checkpoint-{step}")
    return new


def assert_matches_reference(out: Path, reference: Path) -> None:
    """Same loss curve and the same adapter (in checkpoint-4 and the final folder) as the plain run."""
    assert_same_curve(out, reference)
    assert_same_adapter(out / "checkpoint-4", reference / "checkpoint-4")
    assert_same_adapter(out, reference)


def assert_resume_continues(launcher, script, over: dict, out: Path, new: Path, env: dict, reference: Path) -> None:
    """Resumed from checkpoint-4 in a fresh folder, the run continues the same curve to the same
    adapter; and the finished run reloads without DeepSpeed to the plain run's logits."""
    resumed = resume_from(out, 4, new)
    accelerate_launch(launcher, script, {**over, "training.output_dir": str(resumed),
                                         "training.resume_from_checkpoint": True}, env, timeout=400)
    assert_same_curve(resumed, out, steps=range(5, STEPS + 1))
    assert_same_adapter(resumed, out)
    assert_same_logits(out, reference)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    make_corpus(tmp / "corpus")
    return tmp


@pytest.fixture(scope="module")
def reference(workdir):
    """One plain process, per-device batch 2: the curve every multi-process run must reproduce."""
    from msrnn_train.train import train

    out = workdir / "single"
    with tiny_run_env(workdir / "cache"):
        train(load_recipe(TINY, run_overrides(out, workdir / "corpus")))
    return out


# ----------------------------------------------------------------------------- DDP over gloo (CI)
@pytest.mark.slow  # ~11 s on 2 CPU cores (two processes launched, plus the one-process reference run)
def test_two_cpu_processes_under_accelerate_equal_one_process(workdir, reference):
    out = workdir / "ddp"
    # The shipped multi-GPU config with 2 processes; ACCELERATE_USE_CPU=true makes them CPU processes
    # over gloo (`--cpu --num_processes 2` would silently run ONE process: accelerate's multi-CPU
    # launcher is mpirun).
    accelerate_launch(["--config_file", str(MULTI_GPU), "--num_processes", "2"], TRAIN,
                      run_overrides(out, workdir / "corpus", **{"training.per_device_train_batch_size": 1}),
                      clean_env(workdir, ACCELERATE_USE_CPU="true"), timeout=400)
    ckpt = out / f"checkpoint-{STEPS}"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # two ranks ran
    args = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert args.per_device_train_batch_size == 1 and args.gradient_accumulation_steps == 2
    assert_matches_reference(out, reference)
    assert_same_logits(out, reference)


@pytest.mark.slow  # ~11 s on 2 CPU cores (two launcher processes)
def test_two_machines_with_the_multi_node_config(workdir, reference):
    """The multi-node recipe as documented (the same command on every machine, its own --machine_rank),
    with two "machines" on this host: 1 process each, rendezvous at 127.0.0.1."""
    out, port = workdir / "two-nodes", free_port()
    over = run_overrides(out, workdir / "corpus", **{"training.per_device_train_batch_size": 1})
    env = clean_env(workdir, ACCELERATE_USE_CPU="true")
    launches = [start_launch(["--config_file", str(ACCEL_DIR / "multi_node.yaml"), "--num_processes", "2",
                              "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"], TRAIN, over, env, port)
                for rank in (0, 1)]
    for proc, cmd in launches:
        finish_launch(proc, cmd, timeout=400)
    assert (out / f"checkpoint-{STEPS}" / "rng_state_1.pth").is_file()
    assert_same_curve(out, reference)
    assert_same_adapter(out, reference)


# ----------------------------------------------------------------------------- config hygiene (CI)
# DeepSpeed keys the HF Trainer writes from TrainingArguments (transformers.integrations.deepspeed,
# HfTrainerDeepSpeedConfig.trainer_config_process/_finalize): in the JSON they must be "auto" or absent,
# so that the recipe stays the one place that sets them.
TRAINER_FILLS = {
    "train_micro_batch_size_per_gpu": "training.per_device_train_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "train_batch_size": "world size x per_device_train_batch_size x gradient_accumulation_steps",
    "gradient_clipping": "training.max_grad_norm",
    "fp16.enabled": "training.fp16",
    "bf16.enabled": "training.bf16",
    "optimizer.params.lr": "training.learning_rate",
    "optimizer.params.weight_decay": "training.weight_decay",
    "optimizer.params.betas": "TrainingArguments.adam_beta1/adam_beta2",
    "optimizer.params.eps": "TrainingArguments.adam_epsilon",
    "scheduler.params.warmup_max_lr": "training.learning_rate",
    "scheduler.params.warmup_num_steps": "training.warmup_steps",
    "scheduler.params.total_num_steps": "training.max_steps",
}
SIZED_FROM_MODEL = {"zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold"}
# accelerate config keys that would set a training option a second time (the recipe owns them)
ACCEL_FORBIDDEN = {"mixed_precision": "training.bf16 / training.fp16 (ACCELERATE_MIXED_PRECISION turns "
                                      "bf16 on behind a recipe that says false)",
                   "fsdp_config": "a different sharding engine", "deepspeed_config_file": "the recipe's deepspeed:",
                   "zero_stage": "the recipe's deepspeed: JSON", "gradient_accumulation_steps": "the recipe",
                   "gradient_clipping": "training.max_grad_norm", "offload_optimizer_device": "the DeepSpeed JSON",
                   "offload_param_device": "the DeepSpeed JSON", "zero3_init_flag": "the DeepSpeed JSON",
                   "zero3_save_16bit_model": "the DeepSpeed JSON"}
DS_LAUNCHER_KEYS = {"deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_exclusion_filter",
                    "deepspeed_inclusion_filter"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _ds_configs() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DS_DIR.glob("*.json"))}


def test_deepspeed_configs_leave_every_recipe_option_to_the_trainer():
    configs = _ds_configs()
    assert {"zero2.json", "zero3.json"} <= set(configs)
    for name, cfg in configs.items():
        flat = _flat(cfg)
        for key, source in TRAINER_FILLS.items():
            if key in flat:
                assert flat[key] == "auto", f"{name}: {key}={flat[key]!r} is set by the recipe ({source}); use \"auto\""
        # an optimizer/scheduler section's `type` would override training.optim / lr_scheduler_type
        assert "optimizer" not in cfg and "scheduler" not in cfg, name
        for key, value in flat.items():  # DeepSpeed itself cannot read "auto"
            if value == "auto":
                assert key in TRAINER_FILLS or key in SIZED_FROM_MODEL, f"{name}: nobody fills {key}=\"auto\""
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "bf16.enabled", "fp16.enabled"):
            assert flat.get(key) == "auto", (name, key)
    assert configs["zero2.json"]["zero_optimization"]["stage"] == 2
    z3 = configs["zero3.json"]["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True  # LoRA weights at save


def test_recipes_name_existing_deepspeed_configs():
    named = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if raw.get("deepspeed"):
            recipe = load_recipe(path)
            assert Path(recipe.deepspeed).is_file(), (path.name, recipe.deepspeed)
            named[path.name] = Path(recipe.deepspeed).resolve()
    assert named, "no recipe selects a DeepSpeed config"
    assert set(named.values()) <= {p.resolve() for p in DS_DIR.glob("*.json")}
    # the override that switches any recipe to ZeRO-3
    z3 = load_recipe(TINY, {"deepspeed": str(DS_DIR / "zero3.json")})
    assert Path(z3.deepspeed).resolve() == (DS_DIR / "zero3.json").resolve()


def test_accelerate_configs_describe_machines_only():
    paths = sorted(ACCEL_DIR.glob("*.yaml"))
    assert MULTI_GPU in paths and len(paths) >= 2
    for path in paths:
        cfg = yaml.safe_load(path.read_text())
        flat = _flat({k: v for k, v in cfg.items() if k != "deepspeed_config"})
        for key, owner in ACCEL_FORBIDDEN.items():
            assert key not in flat, f"{path.name}: {key} belongs to {owner}"
        assert cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED"), path.name
        assert set(cfg.get("deepspeed_config") or {}) <= DS_LAUNCHER_KEYS, f"{path.name}: the recipe picks the JSON"
        assert cfg["num_processes"] >= cfg["num_machines"] >= 1 and 0 <= cfg["machine_rank"] < cfg["num_machines"]
        if cfg["num_machines"] > 1:
            assert cfg.get("main_process_ip") and cfg.get("main_process_port"), path.name


@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
@pytest.mark.parametrize("recipe_name", ["tiny.yaml", "mistral_tova512.yaml", "smollm2_gutenberg.yaml"])
def test_trainer_fills_every_auto_without_a_mismatch(config, recipe_name):
    """What the Trainer does with the JSON at start-up (HfTrainerDeepSpeedConfig): every "auto" is
    replaced from the recipe's TrainingArguments and nothing disagrees."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from msrnn_train.trainer import training_arguments
    from msrnn_train.models import random_model

    recipe = load_recipe(ROOT / "recipes" / recipe_name, {"deepspeed": None})
    t = recipe.training
    # TrainingArguments refuses bf16 without a GPU: build it without, then put the recipe's flags back
    args = training_arguments(load_recipe(ROOT / "recipes" / recipe_name, {
        "deepspeed": None, "training.bf16": t.bf16 and torch.cuda.is_available(),
        "training.fp16": t.fp16 and torch.cuda.is_available()}))
    args.bf16, args.fp16 = t.bf16, t.fp16
    ds = HfTrainerDeepSpeedConfig(json.loads((DS_DIR / config).read_text()))
    try:
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, random_model()[0], recipe.training.max_steps)
        assert ds.mismatches == []
        flat = _flat(ds.config)
        assert "auto" not in flat.values(), {k for k, v in flat.items() if v == "auto"}
        assert flat["train_micro_batch_size_per_gpu"] == t.per_device_train_batch_size
        assert flat["gradient_accumulation_steps"] == t.gradient_accumulation_steps
        assert flat["gradient_clipping"] == t.max_grad_norm
        assert flat["bf16.enabled"] == t.bf16 and flat["fp16.enabled"] == t.fp16
    finally:
        unset_hf_deepspeed_config()  # a live config would make every later from_pretrained use zero.Init


# ----------------------------------------------------------------------------- DeepSpeed on CPU
# accelerate picks no torch.distributed backend for a DeepSpeed run in non-cpu mode on a machine
# without an accelerator, so two CPU ranks would each see world size 1. This shim hands it gloo
# (what DeepSpeed's CPU accelerator uses without oneCCL); GPU runs need nothing of the kind.
_GLOO_SHIM = '''
import os, runpy, sys
import accelerate.state as st
_orig = st.PartialState._prepare_backend
def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, kind = _orig(self, cpu, sagemaker_dp, backend)
    if backend is None and int(os.environ.get("LOCAL_RANK", -1)) != -1 and \\
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        backend = "gloo"
    return backend, kind
st.PartialState._prepare_backend = _prepare_backend
sys.argv[0] = TRAIN
runpy.run_path(TRAIN, run_name="__main__")
'''


def ds_env(workdir: Path) -> dict:
    return clean_env(workdir, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def deepspeed_cpu_ops():
    """DeepSpeed's CPU communication op compiles on first use (minutes on 2 cores, then cached under
    ~/.cache/torch_extensions): once, here, so that the launches' timeouts only catch hangs."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    builder = ShareMemCommBuilder()
    if builder.is_compatible():
        builder.load()


@needs_deepspeed
@pytest.mark.slow
def test_zero2_one_process_same_curve_checkpoints_resume_and_reload(workdir, reference, deepspeed_cpu_ops):
    """The one-GPU command (`accelerate launch --use_deepspeed --num_processes 1`) on DeepSpeed's
    CPU accelerator: ZeRO-2 gives the plain run's curve and adapter, checkpoints are DeepSpeed
    checkpoints, and resuming from step 4 continues the same curve."""
    out = workdir / "zero2"
    over = run_overrides(out, workdir / "corpus", deepspeed=str(DS_DIR / "zero2.json"))
    launcher = ["--use_deepspeed", "--num_processes", "1"]
    accelerate_launch(launcher, TRAIN, over, ds_env(workdir), timeout=400)
    assert (out / "checkpoint-4" / "global_step4").is_dir() and list((out / "checkpoint-4" / "global_step4").glob(
        "*optim_states.pt"))
    assert_matches_reference(out, reference)
    assert_resume_continues(launcher, TRAIN, over, out, workdir / "zero2-resumed", ds_env(workdir), reference)


@needs_deepspeed
@pytest.mark.slow
def test_zero3_two_processes_shard_gather_resume_and_reload(workdir, reference, deepspeed_cpu_ops):
    """ZeRO-3 over two CPU ranks with the shipped multi-GPU accelerate config, the base model loaded
    from a folder (so from_pretrained partitions it under zero.Init), evaluation on: same curve as one
    plain process, optimizer state sharded over both ranks, full LoRA weights gathered into every
    checkpoint and the final folder, resume, reload without DeepSpeed."""
    from msrnn_train.models import random_model

    base = workdir / "tiny-llama-dir"
    if not base.is_dir():
        model, tok = random_model()
        model.save_pretrained(base)
        tok.save_pretrained(base)
    shim = workdir / "zero_cpu_shim.py"
    shim.write_text(f"TRAIN = {str(TRAIN)!r}\n{_GLOO_SHIM}")
    out = workdir / "zero3"
    over = run_overrides(out, workdir / "corpus", deepspeed=str(DS_DIR / "zero3.json"),
                         **{"training.per_device_train_batch_size": 1, "model.source": str(base),
                            "eval.max_windows": 2})
    launcher = ["--config_file", str(MULTI_GPU), "--num_processes", "2"]
    accelerate_launch(launcher, shim, over, ds_env(workdir), timeout=400)

    shards = sorted(p.name for p in (out / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_1" in s for s in shards), shards  # partitioned over 2 ranks
    assert_matches_reference(out, reference)  # LoRA weights gathered at every save
    results = json.loads((out / "eval_results.json").read_text())
    before = {(r["policy"], r["budget"]): r["ppl"] for r in results["before"]}
    after = {(r["policy"], r["budget"]): r["ppl"] for r in results["after"]}
    assert ("tova", 8) in after and after[("tova", 8)] < before[("tova", 8)]

    assert_resume_continues(launcher, shim, over, out, workdir / "zero3-resumed", ds_env(workdir), reference)
