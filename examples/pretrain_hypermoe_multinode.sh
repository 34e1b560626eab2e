#!/usr/bin/env bash
# Several nodes: one launcher per node (the deepspeed launcher with a hostfile, or torchrun).
# Every node needs the same checkout, .venv and data paths; --save must be on a filesystem every
# node mounts (checked before the first step); --data-cache-path may be shared or node-local.
# The global batch is split over all ranks (data parallel, ZeRO-2); rerunning the same command
# resumes from --save (SIGTERM makes the trainer save and exit 0). See docs/parallelism.md,
# "Several nodes".
#
#   deepspeed, from one node (ssh to every host of the hostfile, "host slots=N" per line):
#     HOSTFILE=hostfile DATA_PREFIX=... TOKENIZER=... bash examples/pretrain_hypermoe_multinode.sh
#   deepspeed or torchrun, the same command on every node (no ssh; SLURM: pretrain_hypermoe_slurm.sh):
#     NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> HOSTFILE=hostfile ... (deepspeed --no_ssh)
#     LAUNCHER=torchrun NNODES=N NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> ...
#
# Environment (defaults: 2 nodes x 8 GPUs, GPT-2-small sized, bf16):
#   LAUNCHER deepspeed|torchrun   HOSTFILE (deepspeed)   NNODES, GPUS_PER_NODE (torchrun)
#   NODE_RANK (unset with deepspeed: ssh from here)   MASTER_ADDR, MASTER_PORT
#   EP, TP, NUM_EXPERTS, NUM_LAYERS, HIDDEN_SIZE, FFN_HIDDEN_SIZE, NUM_ATTENTION_HEADS,
#   SEQ_LENGTH, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR, LR_WARMUP_ITERS,
#   SAVE_INTERVAL, EVAL_INTERVAL, EVAL_ITERS, LOG_INTERVAL
#   PRECISION bf16|fp16|fp32   DS_CONFIG (a DeepSpeed JSON; empty: generated from the flags)
#   RUN (checkpoints, index cache, logs), DATA_CACHE_PATH (default $RUN/index-cache)
# Extra arguments go to pretrain_gpt_hypermoe.py (they override the flags above).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_PREFIX:?set DATA_PREFIX to a preprocessed dataset prefix}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece model used to preprocess it}"
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-deepspeed}
RUN=${RUN:-runs/hypermoe_multinode}
MASTER_PORT=${MASTER_PORT:-29500}
# Expert parallelism across nodes: with 2 nodes x 8 GPUs, EP=16 places one of 16 experts on each
# GPU, so tokens cross nodes in the all-to-all. EP must divide the expert count and world size.
EP=${EP:-16}
NUM_EXPERTS=${NUM_EXPERTS:-16}
# Tensor parallelism (keep it inside a node): TP > 1 turns on sequence parallelism, which
# megatron-core requires for MoE. TP x EP must divide the number of GPUs.
TP=${TP:-1}
SEQUENCE_PARALLEL=()
if [ "$TP" -gt 1 ]; then SEQUENCE_PARALLEL=(--sequence-parallel); fi
NUM_EXPERTS=${NUM_EXPERTS:-16}
MASTER_PORT=${MASTER_PORT:-29500}
# The examples' DeepSpeed config states bf16 and these batch sizes; change them together (or
# DS_CONFIG= to let the trainer generate the config from the flags).
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
PRECISION=${PRECISION:-bf16}
DS_CONFIG=${DS_CONFIG-examples/ds_config_zero2.json}
case "$PRECISION" in
  bf16|fp16) PRECISION_FLAGS=(--"$PRECISION") ;;
  fp32) PRECISION_FLAGS=() ;;
  *) echo "error: PRECISION=$PRECISION must be bf16, fp16 or fp32" >&2; exit 1 ;;
esac
# Pipeline parallelism: PP stages of --num-layers / PP consecutive layers each (megatron-core's
# 1F1B schedule; every stage holds a replica of the shared hypernetwork). It needs ZeRO-1, so
# with PP > 1 the default config becomes examples/ds_config_zero1.json (later flags win).
# TP x EP x PP must divide the number of GPUs, and PP the number of layers.
PP=${PP:-1}
PIPELINE=(--pipeline-model-parallel-size "$PP")
if [ "$PP" -gt 1 ]; then
  PIPELINE+=(--zero-stage 1)
  if [ "$DS_CONFIG" = examples/ds_config_zero2.json ]; then DS_CONFIG=examples/ds_config_zero1.json; fi
fi
DS_CONFIG_FLAGS=()
if [ -n "$DS_CONFIG" ]; then DS_CONFIG_FLAGS=(--deepspeed_config "$DS_CONFIG"); fi

case "$LAUNCHER" in
  deepspeed)
    : "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
    LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
    if [ -n "${MASTER_ADDR:-}" ]; then LAUNCH+=(--master_addr "$MASTER_ADDR"); fi
    # NODE_RANK set: this node only (run the same command on every node, no ssh).
    if [ -n "${NODE_RANK:-}" ]; then LAUNCH+=(--no_ssh --node_rank "$NODE_RANK"); fi ;;
  torchrun)
    : "${NNODES:?set NNODES (torchrun)}" "${NODE_RANK:?set NODE_RANK (torchrun)}"
    : "${MASTER_ADDR:?set MASTER_ADDR to node 0 (torchrun)}"
    LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --nproc_per_node "${GPUS_PER_NODE:-8}" --master_addr "$MASTER_ADDR"
            --master_port "$MASTER_PORT") ;;
  *) echo "error: LAUNCHER=$LAUNCHER must be deepspeed or torchrun" >&2; exit 1 ;;
esac

"${LAUNCH[@]}" pretrain_gpt_hypermoe.py \
  --deepspeed "${DS_CONFIG_FLAGS[@]}" --zero-stage 2 "${PRECISION_FLAGS[@]}" \
  --moe-type hypermoe --num-experts "$NUM_EXPERTS" --moe-router-topk 1 \
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type alltoall \
  --tensor-model-parallel-size "$TP" "${SEQUENCE_PARALLEL[@]}" \
  "${PIPELINE[@]}" \
  --num-layers "${NUM_LAYERS:-12}" --hidden-size "${HIDDEN_SIZE:-768}" \
  --ffn-hidden-size "${FFN_HIDDEN_SIZE:-3072}" --num-attention-heads "${NUM_ATTENTION_HEADS:-12}" \
  --seq-length "${SEQ_LENGTH:-1024}" --micro-batch-size "$MICRO_BATCH_SIZE" \
  --global-batch-size "$GLOBAL_BATCH_SIZE" --clip-grad 1.0 \
  --train-iters "${TRAIN_ITERS:-100000}" --lr "${LR:-6e-4}" --min-lr 6e-5 \
  --lr-warmup-iters "${LR_WARMUP_ITERS:-2000}" --lr-decay-style cosine --weight-decay 0.1 \
  --data-path "$DATA_PREFIX" --split 969,30,1 \
  --data-cache-path "${DATA_CACHE_PATH:-$RUN/index-cache}" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" \
  --eval-iters "${EVAL_ITERS:-50}" \
  --save "$RUN/checkpoints" --load "$RUN/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}" \
  --tensorboard-dir "$RUN/tensorboard" --metrics-file "$RUN/metrics.jsonl" \
  "$@"
