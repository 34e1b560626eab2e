#!/usr/bin/env bash
# The demo: a tiny HyperMoE GPT on the default Shakespeare corpus, on CPU, in about 10 minutes.
# Fetches the corpus (pinned, checksum-verified), trains a 4k SentencePiece tokenizer,
# preprocesses into a megatron-core indexed dataset, trains, then prints the validation
# perplexity and a generated sample.   Usage: bash examples/pretrain_tiny_cpu.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data}
RUN=${RUN:-runs/tiny_cpu}
TRAIN_ITERS=${TRAIN_ITERS:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$PYTHON tools/get_default_corpus.py --data-dir "$DATA"
if [ ! -f "$DATA/shakespeare/tok4k.model" ]; then
  $PYTHON tools/train_tokenizer.py --input "$DATA/shakespeare/shakespeare.jsonl" \
    --vocab-size 4096 --model-prefix "$DATA/shakespeare/tok4k"
fi
if [ ! -f "$DATA/shakespeare/shk4k_text_document.idx" ]; then
  $PYTHON tools/preprocess_data.py --input "$DATA/shakespeare/shakespeare.jsonl" \
    --output-prefix "$DATA/shakespeare/shk4k" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$DATA/shakespeare/tok4k.model" --append-eod --workers 2
fi

rm -rf "$RUN"
$PYTHON pretrain_gpt_hypermoe.py \
  --moe-type hypermoe --num-experts 8 --moe-router-topk 1 \
  --num-layers 4 --hidden-size 192 --ffn-hidden-size 384 --num-attention-heads 4 \
  --seq-length 128 --micro-batch-size 8 --global-batch-size 8 \
  --train-iters "$TRAIN_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 50 \
  --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
  --data-path "$DATA/shakespeare/shk4k_text_document" --split 95,5,0 \
  --data-cache-path "$RUN/index-cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/shakespeare/tok4k.model" \
  --log-interval 50 --eval-interval 250 --eval-iters 20 \
  --save "$RUN/checkpoints" --tensorboard-dir "$RUN/tensorboard" \
  --metrics-file "$RUN/metrics.jsonl" \
  --generate-tokens 120 --generate-prompt "KING LEAR." \
  "$@"
