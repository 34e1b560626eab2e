"""The decision table for DeepSpeed 0.19.8's config keys: what happens to each key a config file
may hold (data; ``ds_config.py`` applies it, and docs/deepspeed-config.md prints it).

Actions: ``honoured`` (DeepSpeed applies it as written), ``checked`` (it must agree with the
flag that states the same), ``stage 3 only``, ``refused`` (with the reason and what to use).
"""

from __future__ import annotations

from typing import NamedTuple

HONOURED = "honoured"
CHECKED = "checked"
STAGE3 = "stage 3 only"
REFUSED = "refused"


class Rule(NamedTuple):
    action: str
    note: str  # honoured: what it does; checked: the flag; refused: why, and what to use


_BATCH = "set by --global-batch-size / --micro-batch-size"
_NOT_USED = "DeepSpeed reads it only for a feature this trainer does not use"
_DS_REMOVED = "removed from DeepSpeed 0.19.8 (it refuses the key itself)"

# Every top-level key DeepSpeed 0.19.8 reads (DeepSpeedConfig and deepspeed.initialize).
TOP_LEVEL_KEYS = {
    # batch, clipping, precision, ZeRO: what the flags also say
    "train_batch_size": Rule(CHECKED, "--global-batch-size"),
    "train_micro_batch_size_per_gpu": Rule(CHECKED, "--micro-batch-size"),
    "gradient_accumulation_steps": Rule(CHECKED, "--global-batch-size / (--micro-batch-size x "
                                                 "data-parallel size)"),
    "gradient_clipping": Rule(CHECKED, "--clip-grad"),
    "bf16": Rule(CHECKED, "--bf16 (keys: see the bf16 section)"),
    "fp16": Rule(CHECKED, "--fp16 (keys: see the fp16 section)"),
    "zero_optimization": Rule(CHECKED, "--zero-stage (keys: see the zero_optimization section)"),
    "data_types": Rule(HONOURED, "gradient accumulation dtype etc. (see the data_types section)"),
    "communication_data_type": Rule(HONOURED, "dtype of the gradient reduction; default fp32 "
                                              "with --bf16/--fp16 (--grad-reduce-in-bf16: bf16)"),
    **{key: Rule(REFUSED, "gradients are averaged over the data-parallel ranks after the "
                          "reduction (as in Megatron; the expert groups' scaling relies on it, "
                          "and ZeRO-2's reduce-scatter asserts on other settings): remove it")
       for key in ("prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op")},
    "zero_allow_untested_optimizer": Rule(HONOURED, "DeepSpeed's check of the client optimizer"),
    "zero_force_ds_cpu_optimizer": Rule(HONOURED, "with offload, require DeepSpeedCPUAdam (the "
                                                  "trainer builds it)"),
    # DeepSpeed's own diagnostics
    "steps_per_print": Rule(HONOURED, "DeepSpeed's own progress lines (off by default: the "
                                      "trainer logs every --log-interval)"),
    "wall_clock_breakdown": Rule(HONOURED, "DeepSpeed's forward/backward/step timers"),
    "memory_breakdown": Rule(HONOURED, "DeepSpeed's memory report"),
    "dump_state": Rule(HONOURED, "print the engine's state at start"),
    "log_level": Rule(HONOURED, "DeepSpeed's log level"),
    "timers": Rule(HONOURED, "DeepSpeed's throughput timer"),
    "disable_python_gc": Rule(HONOURED, "DeepSpeed's control of Python's garbage collector"),
    "comms_logger": Rule(REFUSED, "it logs only collectives called through deepspeed.comm, and "
                                  "megatron-core calls torch.distributed: profile with "
                                  "torch.profiler instead"),
    # Optimizer and schedule: the trainer's
    "optimizer": Rule(REFUSED, "the trainer builds AdamW from --lr/--weight-decay/--adam-*: "
                               "remove the section"),
    "scheduler": Rule(REFUSED, "the trainer applies Megatron's schedule from --lr-decay-style/"
                               "--lr-warmup-iters: remove the section"),
    "disable_allgather": Rule(REFUSED, "DeepSpeed 0.19.8 parses it and never reads it"),
    "managed_gradient_accumulation": Rule(REFUSED, "the trainer steps the engine every "
                                                   "micro-batch: remove it"),
    # Features the trainer provides by its own flags
    "activation_checkpointing": Rule(REFUSED, "DeepSpeed's checkpointing only applies to "
                                              "models that call it: use --recompute-granularity "
                                              "/ --recompute-activations"),
    "tensorboard": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                                 "--tensorboard-dir"),
    "wandb": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                           "--wandb-project / --wandb-exp-name"),
    "csv_monitor": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                                 "--metrics-file (JSON lines)"),
    "comet": Rule(REFUSED, "DeepSpeed's monitor would log only its own values: use "
                           "--tensorboard-dir or --metrics-file"),
    "flops_profiler": Rule(REFUSED, "the trainer logs TFLOP/s per device (counting top-k experts "
                                    "and the HyperExpert) every --log-interval"),
    "checkpoint": Rule(HONOURED, "keys: see the checkpoint section"),
    "torch_autocast": Rule(REFUSED, "the model is built in the precision of --bf16/--fp16"),
    "amp": Rule(REFUSED, "NVIDIA Apex AMP: use --bf16 or --fp16"),
    "bfloat16": Rule(REFUSED, "the old spelling of bf16: write \"bf16\""),
    "tensor_parallel": Rule(REFUSED, "DeepSpeed's AutoTP: use --tensor-model-parallel-size"),
    "expert_parallel": Rule(REFUSED, "DeepSpeed's AutoEP: use --expert-model-parallel-size"),
    "use_data_before_expert_parallelism": Rule(REFUSED, "the process groups are megatron-core's "
                                                        "(--expert-model-parallel-size)"),
    "sequence_parallel_size": Rule(REFUSED, "DeepSpeed-Ulysses: use --tensor-model-parallel-size "
                                            "with --sequence-parallel"),
    "data_parallel_size": Rule(REFUSED, "the data-parallel size is the world size / TP"),
    "seq_parallel_communication_data_type": Rule(REFUSED, "DeepSpeed-Ulysses only: " + _NOT_USED),
    "pipeline": Rule(REFUSED, "DeepSpeed's PipelineEngine is not used: pipeline parallelism is "
                              "--pipeline-model-parallel-size (megatron-core's schedule)"),
    "dataloader_drop_last": Rule(REFUSED, "DeepSpeed's data loader is not used: the data come "
                                          "from megatron-core's datasets (--data-path)"),
    "data_efficiency": Rule(REFUSED, "DeepSpeed's data sampling/routing needs its data loader; "
                                     "the data come from megatron-core's datasets"),
    "vocabulary_size": Rule(REFUSED, "DeepSpeed only warns from it: the vocabulary is padded by "
                                     "--make-vocab-size-divisible-by"),
    "sparse_gradients": Rule(REFUSED, "the model has no sparse embedding gradients"),
    "autotuning": Rule(REFUSED, "needs DeepSpeed's autotuning launcher, which does not know "
                                "these flags"),
    "compression_training": Rule(REFUSED, "needs DeepSpeed's compression wrappers in the model"),
    "quantize_training": Rule(REFUSED, "needs DeepSpeed's quantizer in the model"),
    "weight_quantization": Rule(REFUSED, "inference only"),
    "hybrid_engine": Rule(REFUSED, "RLHF generation engine: not a pretraining feature"),
    "compile": Rule(REFUSED, "applies only when engine.compile() is called, which the trainer "
                             "does not do"),
    "aio": Rule(REFUSED, "asynchronous I/O for NVMe offload, which is not supported"),
    "nebula": Rule(REFUSED, "Azure Nebula checkpoint service: checkpoints are written by --save"),
    "datastates_ckpt": Rule(REFUSED, "DataStates asynchronous checkpointing: checkpoints are "
                                     "written by --save"),
    **{key: Rule(REFUSED, _DS_REMOVED) for key in (
        "sparse_attention", "elasticity", "curriculum_learning", "progressive_layer_drop",
        "eigenvalue", "graph_harvesting")},
}

_STAGE3_KEYS = (
    "sub_group_size", "prefetch_bucket_size", "stage3_prefetch_bucket_size",
    "param_persistence_threshold", "stage3_param_persistence_threshold",
    "model_persistence_threshold", "stage3_model_persistence_threshold",
    "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance",
    "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "module_granularity_threshold", "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential", "stage3_allgather_sequential", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "leaf_module")
_OLD_OFFLOAD = "an old spelling: use --optimizer-cpu-offload (or offload_optimizer)"

SECTION_KEYS = {
    "zero_optimization": {
        "stage": Rule(CHECKED, "--zero-stage"),
        "overlap_comm": Rule(CHECKED, "--overlap-grad-reduce (overlap the gradient reduction "
                                      "with backward; the file may turn it on by itself; "
                                      "refused with pipeline parallelism)"),
        "offload_optimizer": Rule(CHECKED, "--optimizer-cpu-offload (device cpu; the trainer "
                                           "then builds DeepSpeedCPUAdam)"),
        "contiguous_gradients": Rule(HONOURED, "copy gradients into one buffer as produced"),
        "reduce_scatter": Rule(HONOURED, "reduce-scatter instead of all-reduce"),
        "reduce_bucket_size": Rule(HONOURED, "elements per gradient-reduction bucket"),
        "use_multi_rank_bucket_allreduce": Rule(HONOURED, "bucketed all-reduce across ranks"),
        "allgather_partitions": Rule(HONOURED, "all-gather the updated parameter partitions"),
        "allgather_bucket_size": Rule(HONOURED, "elements per parameter all-gather bucket"),
        "load_from_fp32_weights": Rule(HONOURED, "on load, rebuild 16-bit weights from the fp32 "
                                                 "masters"),
        "ignore_unused_parameters": Rule(HONOURED, "tolerate parameters without a gradient"),
        "round_robin_gradients": Rule(HONOURED, "stage 2's round-robin gradient copy"),
        "parameter_alignment": Rule(HONOURED, "align partitions"),
        "compute_grad_norm": Rule(REFUSED, "the trainer clips by (--clip-grad) and logs the "
                                           "global gradient norm"),
        "elastic_checkpoint": Rule(REFUSED, "DeepSpeed's elastic ZeRO checkpoints are not "
                                            "what this trainer writes or reads; any checkpoint "
                                            "resumes in another layout (TP/EP/PP/DP/ZeRO stage) "
                                            "from its layout_free/ files: load it with the new "
                                            "layout's flags"),
        "offload_param": Rule(REFUSED, "parameter offload needs ZeRO stage 3, which MoE models "
                                       "cannot use: use --optimizer-cpu-offload"),
        "zenflow": Rule(REFUSED, "ZenFlow's stale-gradient optimizer is not tested with MoE "
                                 "expert groups"),
        "legacy_stage1": Rule(REFUSED, "removed from DeepSpeed"),
        "save_muon_momentum_buffer_in_memory": Rule(REFUSED, "the optimizer is AdamW"),
        "cpu_offload": Rule(REFUSED, _OLD_OFFLOAD),
        "cpu_offload_use_pin_memory": Rule(REFUSED, _OLD_OFFLOAD),
        "cpu_offload_param": Rule(REFUSED, "parameter offload needs ZeRO stage 3, which MoE "
                                           "models cannot use"),
        **{key: Rule(STAGE3, "ZeRO-3 parameter partitioning") for key in _STAGE3_KEYS},
    },
    "bf16": {
        "enabled": Rule(CHECKED, "--bf16"),
        "immediate_grad_update": Rule(HONOURED, "fold 16-bit gradients into the fp32 ones as "
                                                "they are produced (refused with pipeline "
                                                "parallelism)"),
        "check_grad_overflow": Rule(HONOURED, "skip a step whose gradient is not finite"),
        "bf16_master_weights_and_grads": Rule(REFUSED, "bf16 master weights need ZeRO-Offload "
                                                       "with DeepSpeed's CPU optimizer; the "
                                                       "masters stay fp32"),
        "bf16_optimizer_states": Rule(REFUSED, "needs bf16_master_weights_and_grads"),
    },
    "fp16": {
        "enabled": Rule(CHECKED, "--fp16"),
        "loss_scale": Rule(HONOURED, "0: dynamic loss scaling, else this static scale"),
        "initial_scale_power": Rule(HONOURED, "dynamic scaling starts at 2**this"),
        "loss_scale_window": Rule(HONOURED, "steps without overflow before the scale grows"),
        "hysteresis": Rule(HONOURED, "overflows tolerated before the scale shrinks"),
        "consecutive_hysteresis": Rule(HONOURED, "refill the hysteresis after a good step"),
        "min_loss_scale": Rule(HONOURED, "lowest dynamic scale"),
        "auto_cast": Rule(REFUSED, "the model is built in fp16 by --fp16"),
        "fp16_master_weights_and_grads": Rule(REFUSED, "fp16 master weights need ZeRO-Offload "
                                                       "with DeepSpeed's CPU optimizer; the "
                                                       "masters stay fp32"),
    },
    "data_types": {
        "grad_accum_dtype": Rule(HONOURED, "gradient accumulation dtype; default fp32 with "
                                           "--bf16/--fp16 (--grad-reduce-in-bf16: bf16)"),
        "param_dtype": Rule(CHECKED, "--bf16 / --fp16"),
        "buffer_dtype": Rule(HONOURED, "dtype the module's buffers are cast to"),
        "keep_in_fp32_modules": Rule(HONOURED, "buffers kept in fp32 under bf16/fp16"),
    },
    "checkpoint": {
        "tag_validation": Rule(HONOURED, "check every rank saves the same tag"),
        "load_universal": Rule(REFUSED, "DeepSpeed's universal checkpoints are not what this "
                                        "trainer writes or reads; any checkpoint resumes in "
                                        "another layout (TP/EP/PP/DP/ZeRO stage) from its "
                                        "layout_free/ files: load it with the new layout's "
                                        "flags"),
        "use_node_local_storage": Rule(REFUSED, "the checkpoint's metadata and expert files are "
                                                "written to the shared --save directory"),
        "parallel_write": Rule(REFUSED, "pipeline parallelism only"),
        "checkpoint_serialization": Rule(REFUSED, "DeepSpeed's fast checkpoint writer is not "
                                                  "used"),
        "writer": Rule(REFUSED, "DeepSpeed's decoupled/fast checkpoint writers are not used"),
    },
}
