"""The DeepSpeed config's decision table against DeepSpeed 0.19.8 itself (every key it reads is
classified; refused keys fail in one line naming the key; honoured ones reach the engine), the
gradient precision with --bf16 (fp32 accumulation and reduction in the engine, ZeRO 1 and 2),
Megatron's ZeRO flags, and a quiet first impression (--help, no shm comm op build)."""

import json
import re
import subprocess
import sys

import pytest
import torch

from megatron_hypermoe.cli.arguments import parse_args
from megatron_hypermoe.cli.deepspeed_config import decision_table, resolve_config
from megatron_hypermoe.cli.deepspeed_config_keys import (
    CHECKED,
    HONOURED,
    REFUSED,
    SECTION_KEYS,
    STAGE3,
    TOP_LEVEL_KEYS,
)
from megatron_hypermoe.errors import ArgumentError, DeepSpeedConfigError
from tests.support.processes import REPO_ROOT, child_environment
from tests.support.tiny_model import TINY_MODEL, batch, tiny_run

# Read by deepspeed.initialize rather than DeepSpeedConfig (the probe below cannot see them).
READ_OUTSIDE_DEEPSPEED_CONFIG = {"sequence_parallel_size", "data_parallel_size"}


class RecordingDict(dict):
    """A dict that records every key looked up in it (DeepSpeed's getters use in/get/[]/keys)."""

    def __init__(self, *args, seen=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set() if seen is None else seen

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def keys(self):
        return self  # `key in d.keys()` is recorded too; iteration is a dict's


def keys_deepspeed_reads():
    """(top-level keys, {section: keys}) DeepSpeed 0.19.8's config parser looks up."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def field_names(model):
        return {n for name, f in model.model_fields.items() for n in (name, f.alias) if n}

    checkpoint, data_types = RecordingDict(), RecordingDict()
    top = RecordingDict(train_batch_size=1, checkpoint=checkpoint, data_types=data_types)
    DeepSpeedConfig(top)
    sections = {"zero_optimization": field_names(DeepSpeedZeroConfig),
                "bf16": field_names(DeepSpeedBF16Config),
                "fp16": field_names(DeepSpeedFP16Config),
                "checkpoint": checkpoint.seen, "data_types": data_types.seen}
    return top.seen, sections


def test_every_key_deepspeed_reads_is_classified_and_nothing_else_is():
    top, sections = keys_deepspeed_reads()
    assert len(top) > 50 and "zero_optimization" in top  # the probe works
    assert top - set(TOP_LEVEL_KEYS) == set(), "unclassified DeepSpeed keys"
    # (sequence_parallel_size is looked up only when torch.distributed is already initialised,
    # e.g. by an earlier test in this process)
    assert set(TOP_LEVEL_KEYS) - top <= READ_OUTSIDE_DEEPSPEED_CONFIG, "stale table entries"
    for section, keys in sections.items():
        table = set(SECTION_KEYS[section])
        assert keys - table == set(), f"unclassified {section} keys"
        assert table - keys == set(), f"stale {section} entries"
    assert {rule.action for rule in TOP_LEVEL_KEYS.values()} <= {HONOURED, CHECKED, REFUSED}


def args_with_config(tmp_path, config, *flags, moe_type="hypermoe"):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return parse_args([*tiny_run(moe_type), "--mock-data", "--train-iters", "1",
                       "--deepspeed_config", str(path), *flags])


def nested(key, value):
    section, _, sub = key.partition(".")
    return {section: {sub: value}} if sub else {section: value}


@pytest.mark.parametrize("key", [key for key, action, _ in decision_table()
                                 if action in (REFUSED, STAGE3)])
def test_every_refused_key_is_a_one_line_error_naming_it(key, tmp_path):
    args = args_with_config(tmp_path, nested(key, {}))
    with pytest.raises(DeepSpeedConfigError) as error:
        resolve_config(args)
    message = str(error.value)
    assert repr(key) in message and "\n" not in message


@pytest.mark.parametrize("config,expected", [
    ({"activation_checkpointing": {"partition_activations": True}}, "--recompute-granularity"),
    ({"wandb": {"enabled": True}}, "--wandb-project"),
    ({"tensorboard": {"enabled": True}}, "--tensorboard-dir"),
    ({"checkpoint": {"load_universal": True}}, "load it with the new layout's flags"),
    ({"zero_optimization": {"elastic_checkpoint": True}}, "load it with the new layout's flags"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "--optimizer-cpu-offload"),
    ({"zero_optimisation": {"stage": 1}}, "is not a key DeepSpeed 0.19.8 reads"),
    ({"zero_optimization": {"reduce_bucket": 5}}, "'zero_optimization.reduce_bucket' is not a key"),
    ({"optimizer": {"type": "Adam"}}, "the trainer builds AdamW"),
    ({"zero_optimization": {"stage3_max_live_parameters": 1}}, "ZeRO stage 3 only"),
])
def test_refusals_say_what_to_use_instead(config, expected, tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=re.escape(expected)):
        resolve_config(args_with_config(tmp_path, config))


def test_comments_and_stage3_keys_with_stage_3_pass(tmp_path):
    args = args_with_config(tmp_path, {"_comment": "x", "zero_optimization": {
        "stage": 3, "stage3_max_live_parameters": 1000}}, "--zero-stage", "3", moe_type="dense")
    resolved = resolve_config(args)
    assert "_comment" not in resolved
    assert resolved["zero_optimization"]["stage3_max_live_parameters"] == 1000


@pytest.mark.parametrize("flags,message", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --overlap-grad-reduce"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"],
     "contradict each other"),
])
def test_zero_and_precision_flags_refuse_contradictions(flags, message):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1", *flags])


@pytest.mark.parametrize("config,flags,message", [
    ({"zero_optimization": {"overlap_comm": False}}, ["--overlap-grad-reduce"],
     "overlap_comm = false but --overlap-grad-reduce"),
    ({"data_types": {"grad_accum_dtype": "bf16"}},
     ["--bf16", "--accumulate-allreduce-grads-in-fp32"], "grad_accum_dtype = bf16 but"),
    ({"communication_data_type": "fp32"}, ["--bf16", "--grad-reduce-in-bf16"],
     "communication_data_type = fp32 but --grad-reduce-in-bf16 says bf16"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, [],
     "--optimizer-cpu-offload (zero_optimization.offload_optimizer.device) = cpu but the flags "
     "say None"),
    ({"data_types": {"param_dtype": "fp32"}}, ["--bf16"], "param_dtype) = fp32 but the flags"),
])
def test_a_file_contradicting_an_explicit_flag_is_refused(config, flags, message, tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=re.escape(message)):
        resolve_config(args_with_config(tmp_path, config, *flags))


def test_flags_generate_deepspeed_settings():
    def generated(*flags):
        return resolve_config(parse_args([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                                          *flags]))

    assert "data_types" not in generated()  # fp32 training: nothing to say
    bf16 = generated("--bf16")
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["communication_data_type"] == "fp32"
    assert generated("--fp16")["data_types"] == {"grad_accum_dtype": "fp32"}
    low = generated("--bf16", "--grad-reduce-in-bf16")
    assert low["data_types"]["grad_accum_dtype"] == low["communication_data_type"] == "bf16"
    zero = generated("--overlap-grad-reduce", "--overlap-param-gather",
                     "--use-distributed-optimizer", "--optimizer-cpu-offload")["zero_optimization"]
    assert zero == {"stage": 1, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}}


def test_an_explicit_bf16_gradient_key_in_the_file_is_honoured(tmp_path):
    args = args_with_config(tmp_path, {"data_types": {"grad_accum_dtype": "bf16"},
                                       "communication_data_type": "bf16"}, "--bf16")
    resolved = resolve_config(args)
    assert resolved["data_types"]["grad_accum_dtype"] == "bf16"
    assert resolved["communication_data_type"] == "bf16"


HONOURED_FILE = {
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 123456, "allgather_bucket_size":
                          234568, "contiguous_gradients": False, "overlap_comm": True},
    "bf16": {"enabled": True, "immediate_grad_update": True},
    "wall_clock_breakdown": True,
    "checkpoint": {"tag_validation": "FAIL"},
}


def build_tiny_engine(flags):
    from megatron_hypermoe.cli.arguments import parse_run_config
    from megatron_hypermoe.training.setup import build_engine, build_model

    run = parse_run_config([*TINY_MODEL, "--mock-data", "--train-iters", "1",
                            *flags]).with_vocab(64)
    return build_engine(build_model(run), run)


def one_step(engine):
    from megatron_hypermoe.model.gpt import causal_attention_mask

    tokens, positions, labels = batch(seed=3)
    loss = engine(tokens, positions, causal_attention_mask(tokens.shape[1]),
                  labels=labels).float().mean()
    engine.backward(loss)
    return loss


@pytest.mark.usefixtures("megatron_single_process")
def test_honoured_keys_reach_the_engine_and_bf16_zero2_reduces_in_fp32(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(HONOURED_FILE))
    engine, optimizer = build_tiny_engine(["--bf16", "--zero-stage", "2",
                                           "--deepspeed_config", str(path)])
    zero = engine._config.zero_config
    assert (zero.reduce_bucket_size, zero.allgather_bucket_size) == (123456, 234568)
    assert zero.contiguous_gradients is False and engine.zero_overlap_comm()
    assert engine._config.bfloat16_config.immediate_grad_update is True
    assert engine.wall_clock_breakdown()
    assert engine._config.checkpoint_tag_validation_fail
    # Precision: the ZeRO-2 optimizer accumulates and reduces in fp32, weights stay bf16.
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.communication_data_type == torch.float32
    assert type(optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert optimizer.gradient_accumulation_dtype == torch.float32
    one_step(engine)
    grads = [g for g in optimizer.averaged_gradients.values() for g in g if g is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    engine.step()
    assert next(engine.module.parameters()).dtype == torch.bfloat16


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("flags,accum,wrapper", [
    ([], torch.float32, "BF16_Optimizer"),
    (["--grad-reduce-in-bf16"], torch.bfloat16, "DeepSpeedZeroOptimizer"),
])
def test_bf16_zero1_gradients_accumulate_in_fp32_unless_asked(flags, accum, wrapper):
    from megatron_hypermoe.training.setup import describe_precision

    engine, optimizer = build_tiny_engine(["--bf16", "--zero-stage", "1", *flags])
    assert type(optimizer).__name__ == wrapper
    assert engine.get_data_types() == (torch.bfloat16, accum)
    assert engine.communication_data_type == accum
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[accum]
    assert f"{name} gradient accumulation, {name} reduction ({wrapper})" in \
        describe_precision(engine)
    loss = one_step(engine)
    if wrapper == "BF16_Optimizer":  # its fp32 gradient buffers hold this step's gradients
        flat = optimizer.fp32_groups_gradients_flat
        assert all(g.dtype == torch.float32 for g in flat) and any(g.abs().sum() > 0 for g in flat)
    engine.step()
    assert torch.isfinite(loss)


@pytest.mark.usefixtures("megatron_single_process")
def test_fp16_where_deepspeed_cannot_run_it_is_a_one_line_error(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ArgumentError, match="does not support fp16 on this machine: use --bf16"):
        build_tiny_engine(["--fp16"])


def test_shm_comm_op_is_not_built_on_the_cpu_accelerator():
    import importlib

    from megatron_hypermoe.compat.deepspeed import skip_unused_shm_comm_op

    skip_unused_shm_comm_op()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


@pytest.mark.usefixtures("megatron_single_process")
def test_bf16_optimizer_prints_no_memory_report(capsys):
    from megatron_hypermoe.compat.deepspeed import quiet_bf16_optimizer_memory_report

    _, optimizer = build_tiny_engine(["--bf16", "--zero-stage", "1"])
    assert type(optimizer).__name__ == "BF16_Optimizer"
    assert "CPU Virtual Memory" not in capsys.readouterr().out
    quiet_bf16_optimizer_memory_report()  # idempotent


def test_help_prints_no_warnings():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain_gpt_hypermoe.py"),
                             "--help"], env=child_environment(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    output = result.stdout + result.stderr
    assert "--overlap-grad-reduce" in output
    # (flag help may name Transformer Engine: what megatron-core prints on import may not)
    # A CUDA build of torch on a machine whose GPU is hidden (the CPU suite on a GPU node) logs
    # this when DeepSpeed imports torch.utils.cpp_extension: torch's line, not ours.
    stderr = [line for line in result.stderr.splitlines()
              if "No CUDA runtime is found, using CUDA_HOME=" not in line]
    noisy = [line for line in result.stdout.splitlines() + stderr
             if re.search(r"warn|not installed|Falling back", line, re.IGNORECASE)]
    assert noisy == []
    assert stderr == []


def test_import_warnings_are_silenced_only_for_the_pinned_megatron_core(monkeypatch):
    import warnings

    from megatron_hypermoe.compat import megatron_core

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    monkeypatch.setattr(megatron_core, "installed_megatron_core_version", lambda: "0.17.0")
    before = list(warnings.filters)
    assert megatron_core.quiet_import_warnings() is False and warnings.filters == before
    monkeypatch.undo()
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert megatron_core.quiet_import_warnings() is True
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Apex is missing for another reason", UserWarning)
    assert [str(w.message) for w in caught] == ["Apex is missing for another reason"]


def test_accelerator_summary_names_what_is_missing(monkeypatch):
    import importlib.util

    from megatron_hypermoe.compat import megatron_core

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    line = megatron_core.accelerator_summary()
    assert line.startswith("optional accelerators not installed: Transformer Engine, Apex, "
                           "grouped_gemm") and "\n" not in line
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert megatron_core.accelerator_summary() is None


def test_docs_page_lists_every_decision():
    page = (REPO_ROOT / "docs" / "deepspeed-config.md").read_text()
    rows = {key: line for key, _, _ in decision_table() for line in page.splitlines()
            if line.startswith("| ") and f"`{key}`" in line.split(" | ")[0]}
    missing = [key for key, _, _ in decision_table() if key not in rows]
    assert missing == []
    stale = [key for key, action, note in decision_table()
             if action == REFUSED and note not in rows[key]]
    assert stale == [], "the page's note for these keys differs from ds_config.py's"


@pytest.mark.slow  # the first run JIT-compiles DeepSpeed's CPUAdam (~2 min), cached afterwards
@pytest.mark.usefixtures("megatron_single_process")
def test_optimizer_cpu_offload_trains_like_adamw_with_the_lr_multiplier():
    """ZeRO-Offload with DeepSpeedCPUAdam takes the same steps as AdamW, the hypernetwork's
    lr_mult group included (the trainer sets each group's lr before every step)."""
    engines = {}
    for offload in (False, True):
        engine, optimizer = build_tiny_engine(["--zero-stage", "2", "--lr", "1e-2"]
                                              + (["--optimizer-cpu-offload"] if offload else []))
        assert engine.zero_cpu_offload() == offload
        assert type(optimizer.optimizer).__name__ == ("DeepSpeedCPUAdam" if offload else "AdamW")
        assert any(group.get("lr_mult", 1.0) != 1.0 for group in optimizer.param_groups)
        for step in range(3):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * (1 - step / 3) * group.get("lr_mult", 1.0)
            one_step(engine)
            engine.step()
        engines[offload] = engine
    for (name, a), b in zip(engines[False].module.named_parameters(),
                            engines[True].module.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
