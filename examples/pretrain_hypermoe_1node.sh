#!/usr/bin/env bash
# One node, 8 GPUs: data parallel with DeepSpeed ZeRO-2 in bf16, GPT-2-small-sized HyperMoE
# (12 layers, hidden 768, 8 experts, top-1; paper-default hyper sizes).
# Usage: DATA_PREFIX=/data/corpus_text_document TOKENIZER=/data/tok.model \
#        bash examples/pretrain_hypermoe_1node.sh [extra flags]
# Expert parallelism: EP=8 puts one of the 8 experts on each GPU (experts are reduced over their
# expert-data-parallel group, everything else over all 8 ranks); ZeRO-2 shards optimizer state.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA_PREFIX:?set DATA_PREFIX to a preprocessed dataset prefix}"
: "${TOKENIZER:?set TOKENIZER to the SentencePiece model used to preprocess it}"
RUN=${RUN:-runs/hypermoe_1node}
EP=${EP:-8}
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
NUM_EXPERTS=${NUM_EXPERTS:-8}
NUM_GPUS=${NUM_GPUS:-8}

deepspeed --num_gpus "$NUM_GPUS" pretrain_gpt_hypermoe.py \
  --deepspeed --deepspeed_config examples/ds_config_zero2.json --zero-stage 2 --bf16 \
  --moe-type hypermoe --num-experts "$NUM_EXPERTS" --moe-router-topk 1 --moe-aux-loss-coeff 1e-2 \
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type alltoall \
  --tensor-model-parallel-size "$TP" "${SEQUENCE_PARALLEL[@]}" \
  "${PIPELINE[@]}" \
  --num-layers 12 --hidden-size 768 --ffn-hidden-size 3072 --num-attention-heads 12 \
  --seq-length 1024 --max-position-embeddings 1024 \
  --micro-batch-size 4 --global-batch-size 256 --clip-grad 1.0 \
  --train-iters 50000 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 2000 --lr-decay-style cosine \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
  --data-path "$DATA_PREFIX" --split 969,30,1 --data-cache-path "$RUN/index-cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --log-interval 10 --eval-interval 1000 --eval-iters 50 \
  --save "$RUN/checkpoints" --load "$RUN/checkpoints" --save-interval 1000 \
  --tensorboard-dir "$RUN/tensorboard" --metrics-file "$RUN/metrics.jsonl" \
  "$@"
