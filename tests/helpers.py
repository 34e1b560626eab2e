"""Everything the tests share: the one tiny model (as config fields and as flags), subprocess
runners for the trainer and torchrun workers, a synthetic corpus, and the HyperExpert fixtures.
Fixtures that need pytest's scopes live in conftest.py; everything else is here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_hypermoe.model.config import VARIANT_HYPER_FIELDS, make_config
from megatron_hypermoe.model.gpt import build_gpt_model, causal_attention_mask
from megatron_hypermoe.parallel.distributed import free_port
from megatron_hypermoe.training.arguments import MODEL_CONFIG_FLAGS, MOE_CONFIG_FLAGS

REPO_ROOT = Path(__file__).resolve().parent.parent

# The tiny model -----------------------------------------------------------------------------------
# Every hyper size differs from the others, so a transposed or mixed-up weight cannot pass a
# shape check by accident.
TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_moe_experts=4,
    moe_router_topk=2,
    hyper_adapter_dim=8,
    hyper_hidden_size=16,
    hyper_expert_embedding_dim=12,
    hyper_selection_hidden_size=10,
    hyper_selection_output_size=14,
    hyper_layer_embedding_dim=6,
    init_method_std=0.02,
)
VOCAB = 64  # for models built in-process
SEQ = 16


def tiny_config(moe_type="hypermoe", **overrides):
    return make_config(moe_type, **{**TINY, **overrides})


def tiny_model(moe_type="hypermoe", seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(moe_type, **overrides)
    return build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ), config


def batch(seed=0, batch_size=2, seq=SEQ):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, seq + 1), generator=generator)
    position_ids = torch.arange(seq).expand(batch_size, seq)
    return tokens[:, :-1], position_ids, tokens[:, 1:]


def lm_loss(model, tokens, position_ids, labels):
    """Mean token loss, as megatron's pretrain_gpt computes it."""
    mask = causal_attention_mask(tokens.shape[1], tokens.device)
    per_token = model(tokens, position_ids, mask, labels=labels)
    return per_token.float().mean()


def random_tokens(batch=2, length=SEQ, vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, causal_attention_mask(ids.shape[1])).float()


@torch.no_grad()
def hf_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


def tiny_flags(moe_type="hypermoe", **overrides):
    """The tiny model as pretrain_gpt_hypermoe.py flags (config field names as in TINY), with
    only the --hyper-* flags that ``moe_type`` reads (the others are refused)."""
    flag_of = {field: flag for flag, field in {**MODEL_CONFIG_FLAGS, **MOE_CONFIG_FLAGS}.items()}
    flag_of.update({field: field for field in VARIANT_HYPER_FIELDS["hypermoe"]})
    unread = set(VARIANT_HYPER_FIELDS["hypermoe"]) - set(VARIANT_HYPER_FIELDS[moe_type])
    if moe_type == "dense":  # (no MoE flag either)
        unread |= set(MOE_CONFIG_FLAGS.values())
    flags = []
    for field, value in {**TINY, **overrides}.items():
        if field not in unread:
            flags += ["--" + flag_of[field].replace("_", "-"), str(value)]
    return flags


# The tiny model as a training run: sequence 32, micro-batch 2 (the trainer tests' setting).
RUN_FLAGS = ["--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3", "--log-interval",
             "1", "--seed", "7"]
TINY_MODEL = tiny_flags() + RUN_FLAGS


def tiny_run(moe_type="hypermoe", **overrides):
    """TINY_MODEL for a variant: ``--moe-type moe_type`` and the --hyper-* flags it reads."""
    return tiny_flags(moe_type, **overrides) + RUN_FLAGS + ["--moe-type", moe_type]

# Subprocesses -------------------------------------------------------------------------------------
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")


def child_environment(**extra) -> dict:
    """os.environ for a child job: never inherit this process's distributed rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def environment():
    """The trainer's child environment on this CPU machine."""
    return child_environment(DS_ACCELERATOR="cpu")


def run_torchrun(nproc: int, worker: str, *args: str, timeout: int = 120) -> str:
    """Run tests/workers/<worker> under torchrun with gloo; fail with its output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(REPO_ROOT / "tests" / "workers" / worker), *args,
    ]
    result = subprocess.run(cmd, env=child_environment(), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{worker} failed (exit {result.returncode}):\n{output[-6000:]}"
    return output


def pretrain_command(nproc):
    if nproc == 1:
        return [sys.executable, str(REPO_ROOT / "pretrain_gpt_hypermoe.py")]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(REPO_ROOT / "pretrain_gpt_hypermoe.py")]


def pretrain(*flags, nproc=1, timeout=240, expect=0, env=None):
    """Run the trainer (``env``: extra environment variables); return its output, or fail with
    the lines that explain the exit code."""
    result = subprocess.run(pretrain_command(nproc) + list(flags),
                            env={**environment(), **(env or {})},
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != expect:
        clues = [line for line in output.splitlines()
                 if any(w in line for w in ("Error", "error:", "terminate", "Abort", "what()"))]
        raise AssertionError(f"exit {result.returncode}; clues:\n" + "\n".join(clues[:40])
                             + f"\n---- tail ----\n{output[-4000:]}")
    return output


def run_tool(tool, *flags, expect=0):
    """Run tools/<tool> as a user would; fail with its output on another exit code."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / tool), *map(str, flags)],
                            env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == expect, (result.stdout + result.stderr)[-3000:]
    return result


def read_metrics(path):
    """(training records, validation records) of a --metrics-file."""
    lines = [json.loads(line) for line in open(path)]
    return ([r for r in lines if "lm_loss" in r], [r for r in lines if "val_loss" in r])


def tensorboard_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def wandb_history(directory):
    """{step: {key: value}} of the offline W&B run under ``directory``, decoded with wandb's own
    record schema from its .wandb file (leveldb-style log: 32 KiB blocks of chunks with a
    7-byte header: CRC, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(directory).rglob("*.wandb")
    data, pos, pending, history = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
    return history


def error_line(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


# A synthetic corpus -------------------------------------------------------------------------------
WORDS = ("the king hath sent for thee my lord and lady of the court where shall we meet "
         "again in thunder lightning or in rain what light through yonder window breaks "
         "Ælfric naïve café 42 1600").split()


def make_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))).capitalize() + "."
                 for _ in range(rng.integers(2, 8))]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({key: doc, "id": len(doc)}) + "\n")
    return str(path)


# The HyperExpert on its own -----------------------------------------------------------------------
HYPER_EXPERT_CASES = {
    # name: (experts, topk, tokens, distinct patterns or None for "every token its own draw")
    "top1-few-sets": (8, 1, 64, 3),
    "top1-all-sets": (8, 1, 64, None),
    "top2-few-sets": (8, 2, 64, 5),
    "top2-many-sets": (16, 2, 48, None),
    "top4-many-sets": (16, 4, 40, None),
    "top8-many-sets": (16, 8, 40, None),
    "top8-of-8": (8, 8, 16, None),  # one possible set: s = 0
}


def random_routing_map(num_tokens, num_experts, topk, generator, num_patterns=None):
    """[T, E] boolean map with exactly topk experts per token; optionally drawn from a few
    patterns so that only num_patterns distinct sets occur."""
    scores = torch.rand(num_patterns or num_tokens, num_experts, generator=generator)
    chosen = scores.topk(topk, dim=1).indices
    patterns = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
    if num_patterns is None:
        return patterns
    pick = torch.randint(0, num_patterns, (num_tokens,), generator=generator)
    return patterns[pick]


def hyper_parts(num_experts, topk, hidden=24, seed=0, randomize_heads=True):
    from megatron_hypermoe.model.hypernetwork import ExpertSelectionEmbedding, HyperNetwork

    torch.manual_seed(seed)
    config = tiny_config(
        num_moe_experts=num_experts, moe_router_topk=topk, hidden_size=hidden,
        num_attention_heads=4, params_dtype=torch.float32,
    )
    selection = ExpertSelectionEmbedding(config)
    hypernet = HyperNetwork(config)
    if randomize_heads:
        # The 1e-3 hyperfanin init makes y_hyper ~0; compare the forms at a scale that tests them.
        with torch.no_grad():
            for p in hypernet.parameters():
                p.normal_(0, 0.3)
            for p in selection.parameters():
                p.normal_(0, 0.3)
    return config, selection, hypernet


def output_and_grads(impl, x, routing_map, selection, hypernet, layer_index=1):
    from megatron_hypermoe.model.hyper_expert import hyper_expert_output

    x = x.clone().requires_grad_(True)
    modules = [selection, hypernet]
    for module in modules:
        module.zero_grad(set_to_none=True)
    y = hyper_expert_output(x, routing_map, selection, hypernet, layer_index, impl=impl)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)  # weighs every output
    (y * weights).sum().backward()
    grads = {"x": x.grad.clone()}
    for prefix, module in zip(("selection", "hypernet"), modules):
        for name, p in module.named_parameters():
            grads[f"{prefix}.{name}"] = p.grad.clone()
    return y.detach(), grads


def assert_close_relative(actual, expected, rtol=1e-5, what=""):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol}"


def grouped_case(dtype, generator, tokens=64, hidden=32, rank=16, groups=6, device="cpu"):
    """A grouped HyperExpert's inputs with groups 1 and 4 empty (``allsets`` has many)."""
    set_index = torch.randint(0, groups, (tokens,), generator=generator)
    set_index[set_index == 1] = 0
    set_index[set_index == 4] = 5
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)
    # pre-activations near +-1, never near 0: rounding cannot flip the ReLU between dtypes
    b_down = torch.randn(groups, rank, generator=generator).sign().to(device, dtype)
    return (rand(tokens, hidden), set_index.to(device),
            rand(groups, hidden, rank) * 0.1 / hidden ** 0.5,
            b_down, rand(groups, rank, hidden) / rank ** 0.5, rand(groups, hidden))


def check_grouped_hyper_expert_against_fp64(dtype, device, rtol=1e-2):
    """The grouped form's output and every gradient in ``dtype`` against the per-token form in
    fp64 on the same values; the empty groups' weight and bias gradients exactly zero."""
    from megatron_hypermoe.model.hyper_expert import apply_hyper_experts

    inputs = grouped_case(dtype, torch.Generator().manual_seed(4), device=device)
    x, set_index, *weights = [t.requires_grad_(t.is_floating_point()) for t in inputs]
    y = apply_hyper_experts(x, set_index, *weights)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    y.backward(grad_y)

    reference = [t.detach().double().requires_grad_(t.is_floating_point()) for t in inputs]
    x64, _, w_down, b_down, w_up, b_up = reference
    a = torch.relu(torch.einsum("td,tdr->tr", x64, w_down[set_index]) + b_down[set_index])
    y64 = torch.einsum("tr,trd->td", a, w_up[set_index]) + b_up[set_index]
    y64.backward(grad_y.double())

    assert_close_relative(y.double(), y64, rtol=rtol, what="output")
    for name, ours, exact in zip(("x", "w_down", "b_down", "w_up", "b_up"),
                                 [x, *weights], [x64, *reference[2:]]):
        assert_close_relative(ours.grad.double(), exact.grad, rtol=rtol, what=f"grad {name}")
        if name != "x":
            assert ours.grad[[1, 4]].abs().max() == 0, f"grad {name}: an empty group moved"


# Expert parallelism against one process -----------------------------------------------------------
EP_CASES = [(moe_type, dispatcher) for moe_type in ("hypermoe", "moe")
            for dispatcher in ("alltoall", "allgather")]
# Token dropping under EP: capacity is per rank's micro-batch, as in one process on that batch.
EP_CAPACITY_CASES = {
    "hypermoe_alltoall_drop": ("hypermoe", "alltoall", dict(moe_expert_capacity_factor=0.5)),
    "hypermoe_allgather_drop": ("hypermoe", "allgather", dict(moe_expert_capacity_factor=0.5)),
    "hypermoe_alltoall_pad": ("hypermoe", "alltoall", dict(moe_expert_capacity_factor=1.0,
                                                           moe_pad_expert_input_to_capacity=True)),
    "moe_alltoall_pad": ("moe", "alltoall", dict(moe_expert_capacity_factor=0.5,
                                                 moe_pad_expert_input_to_capacity=True)),
}
EP_INIT_SEED = 42


# Recomputation re-runs the dispatcher's collectives in backward.
EP_RECOMPUTE_CASES = {
    "hypermoe_alltoall_recompute_full": ("hypermoe", "alltoall", dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    "hypermoe_alltoall_recompute_moe": ("hypermoe", "alltoall", dict(
        recompute_granularity="selective", recompute_modules=["moe"])),
}

# Each HyperExpert form under EP (the cases above take auto: allsets at these token counts),
# and megatron's SequentialMLP experts (the cases above take the grouped-GEMM ones).
EP_IMPL_CASES = {
    **{f"hypermoe_alltoall_{impl}": ("hypermoe", "alltoall", dict(hyper_expert_impl=impl))
       for impl in ("grouped", "factored")},
    "moe_alltoall_sequential_mlp": ("moe", "alltoall", dict(moe_grouped_gemm=False)),
}
# The flags of megatron-core's own attention and experts, which one-process reference runs take
# (parallel runs take the defaults: SDPA and grouped-GEMM experts).
MEGATRON_KERNELS = ["--attention-backend", "local", "--no-moe-grouped-gemm"]
# What every EP=2 case is compared with in one process: megatron's own attention and experts
# (SequentialMLP), so EP=2 with SDPA and grouped-GEMM experts is checked against them too.
EP_REFERENCE_OVERRIDES = dict(core_attention_backend="local", moe_grouped_gemm=False)


def ep_case_model(moe_type, dispatcher, **overrides):
    """The EP equivalence tests' model: tiny, top-2 of 4 experts, weights from global names
    (``overrides``: other config fields, e.g. a capacity factor)."""
    from megatron_hypermoe.model.initialization import initialize_from_global_names

    model, config = tiny_model(moe_type, **{"moe_router_topk": 2,
                                            "moe_token_dispatcher_type": dispatcher,
                                            **overrides})
    initialize_from_global_names(model, config, EP_INIT_SEED)
    if moe_type == "hypermoe":
        with torch.no_grad():  # make the HyperExpert's contribution large enough to matter
            for head in ("down_weight", "up_weight"):
                getattr(model.hypernetwork, head).weight.mul_(1000)
    return model, config


def loss_and_global_grads(model, config, data_seed):
    """Loss and every gradient, keyed by GLOBAL parameter name, for one batch."""
    from megatron.core import parallel_state

    from megatron_hypermoe.parallel.experts import global_parameter_name

    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, *batch(seed=data_seed))
    loss.backward()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_local = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    grads = {
        global_parameter_name(name, num_local, ep_rank): p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return loss.detach(), grads
