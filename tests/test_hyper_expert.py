"""The HyperExpert computation on its own: selection embedding, fast forms vs the paper's form."""

import itertools
import math

import pytest
import torch

from megatron_hypermoe.model.hyper_expert import (
    all_selected_sets,
    choose_impl,
    distinct_selected_sets,
    hyper_expert_output,
    selected_set_index,
)
from tests.support.hyper_expert_cases import (
    HYPER_EXPERT_CASES,
    assert_close_relative,
    check_grouped_hyper_expert_against_fp64,
    grouped_case,
    hyper_parts,
    output_and_grads,
    random_routing_map,
)


# Invariant 3 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts,topk", [(4, 1), (6, 2), (5, 5)])
def test_selection_embedding_is_sum_over_unselected_experts(num_experts, topk):
    _, selection, _ = hyper_parts(num_experts, topk)
    routing_map = random_routing_map(20, num_experts, topk, torch.Generator().manual_seed(3))
    s = selection.selection_embedding(routing_map)
    emb = selection.embedding.weight
    for t in range(routing_map.shape[0]):
        brute = torch.zeros(emb.shape[1])
        for j in range(num_experts):
            if not routing_map[t, j]:
                brute = brute + emb[j]
        torch.testing.assert_close(s[t], brute, rtol=1e-6, atol=1e-6)
    if topk == num_experts:
        assert torch.count_nonzero(s) == 0


def test_top1_selection_embedding_is_total_minus_selected():
    _, selection, _ = hyper_parts(8, 1)
    routing_map = random_routing_map(16, 8, 1, torch.Generator().manual_seed(1))
    emb = selection.embedding.weight
    expected = emb.sum(0) - emb[routing_map.float().argmax(1)]
    torch.testing.assert_close(selection.selection_embedding(routing_map), expected)


def test_distinct_selected_sets_reconstructs_routing_map():
    generator = torch.Generator().manual_seed(0)
    for num_experts in (4, 70):  # bit-key path and the unique-rows path
        routing_map = random_routing_map(50, num_experts, 2, generator, num_patterns=7)
        sets, inverse = distinct_selected_sets(routing_map)
        assert torch.equal(sets[inverse], routing_map)
        assert sets.shape[0] == len({tuple(r.tolist()) for r in routing_map})


# Invariant 4 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["allsets", "grouped", "factored", "auto"])
@pytest.mark.parametrize("case", sorted(HYPER_EXPERT_CASES))
def test_fast_forms_equal_naive_outputs_and_every_gradient(impl, case):
    num_experts, topk, tokens, patterns = HYPER_EXPERT_CASES[case]
    _, selection, hypernet = hyper_parts(num_experts, topk)
    generator = torch.Generator().manual_seed(11)
    routing_map = random_routing_map(tokens, num_experts, topk, generator, patterns)
    x = torch.randn(tokens, 24, generator=generator)

    y_ref, grads_ref = output_and_grads("naive", x, routing_map, selection, hypernet)
    y, grads = output_and_grads(impl, x, routing_map, selection, hypernet)

    assert y_ref.abs().max() > 1e-2, "test scale too small to compare anything"
    assert_close_relative(y, y_ref, what="output")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        # (the embedding rows of always-selected experts get none; with k = E, s = 0 and the
        # selection MLP's first weight gets none)
        no_grad_expected = name.startswith("selection.embedding") or (
            topk == num_experts and name == "selection.fc1.weight")
        assert grads_ref[name].abs().max() > 0 or no_grad_expected, name
        assert_close_relative(grads[name], grads_ref[name], what=f"grad {name}")


@pytest.mark.parametrize("num_experts,topk", [(8, 1), (8, 2), (6, 3), (16, 4), (9, 9)])
def test_selected_set_index_is_the_row_of_every_possible_set(num_experts, topk):
    sets = all_selected_sets(num_experts, topk, "cpu")
    assert sets.shape == (math.comb(num_experts, topk), num_experts)
    assert bool((sets.sum(1) == topk).all())
    assert len({tuple(row.tolist()) for row in sets}) == sets.shape[0]  # each set once
    assert torch.equal(selected_set_index(sets, topk), torch.arange(sets.shape[0]))
    routing_map = random_routing_map(50, num_experts, topk, torch.Generator().manual_seed(2))
    assert torch.equal(sets[selected_set_index(routing_map, topk)], routing_map)


def test_auto_rule_from_shapes():
    # allsets while all C(E, k) HyperExperts keep no more than factored would: C * d <= T * d_g
    assert choose_impl("auto", 2048, 8, 2, "cpu", 768, 128) == "allsets"    # 28 * 6 <= 2048
    assert choose_impl("auto", 4096, 8, 2, "cuda", 2048, 128) == "allsets"  # 28 * 16 <= 4096
    assert choose_impl("auto", 4096, 64, 2, "cuda", 2048, 128) == "factored"  # 2016 * 16
    assert choose_impl("auto", 4096, 64, 2, "cpu", 2048, 128) == "grouped"
    assert choose_impl("auto", 2048, 64, 8, "cuda", 768, 128) == "factored"  # C = 4.4e9
    assert choose_impl("auto", 100, 8, 2, "cuda", 768, 128) == "factored"   # too few tokens
    assert choose_impl("grouped", 2048, 8, 1, "cuda", 768, 128) == "grouped"  # explicit stays


def test_auto_on_cpu_turns_factored_when_distinct_sets_are_many(monkeypatch):
    import megatron_hypermoe.model.hyper_expert as he

    _, selection, hypernet = hyper_parts(16, 4)  # C(16, 4) = 1820 > 40 tokens: not allsets
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=generator)
    used = []
    monkeypatch.setattr(he, "apply_hyper_experts", lambda *a: used.append("grouped") or a[0])
    monkeypatch.setattr(he, "_apply_factored", lambda *a: used.append("factored") or a[0])
    few = random_routing_map(40, 16, 4, generator, num_patterns=3)
    many = random_routing_map(40, 16, 4, generator)
    he.hyper_expert_output(x, few, selection, hypernet, 0, impl="auto")
    he.hyper_expert_output(x, many, selection, hypernet, 0, impl="auto")
    he.hyper_expert_output(x, many, selection, hypernet, 0, impl="grouped")
    assert used == ["grouped", "factored", "grouped"]


def test_allsets_reads_nothing_on_the_host(monkeypatch):
    """The GPU form may not wait for the device: no .item(), .tolist(), bool(), unique or
    bincount anywhere in its forward or backward (on a GPU, tests/test_gpu.py checks the same
    with CUDA's sync debug mode)."""
    if not hasattr(torch, "_grouped_mm"):  # (before torch 2.8: the loop, one read per forward)
        pytest.skip("this torch has no torch._grouped_mm")
    _, selection, hypernet = hyper_parts(8, 2, hidden=32)
    routing_map = random_routing_map(64, 8, 2, torch.Generator().manual_seed(1))
    x = torch.randn(64, 32, requires_grad=True)

    def host_read(*args, **kwargs):
        raise AssertionError("read a tensor on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for name in ("unique", "bincount", "nonzero"):
        monkeypatch.setattr(torch, name, host_read)
    y = hyper_expert_output(x, routing_map, selection, hypernet, 0, impl="allsets", topk=2)
    y.square().sum().backward()
    monkeypatch.undo()
    assert x.grad.abs().max() > 0


@pytest.mark.parametrize("native", [True, False])
def test_grouped_hyper_expert_in_bf16_equals_fp64_empty_groups_included(native, monkeypatch):
    """Output and every gradient of the grouped form (torch._grouped_mm, or the per-group loop
    used elsewhere) in bf16 against the per-token form in fp64 on the same values: the weight
    gradients of the 2-D x 2-D grouped product included, zero for the empty groups, and the bias
    gradients accumulated in fp32."""
    import megatron_hypermoe.model.grouped_gemm as gg

    if native and not gg.native_grouped_mm(torch.ones(1, dtype=torch.bfloat16), 16):
        pytest.skip("this torch has no torch._grouped_mm on the CPU")
    monkeypatch.setattr(gg, "native_grouped_mm", lambda *args: native)
    check_grouped_hyper_expert_against_fp64(torch.bfloat16, "cpu")


def test_bias_gradients_are_summed_in_fp32(monkeypatch):
    """A bias gradient sums thousands of tokens. CUDA's index_add_ adds bf16 into bf16 (atomic
    adds: from 256 on, + 1 rounds back to 256); the CPU's happens to sum in fp32, so what is
    checked here is what index_add_ is given: fp32 sums, rounded to bf16 once."""
    import megatron_hypermoe.model.grouped_gemm as gg
    import megatron_hypermoe.model.hyper_expert as he

    accumulators = []
    real_index_add = torch.Tensor.index_add_
    monkeypatch.setattr(torch.Tensor, "index_add_", lambda self, *args, **kwargs: (
        accumulators.append(self.dtype) or real_index_add(self, *args, **kwargs)))
    x, set_index, *weights = [t.requires_grad_(t.is_floating_point()) for t in
                              grouped_case(torch.bfloat16, torch.Generator().manual_seed(6))]
    he.apply_hyper_experts(x, set_index, *weights).float().sum().backward()
    assert accumulators == [torch.float32, torch.float32]  # b_up's, then b_down's
    assert weights[3].grad.dtype == torch.bfloat16
    total = gg.grouped_row_sum(torch.ones(4096, 8, dtype=torch.bfloat16),
                               torch.zeros(4096, dtype=torch.long), 2)
    assert total.dtype == torch.bfloat16 and total[0].tolist() == [4096.0] * 8


def test_the_grouped_loop_reads_the_host_once_per_forward(monkeypatch):
    """Where torch._grouped_mm cannot run (a GPU before Hopper, fp32 on a GPU) the loop reads
    the group bounds on the host: once in forward, never in backward (six reads per layer
    before)."""
    import megatron_hypermoe.model.grouped_gemm as gg
    import megatron_hypermoe.model.hyper_expert as he

    monkeypatch.setattr(gg, "native_grouped_mm", lambda *args: False)
    x, set_index, *weights = [t.requires_grad_(t.is_floating_point()) for t in
                              grouped_case(torch.float32, torch.Generator().manual_seed(6))]
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    y = he.apply_hyper_experts(x, set_index, *weights)
    assert len(reads) == 1
    y.square().sum().backward()
    assert len(reads) == 1 and x.grad.abs().max() > 0


def test_native_grouped_gemm_only_where_it_was_checked(monkeypatch):
    """torch._grouped_mm on the CPU (every dtype) and on Hopper (sm90) in bf16, rows 16-byte
    aligned; not on Blackwell, where empty groups are reported to give non-zero gradients."""
    import types

    import megatron_hypermoe.model.grouped_gemm as gg

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    a = torch.ones(4, 8)
    assert gg.native_grouped_mm(a, 8, 4)
    assert not gg.native_grouped_mm(a, 8, 6)  # 24-byte rows
    assert not gg.native_grouped_mm(a.bfloat16(), 8, 4)  # 8-byte rows
    for dtype, capability, native in [(torch.bfloat16, (9, 0), True),
                                      (torch.bfloat16, (10, 0), False),
                                      (torch.bfloat16, (12, 0), False),
                                      (torch.bfloat16, (8, 0), False),
                                      (torch.float32, (9, 0), False)]:
        gpu_tensor = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype,
                                           element_size=lambda dtype=dtype: dtype.itemsize)
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device, capability=capability: capability)
        assert gg.native_grouped_mm(gpu_tensor, 64, 16) == native, (dtype, capability)


@pytest.mark.parametrize("rows", [1, 8, 17, 28, 40, 130])
def test_head_products_in_blocks_equal_one_gemm(rows):
    """The heads' three products as taken on the CPU for few code rows (forward and input
    gradient over column blocks, weight gradient in blocks of 16 output rows) equal one GEMM
    each: 1,024 outputs take the column blocks, 300 never do (not a multiple of the block), and
    d_g 37 leaves a last row block that is not full."""
    from megatron_hypermoe.model import few_row_gemm as hn

    generator = torch.Generator().manual_seed(rows)
    for columns in (1024, 300):
        h = torch.randn(rows, 37, generator=generator)
        weight, bias = torch.randn(37, columns, generator=generator), torch.randn(columns)
        grad = torch.randn(columns, rows, generator=generator).t()  # (not contiguous)
        for product in ("forward", "input_grad"):
            assert hn.blocked(product, h, columns) == (
                rows < hn.BLOCKED_BELOW_ROWS[product] and columns == 1024)
        assert hn.blocked("weight_grad", h) == (rows < hn.BLOCKED_BELOW_ROWS["weight_grad"])
        torch.testing.assert_close(hn.head_product(h, weight, bias), torch.addmm(bias, h, weight))
        # (a sum of 1,024 products per entry, added in another order when blocked)
        torch.testing.assert_close(hn.head_input_grad(grad, weight), grad @ weight.t(),
                                   rtol=1e-5, atol=1e-4)
        weight_grad = hn.head_weight_grad(h, grad)
        assert weight_grad.shape == (37, columns) and weight_grad.is_contiguous()
        torch.testing.assert_close(weight_grad, h.t() @ grad)
    # Only fp32 on the CPU is blocked (what was measured; bf16 would round each block's sum).
    assert not any(hn.blocked(product, h.bfloat16(), 1024)
                   for product in ("forward", "input_grad", "weight_grad"))


# Invariant 7 --------------------------------------------------------------------------------------
def test_same_selected_set_in_two_layers_gives_different_hyperexperts():
    config, selection, hypernet = hyper_parts(4, 1, randomize_heads=False)
    routing_map = torch.tensor([[True, False, False, False]])
    z = selection(routing_map)  # the same per-layer selection output in both layers
    w0 = hypernet.generate(hypernet.hidden(z, 0))
    w1 = hypernet.generate(hypernet.hidden(z, 1))
    assert not torch.equal(w0[0], w1[0])
    assert not torch.equal(w0[2], w1[2])
    # ...and only because of the layer embedding: equal rows give equal HyperExperts.
    with torch.no_grad():
        hypernet.layer_embedding.weight[1] = hypernet.layer_embedding.weight[0]
    w1_same = hypernet.generate(hypernet.hidden(z, 1))
    for a, b in zip(w0, w1_same):
        assert torch.equal(a, b)


# Invariant 6 (the shared hypernetwork's gradient sums over layers) --------------------------------
def test_shared_hypernetwork_gradient_is_sum_over_layers():
    config, selection0, hypernet = hyper_parts(6, 2)
    _, selection1, _ = hyper_parts(6, 2, seed=1)
    generator = torch.Generator().manual_seed(5)
    maps = [random_routing_map(30, 6, 2, generator) for _ in range(2)]
    xs = [torch.randn(30, 24, generator=generator) for _ in range(2)]
    selections = [selection0, selection1]

    def grads(layers):
        hypernet.zero_grad(set_to_none=True)
        total = sum(
            hyper_expert_output(xs[layer], maps[layer], selections[layer], hypernet, layer)
            .square().sum()
            for layer in layers
        )
        total.backward()
        return {n: p.grad.clone() for n, p in hypernet.named_parameters()}

    both, only0, only1 = grads([0, 1]), grads([0]), grads([1])
    for name in both:
        torch.testing.assert_close(both[name], only0[name] + only1[name], rtol=1e-5, atol=1e-7)
    # Each layer touches only its own row of the layer embedding.
    assert only0["layer_embedding.weight"][1].abs().max() == 0
    assert only1["layer_embedding.weight"][0].abs().max() == 0


def test_expert_embedding_rows_get_gradient_only_when_unselected_by_some_token():
    _, selection, hypernet = hyper_parts(5, 2)
    # Expert 0 is selected by every token; expert 4 by none; 1..3 by some.
    routing_map = torch.zeros(12, 5, dtype=torch.bool)
    routing_map[:, 0] = True
    for t in range(12):
        routing_map[t, 1 + t % 3] = True
    x = torch.randn(12, 24)
    hyper_expert_output(x, routing_map, selection, hypernet, 0, impl="grouped").sum().backward()
    row_grad = selection.embedding.weight.grad.abs().sum(1)
    assert row_grad[0] == 0
    assert all(row_grad[j] > 0 for j in range(1, 5))


@pytest.mark.parametrize("num_experts,topk", list(itertools.product([4], [1, 2])))
def test_hyperfanin_init_makes_hyper_output_tiny(num_experts, topk):
    _, selection, hypernet = hyper_parts(num_experts, topk, randomize_heads=False)
    routing_map = random_routing_map(32, num_experts, topk, torch.Generator().manual_seed(0))
    x = torch.randn(32, 24)
    y = hyper_expert_output(x, routing_map, selection, hypernet, 0)
    assert y.abs().max() < 1e-3 * x.abs().max()
    assert y.abs().max() > 0
