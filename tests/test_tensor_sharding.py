"""tensor_sharding: shard and merge are inverses, SwiGLU's fc1 is split half by half."""

import pytest
import torch

from megatron_hypermoe.parallel.tensor_sharding import merge, partition_dim, shard


@pytest.mark.parametrize("name,dim", [
    ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0),
    ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", 1),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", 0),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", 1),
    ("decoder.layers.1.mlp.router.weight", None), ("decoder.final_layernorm.weight", None),
    ("hypernetwork.down_weight.weight", None),
    ("decoder.layers.0.mlp.selection.fc1.weight", None),
])
def test_partition_dim_by_name(name, dim):
    assert partition_dim(name) == dim


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_merge_inverts_shard_and_gated_fc1_keeps_gate_and_up_apart(tp_size):
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    full = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    shards = [shard(full, name, 0, tp_size, rank, gated=True) for rank in range(tp_size)]
    assert torch.equal(merge(shards, name, 0, gated=True), full)
    # Each rank holds [its gate rows; its up rows]: rank 0's first row is gate row 0 and its
    # second half starts with up row 0 (= full row 8).
    assert torch.equal(shards[0][0], full[0])
    assert torch.equal(shards[0][shards[0].shape[0] // 2], full[8])
    plain = "decoder.layers.0.self_attention.linear_proj.weight"
    shards = [shard(full.T, plain, 1, tp_size, rank, gated=True) for rank in range(tp_size)]
    assert torch.equal(merge(shards, plain, 1, gated=True), full.T)
