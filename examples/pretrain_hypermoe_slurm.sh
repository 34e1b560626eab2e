#!/usr/bin/env bash
# SLURM: one torchrun per node via srun, node 0 (the first host of the allocation) as the
# rendezvous. The training flags are examples/pretrain_hypermoe_multinode.sh's, with its
# environment variables (sizes, EP, TP, PRECISION, RUN, DATA_CACHE_PATH, ...).
#   DATA_PREFIX=... TOKENIZER=... sbatch examples/pretrain_hypermoe_slurm.sh [extra flags]
# (submit from the repository root; every node needs the same checkout, .venv and paths, and
# RUN on a filesystem every node mounts). Resubmitting resumes from $RUN/checkpoints.
#SBATCH --job-name=hypermoe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
: "${SLURM_JOB_NODELIST:?run this under sbatch (or salloc)}"
export LAUNCHER=torchrun
export NNODES=${SLURM_JOB_NUM_NODES:?}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# The first host of the allocation (no "| head": under pipefail its SIGPIPE would end the job).
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${MASTER_ADDR:-${HOSTS%%$'\n'*}}
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
# One task per node; SLURM_NODEID is that node's rank. --kill-on-bad-exit ends the other nodes'
# launchers when one fails (a lost node: see docs/parallelism.md, "A lost node").
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec bash examples/pretrain_hypermoe_multinode.sh "$@"' \
  _ "$@"
