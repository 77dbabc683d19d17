#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 on the GPU(s) of this machine, against one plain process on the same
# global batch: loss curves, DeepSpeed checkpoints holding the LoRA weights, resume from step 4,
# and the final adapter reloaded WITHOUT DeepSpeed giving the plain run's logits. Writes
# $OUT_DIR/zero_report.md (quote it) and zero_report.json.
#
#   bash scripts/run_zero.sh [OUT_DIR]            # default: outputs/zero-check
#   MSRNN_DS_WHEELS=dir bash scripts/run_zero.sh  # install deepspeed offline from wheels in dir
#   NGPU=2 bash scripts/run_zero.sh               # processes (default: every visible GPU)
#
# Needs a venv with a CUDA build of torch (MSRNN_VENV, default ./.venv) and deepspeed
# (pip install 'msrnn-train[deepspeed]'). Uses the tiny random Llama and a synthetic corpus: no
# download. The same checks run on the CPU in tests/test_multiprocess.py when deepspeed is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MSRNN_VENV:-.venv}
PY="$VENV/bin/python"
OUT_DIR=${1:-outputs/zero-check}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MSRNN_CACHE="$OUT_DIR/cache"
unset ACCELERATE_USE_CPU

if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  if [ -n "${MSRNN_DS_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$MSRNN_DS_WHEELS" deepspeed
  else
    "$PY" -m pip install -q 'deepspeed>=0.15'
  fi
fi
NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
if [ "$NGPU" -lt 1 ]; then
  echo "run_zero.sh: no CUDA device; on a CPU run: pytest tests/test_multiprocess.py -k zero" >&2
  exit 1
fi
mkdir -p "$OUT_DIR"
"$PY" - "$OUT_DIR/corpus" <<'EOF'
import random, sys
from pathlib import Path
rng = random.Random(0)
phrases = ["the king is dead", "long live the king", "to be or not to be", "all the world is a stage",
           "a horse a horse", "my kingdom for a horse", "now is the winter", "of our discontent"]
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
for i in range(6):
    (folder / f"doc{i}.txt").write_text(". ".join(rng.choice(phrases) for _ in range(125)))
EOF

# per-device batch 1 on NGPU processes, 2 accumulation steps = the plain run's batch NGPU x 2
COMMON=(--data.source "$OUT_DIR/corpus" --data.heldout 1 --eval.max_windows 2 --training.max_steps 8
        --training.save_steps 4 --training.save_total_limit 5 --training.gradient_accumulation_steps 2)
if [ "$NGPU" -eq 1 ]; then
  LAUNCH=(--use_deepspeed --num_processes 1)
else
  LAUNCH=(--config_file recipes/accelerate/multi_gpu.yaml --num_processes "$NGPU")
fi
launch() { "$PY" -m accelerate.commands.launch "$@"; }

echo "[run_zero] plain reference: 1 process, per-device batch $NGPU"
rm -rf "$OUT_DIR/plain"
"$PY" msrnn_train/train.py recipes/tiny.yaml "${COMMON[@]}" --training.output_dir "$OUT_DIR/plain" \
  --training.per_device_train_batch_size "$NGPU"
for stage in 2 3; do
  run="$OUT_DIR/zero$stage"
  echo "[run_zero] ZeRO-$stage: $NGPU process(es), per-device batch 1"
  rm -rf "$run" "$run-resumed"
  launch "${LAUNCH[@]}" msrnn_train/train.py recipes/tiny.yaml "${COMMON[@]}" --training.output_dir "$run" \
    --training.per_device_train_batch_size 1 --deepspeed "recipes/deepspeed/zero$stage.json"
  echo "[run_zero] ZeRO-$stage: resume from checkpoint-4 in a fresh folder"
  mkdir -p "$run-resumed" && cp -r "$run/checkpoint-4" "$run-resumed/"
  launch "${LAUNCH[@]}" msrnn_train/train.py recipes/tiny.yaml "${COMMON[@]}" --training.output_dir "$run-resumed" \
    --training.per_device_train_batch_size 1 --deepspeed "recipes/deepspeed/zero$stage.json" \
    --training.resume_from_checkpoint true
done

echo "[run_zero] report"
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
CUDA_VISIBLE_DEVICES="" "$PY" - "$OUT_DIR" "$NGPU" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from msrnn_train.hub import load_bounded

out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
def logs(d, key="loss"):
    state = json.loads((d / "checkpoint-8" / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h and "train_runtime" not in h}
def adapter_diff(a, b):
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa), "adapter keys/shapes differ"
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)

plain = logs(out / "plain")
rep = {"processes": ngpu, "device": sys.argv[3], "torch": torch.__version__}
try:
    import deepspeed
    rep["deepspeed"] = deepspeed.__version__
except ImportError:
    pass
lines = [f"# ZeRO check: {ngpu} process(es), tiny Llama, 8 steps, global batch {2 * ngpu} windows", "",
         "| step | plain | ZeRO-2 | ZeRO-3 | ZeRO-2 resumed | ZeRO-3 resumed |", "|---|---|---|---|---|---|"]
cur = {name: logs(out / name) for name in ("zero2", "zero3", "zero2-resumed", "zero3-resumed")}
for s in sorted(plain):
    lines.append(f"| {s} | {plain[s]:.6f} | " + " | ".join(f"{cur[n].get(s, float('nan')):.6f}" for n in cur) + " |")
lines.append("")
ids = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))
m_plain, _ = load_bounded(out / "plain")
with torch.no_grad():
    ref_logits = m_plain(input_ids=ids, use_cache=False).logits
for stage in (2, 3):
    run = out / f"zero{stage}"
    ds_files = sorted(p.name for p in (run / "checkpoint-8" / "global_step8").glob("*.pt"))
    m, _ = load_bounded(run)  # plain transformers + peft, CPU, no DeepSpeed engine
    with torch.no_grad():
        logit_diff = (m(input_ids=ids, use_cache=False).logits - ref_logits).abs().max().item()
    r = {"max_rel_loss_diff_vs_plain": max(abs(cur[f"zero{stage}"][s] - plain[s]) / plain[s] for s in plain),
         "resume_max_abs_loss_diff_steps_5_8": max(abs(cur[f"zero{stage}-resumed"][s] - cur[f"zero{stage}"][s])
                                                   for s in range(5, 9)),
         "checkpoint4_adapter_max_abs_diff_vs_plain": adapter_diff(run / "checkpoint-4", out / "plain" / "checkpoint-4"),
         "final_adapter_max_abs_diff_vs_plain": adapter_diff(run, out / "plain"),
         "resumed_final_adapter_max_abs_diff": adapter_diff(out / f"zero{stage}-resumed", run),
         "reloaded_without_deepspeed_max_abs_logit_diff_vs_plain": logit_diff,
         "deepspeed_checkpoint_files": ds_files,
         "eval": json.loads((run / "eval_results.json").read_text()).get("after")}
    rep[f"zero{stage}"] = r
    lines += [f"## ZeRO-{stage}"] + [f"- {k}: {v}" for k, v in r.items()] + [""]
(out / "zero_report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
(out / "zero_report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
