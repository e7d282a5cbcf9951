"""Sparse inference on the CPU: the C kernels against torch in float64, the torch-CSR
fallback, and sparsify() on whole models (tied heads and convolutions stay dense)."""
import pytest
import torch
from torch import nn

from adamwprune.inference import CSRWeight, SparseConv2d, SparseLinear, sparsify
from adamwprune.inference import cpu_kernels
from adamwprune.models.gpt2 import GPT, gpt_config
from adamwprune.models.lenet5 import LeNet5

needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler: torch CSR runs")


def pruned_linear(n_in, n_out, sparsity, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
        lin.weight.mul_(torch.rand(n_out, n_in, generator=g) >= sparsity)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


def reference(lin, x):
    y = x.double() @ lin.weight.double().t()
    return y if lin.bias is None else y + lin.bias.double()


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 2, 15, 16, 17, 64, 100, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_float64_for_every_token_count(tokens, bias):
    lin = pruned_linear(200, 70, 0.9, bias)  # 70 rows: a partial 16-row block
    layer = SparseLinear(lin, use_kernel=True)
    assert layer.path == "kernel"
    x = torch.randn(tokens, 200, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (tokens, 70) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(lin, x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_handles_batched_inputs_empty_rows_and_many_threads():
    lin = pruned_linear(96, 40, 0.5)
    with torch.no_grad():
        lin.weight[3].zero_()  # a row with no non-zero
    layer = SparseLinear(lin, use_kernel=True)
    x = torch.randn(3, 7, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            y2 = layer(x)
        torch.set_num_threads(1)
        with torch.no_grad():
            y1 = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)  # the order of the additions does not depend on threads
    torch.testing.assert_close(y1.double(), reference(lin, x), rtol=1e-5, atol=1e-5)
    assert torch.all(y1[..., 3] == lin.bias[3])


def test_torch_csr_fallback_matches_float64():
    lin = pruned_linear(64, 32, 0.8)
    layer = SparseLinear(lin, use_kernel=False)
    assert layer.path == "torch-csr"
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(lin, x), rtol=1e-5, atol=1e-5)


def test_csr_weight_stores_six_bytes_per_nonzero():
    layer = SparseLinear(pruned_linear(768, 300, 0.9))
    w = layer.weight_csr
    assert w.nbytes() == 6 * w.nnz + 4 * (300 + 1)  # no int64 copy beside it
    lin = pruned_linear(768, 300, 0.9)
    assert torch.equal(CSRWeight(lin.weight).dense(), lin.weight.detach())


def test_column_indices_above_32767_are_read_unsigned():
    lin = nn.Linear(40000, 2, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 39999] = 2.0
        lin.weight[1, 32768] = 3.0
    layer = SparseLinear(lin)
    x = torch.zeros(1, 40000)
    x[0, 39999], x[0, 32768] = 5.0, 7.0
    with torch.no_grad():
        assert layer(x).tolist() == [[10.0, 21.0]]


def test_sparsify_swaps_sparse_untied_linears_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", vocab_size=128)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_attn, block.mlp.c_fc, block.mlp.c_proj):
                lin.weight.mul_(torch.rand_like(lin.weight) >= 0.9)
    x = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        before = model(x)[0]
        choices = sparsify(model)
        after = model(x)[0]
    assert {c.name for c in choices if c.sparse} == {
        f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")}
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["transformer.h.0.mlp.c_fc"] == "SparseLinear"
    assert kinds["transformer.h.0.attn.c_proj"] == "Linear"  # dense: below min_sparsity
    assert kinds["lm_head"] == "Linear"  # tied to the embedding
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def pruned_lenet(sparsity=0.95):
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) >= sparsity)
    return model


def test_sparsify_without_a_measurement_leaves_convolutions_dense():
    model = pruned_lenet()
    choices = sparsify(model)
    assert isinstance(model.features[0], nn.Conv2d) and isinstance(model.features[3], nn.Conv2d)
    assert all(isinstance(model.classifier[i], SparseLinear) for i in (1, 3, 5))
    assert [c.sparse for c in choices if c.kind == "Conv2d"] == [False, False]


def test_sparsify_with_an_example_swaps_exactly_the_layers_measured_faster():
    model = pruned_lenet()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
    choices = sparsify(model, lambda: model(x), repeats=2)
    assert len(choices) == 5 and all(c.reason == "measured" for c in choices)
    for c in choices:
        assert c.dense_ms > 0 and c.sparse_ms > 0 and c.sparse == (c.sparse_ms < c.dense_ms)
        module = model.get_submodule(c.name)
        assert isinstance(module, (SparseLinear, SparseConv2d)) == c.sparse
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 0, 5)])
def test_sparse_conv_matches_the_dense_convolution(stride, padding, k):
    torch.manual_seed(stride + padding + k)
    conv = nn.Conv2d(8, 12, k, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= 0.8)
    x = torch.randn(3, 8, 11, 11)
    with torch.no_grad():
        want = conv(x.double().float())
        got = SparseConv2d(conv)(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_to_two_four_keeps_the_two_largest_of_every_four():
    from adamwprune.export.compressed import follows_two_four
    from adamwprune.inference.semi_structured import to_two_four

    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.25, -0.75, 0.0]])
    assert to_two_four(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.5, 0.0, -0.75, 0.0]]
    assert follows_two_four(to_two_four(torch.randn(16, 32)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_semi_structured_path_refuses_without_a_capable_gpu():
    from adamwprune.inference.semi_structured import available, semi_structured_linears

    assert available() == (False, "no CUDA device")
    with pytest.raises(RuntimeError, match="compute capability >= 8.0"):
        semi_structured_linears(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_semi_structured_linear_matches_dense_on_the_gpu():
    from adamwprune.inference.bench import bench_two_four
    from adamwprune.inference.semi_structured import available, semi_structured_linears, to_two_four

    if not available()[0]:
        pytest.skip(available()[1])
    lin = nn.Linear(256, 128).cuda().to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(to_two_four(lin.weight.float()).to(torch.bfloat16))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = lin(x)
        model = nn.Sequential(lin)
        assert semi_structured_linears(model) == 1
        torch.testing.assert_close(model(x), want, rtol=2e-2, atol=2e-2)
    r = bench_two_four((3072, 768), 512, repeats=3, warmup=1)
    assert r["speedup"] > 0 and r["max_abs_diff_vs_dense"] < 1.0


def test_a_layer_pruned_to_the_threshold_counts_as_sparse_enough():
    from adamwprune.inference.bench import prune_smallest

    model = nn.Sequential(nn.Linear(768, 2304))  # round(0.7 * N) / N < 0.7 in floating point
    prune_smallest(model[0].weight, 0.7)
    assert (model[0].weight == 0).float().mean().item() < 0.7
    (choice,) = sparsify(model, min_sparsity=0.7)
    assert choice.sparse and isinstance(model[0], SparseLinear)
