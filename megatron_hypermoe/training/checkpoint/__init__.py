"""Checkpoints: DeepSpeed's format plus our metadata, written atomically, loaded safely.

The modules: ``save_load`` (``save_checkpoint``, ``load_checkpoint``, ``TrainState``: the API the
trainer calls), ``files`` (directories, ``latest``, the metadata file, atomic publishing),
``compatibility`` (what a load must match), ``rng``, ``experts`` (expert files under EP),
``layout_free`` (the state by global name, for a resume in another layout) and ``reader`` (a
checkpoint's weights as one model, for the converters and tools).

Layout under --save (DeepSpeed's, plus three kinds of files of ours)::

    latest                          the tag of the newest COMPLETE checkpoint (DeepSpeed reads it)
    latest_checkpointed_iteration.txt   the same as an iteration number (Megatron's file)
    iter_0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   (DeepSpeed)
        experts_ep_rank_00001_tp_rank_00.safetensors   with EP > 1: each EP (x expert-TP) rank's
                                    experts by global id
        hypermoe_checkpoint.json    arguments, iteration, consumed samples, model shape, the
                                    learning-rate scheduler's state (Megatron's)
        rng_rank_00000.safetensors  every RNG state of that rank (python, numpy, torch, CUDA,
                                    megatron's model-parallel streams)
        layout_free/                the training state by global parameter name, for a resume in
                                    another layout (``layout_free.py``)

Atomic: every rank writes into ``iter_N.partial/``; after a barrier rank 0 renames it to
``iter_N/`` and only then moves ``latest`` (write-to-temp then rename). A crash at any point
leaves ``latest`` on the previous complete checkpoint; a write that fails on any rank (a full
disk) stops every rank with one line and removes the partial directory. Which directories count,
re-saving an iteration, ``--save-retain`` and ``--ckpt-step``: ``files.py``.

Safe: our files are JSON and safetensors. DeepSpeed's .pt files are read through a checkpoint
engine that unpickles with ``weights_only=True`` and allows only DeepSpeed's plain record
classes (``compat/deepspeed.py``), so a tampered file cannot run code.
"""
