#!/usr/bin/env bash
# Several nodes with the deepspeed launcher and a hostfile ("host slots=N" per line), e.g.
#   node-a slots=8
#   node-b slots=8
# Usage: HOSTFILE=hostfile DATA_PREFIX=... TOKENIZER=... bash examples/pretrain_hypermoe_multinode.sh
# Every node needs the same checkout, .venv and data paths. The global batch is split over all
# ranks (data parallel, ZeRO-2); `--load` of the same --save directory resumes after preemption
# (SIGTERM makes the trainer save and exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
: "${DATA_PREFIX:?set DATA_PREFIX to a preprocessed dataset prefix}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece model used to preprocess it}"
RUN=${RUN:-runs/hypermoe_multinode}
# Expert parallelism across nodes: with 2 nodes x 8 GPUs, EP=16 places one of 16 experts on each
# GPU, so tokens cross nodes in the all-to-all. EP must divide the expert count and world size.
EP=${EP:-16}
# Tensor parallelism (keep it inside a node): TP > 1 turns on sequence parallelism, which
# megatron-core requires for MoE. TP x EP must divide the number of GPUs.
TP=${TP:-1}
SEQUENCE_PARALLEL=()
if [ "$TP" -gt 1 ]; then SEQUENCE_PARALLEL=(--sequence-parallel); fi
# Pipeline parallelism: PP stages of --num-layers / PP consecutive layers each (megatron-core's
# 1F1B schedule; every stage holds a replica of the shared hypernetwork). It needs ZeRO-1, so
# with PP > 1 the flags switch to examples/ds_config_zero1.json (later flags win).
# TP x EP x PP must divide the number of GPUs, and PP the number of layers.
PP=${PP:-1}
PIPELINE=(--pipeline-model-parallel-size "$PP")
if [ "$PP" -gt 1 ]; then
  PIPELINE+=(--deepspeed_config examples/ds_config_zero1.json --zero-stage 1)
fi
NUM_EXPERTS=${NUM_EXPERTS:-16}
MASTER_PORT=${MASTER_PORT:-29500}

deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" pretrain_gpt_hypermoe.py \
  --deepspeed --deepspeed_config examples/ds_config_zero2.json --zero-stage 2 --bf16 \
  --moe-type hypermoe --num-experts "$NUM_EXPERTS" --moe-router-topk 1 \
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type alltoall \
  --tensor-model-parallel-size "$TP" "${SEQUENCE_PARALLEL[@]}" \
  "${PIPELINE[@]}" \
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12 \
  --seq-length 1024 --micro-batch-size 4 --global-batch-size 256 --clip-grad 1.0 \
  --train-iters 100000 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
  --weight-decay 0.1 \
  --data-path "$DATA_PREFIX" --split 969,30,1 --data-cache-path "$RUN/index-cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --log-interval 10 --eval-interval 1000 --eval-iters 50 \
  --save "$RUN/checkpoints" --load "$RUN/checkpoints" --save-interval 1000 \
  --tensorboard-dir "$RUN/tensorboard" --metrics-file "$RUN/metrics.jsonl" \
  "$@"
