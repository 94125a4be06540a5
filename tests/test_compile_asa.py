"""ASA under `torch.compile(fullgraph=True)`: the Triton kernels, the prober and the ASA module trace without graph
breaks (custom ops) and compute exactly what eager code computes, on CPU (Triton interpreter, aot_eager backend)."""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not importable")

from blade.attention import AdaptiveBlockSparseAttention, ASAConfig, block_sparse_attention  # noqa: E402
from blade.attention.block_mask import BlockMask, dense_to_lists  # noqa: E402
from blade.attention.kernels import triton_bsa  # noqa: E402
from blade.attention.prober import estimate_block_mask  # noqa: E402
from blade.models.wan import apply_asa  # noqa: E402
from blade.speed import compile_transformer_blocks  # noqa: E402
from blade.testing.tiny import tiny_wan_transformer  # noqa: E402

if not torch.cuda.is_available() and not triton_bsa._interpreting():
    pytest.skip("the kernels were built before TRITON_INTERPRET was set", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE) for shape in shapes]


def test_triton_attention_compiles_fullgraph_with_eager_output_and_grads():
    batch, heads, q_len, k_len, dim, block, n_global = 1, 2, 80, 72, 16, 32, 5
    q, k, v, gk, gv = _tensors(
        *[(batch, heads, n, dim) for n in (q_len, k_len, k_len, n_global, n_global)], seed=1
    )  # fmt: skip
    mask = torch.rand(batch, heads, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[..., 0, :] = False  # a query block that sees only the global tokens
    mask = mask.to(DEVICE)
    bias = torch.log(torch.arange(1.0, n_global + 1)).to(DEVICE)

    def attention(q, k, v, gk, gv, backend="triton"):
        out = block_sparse_attention(
            q, k, v, mask, block_size=block, backend=backend, global_k=gk, global_v=gv, global_bias=bias
        )
        return out, (out * out).sum()  # a non-uniform output gradient

    def run(fn, backend="triton"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, gk, gv)]
        out, loss = fn(*leaves, backend=backend)
        loss.backward()
        return out.detach(), [t.grad for t in leaves]

    eager_out, eager_grads = run(attention)
    compiled_out, compiled_grads = run(_compiled(attention))
    reference_out, reference_grads = run(attention, backend="reference")
    tol = 1e-4 if DEVICE == "cpu" else 2e-2  # fp32 runs in tf32 on the GPU, exactly in the CPU interpreter
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled_out, reference_out, atol=tol, rtol=tol)
    for compiled, eager, reference in zip(compiled_grads, eager_grads, reference_grads):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled, reference, atol=tol, rtol=tol)


def test_custom_ops_pass_opcheck():
    """torch's own check of each op's schema, fake implementation (shapes, dtypes, strides, also with dynamic shapes)
    against the real one, and autograd registration."""
    q, k, v, gk, gv = (t.requires_grad_(True) for t in _tensors(*[(1, 2, n, 16) for n in (40, 36, 36, 3, 3)]))
    mask = (torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5).to(DEVICE)
    bias = torch.randn(3).to(DEVICE)
    lists = triton_bsa.kernel_lists(BlockMask.from_dense(mask), 1, 2)
    torch.library.opcheck(torch.ops.blade.bsa_block_lists.default, (mask,))
    torch.library.opcheck(torch.ops.blade.bsa_forward.default, (q, k, v, *lists, gk, gv, bias, 16, 0.25))
    q_pos, k_pos = torch.ops.blade.prober_positions(q.device, 40, 36, 16, 4, 1, 2, -1)
    assert q_pos.shape == (1, 2, 3 * 4) and k_pos.shape == (1, 2, 3 * 4) and q_pos.dtype == torch.int64
    torch.library.opcheck(torch.ops.blade.prober_importance.default, (q.detach(), k.detach(), q_pos, k_pos, 4, True))
    importance = torch.ops.blade.prober_importance(q.detach(), k.detach(), q_pos, k_pos, 4, True)
    torch.library.opcheck(torch.ops.blade.prober_select.default, (importance, 0.9, 1, 2, -1, -1, True))
    torch.library.opcheck(torch.ops.blade.prober_select.default, (importance, 0.9, 1, 3, 2, 2, True))  # dense tail


def test_mask_lists_compile_fullgraph():
    mask = (torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4).to(DEVICE)
    def lists(m):  # the kernels' lists of a BlockMask made inside the graph (Triton builder: an opaque op)
        return triton_bsa.kernel_lists(BlockMask.from_dense(m), 2, 3)

    def torch_lists(m):  # the torch builder, flattened as the kernels take it
        counts, index = dense_to_lists(m)
        return counts.flatten(), index.flatten(0, 2), triton_bsa.launch_order(counts.flatten(), m.shape[-2])

    eager = lists(mask)
    compiled = _compiled(lambda m: lists(m.transpose(-1, -2)))(mask)
    for got, expected in zip(compiled, torch_lists(mask.transpose(-1, -2))):
        assert torch.equal(got, expected)
    for got, expected in zip(eager, torch_lists(mask)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prober_with_a_seeded_generator_compiles_to_the_eager_mask(backend):
    q, k = _tensors((1, 2, 150, 16), (1, 2, 130, 16), seed=3)
    kwargs = dict(block_size=16, samples_per_block=4, threshold=0.7, min_keep=0.1, max_keep=0.5, backend=backend)

    def masks(q, k, generator):
        # two draws from one generator: the compiled graph must keep their order and not merge them
        return estimate_block_mask(q, k, generator=generator, **kwargs), estimate_block_mask(
            q, k, generator=generator, **kwargs
        )

    eager = masks(q, k, torch.Generator(DEVICE).manual_seed(11))
    compiled_fn = _compiled(masks)
    compiled = compiled_fn(q, k, torch.Generator(DEVICE).manual_seed(11))
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    assert not torch.equal(eager[0], eager[1])  # the generator advanced between the calls
    # Another generator object, same seed: the graph is guarded on the generator, so it draws from the new one.
    again = compiled_fn(q, k, torch.Generator(DEVICE).manual_seed(11))
    assert all(torch.equal(c, e) for c, e in zip(again, eager))


@pytest.mark.parametrize("backend, seed", [("triton", 3), ("auto", None)])
def test_asa_module_compiles_to_the_eager_output_and_stats(backend, seed):
    grid = (2, 4, 8)
    q, k, v = _tensors(*[(1, 2, 64 + 6, 16)] * 3, seed=4)  # 64 video tokens + 6 dense tail tokens
    config = ASAConfig(block_size=16, samples_per_block=4, threshold=0.6, min_keep=0.1, max_keep=0.4, pool_size=8,
                       backend=backend, seed=seed)  # fmt: skip
    eager_asa, compiled_asa = AdaptiveBlockSparseAttention(config), AdaptiveBlockSparseAttention(config)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_asa, fullgraph=True, backend=counter)

    for _ in range(2):  # a second run after reset_stats repeats the first (seeded) and reuses the graphs
        torch.manual_seed(0)
        eager_outs = [eager_asa(q, k, v, grid) for _ in range(2)]  # the prober's generator advances per call
        torch.manual_seed(0)
        compiled_outs = [compiled(q, k, v, grid) for _ in range(2)]
        for got, expected in zip(compiled_outs, eager_outs):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert compiled_asa.stats() == eager_asa.stats() and compiled_asa.stats()["calls"] == 2
        assert compiled_asa.last_stats == eager_asa.last_stats and eager_asa.last_stats["sparsity"] > 0
        eager_asa.reset_stats()
        compiled_asa.reset_stats()
    # One graph before any stats exist and one after: no recompilation per call or per reset.
    assert counter.frame_count == 2


def _tiny_wan_with_asa(prober_seed: int | None = 0):
    """A tiny Wan transformer with ASA (a seeded prober unless ``prober_seed`` is None: then the global RNG) and its
    inputs (no timestep: the caller sets one or a sequence)."""
    model = tiny_wan_transformer(seed=0).to(DEVICE)
    config = ASAConfig(block_size=16, samples_per_block=4, threshold=0.5, min_keep=0.2, max_keep=0.5, pool_size=8,
                       seed=prober_seed)  # fmt: skip
    handle = apply_asa(model, config)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g).to(DEVICE),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(DEVICE), return_dict=False)  # fmt: skip
    return model, handle, inputs


def test_tiny_wan_with_asa_compiles_fullgraph_and_matches_eager():
    model, handle, inputs = _tiny_wan_with_asa()
    inputs["timestep"] = torch.tensor([500.0], device=DEVICE)
    with torch.no_grad():
        reference = model(**inputs)[0]
        reference_stats = handle.stats()
        handle.reset()
        report = compile_transformer_blocks(model, backend="aot_eager")
        out = model(**inputs)[0]
    assert report["transformer_fullgraph"] is True, report.get("transformer_compile_errors")
    assert report["transformer_compile_mode"] == "fullgraph"
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert handle.stats() == reference_stats and reference_stats["sparsity"] > 0


@pytest.mark.gpu
def test_asa_compiles_with_inductor_on_cuda():
    """The benchmark's setting: inductor, bf16, fused prober + Triton kernel, global tokens, forward and backward."""
    config = ASAConfig(block_size=128, pool_size=30, seed=0)  # backend "auto": Triton on CUDA
    q, k, v = (t.to(torch.bfloat16) for t in _tensors(*[(1, 4, 1500, 64)] * 3, seed=5))

    def run(asa):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = asa(*leaves, grid=(3, 20, 25))
        (out.float() ** 2).sum().backward()
        return out.detach(), [t.grad for t in leaves], asa.last_stats

    eager_out, eager_grads, eager_stats = run(AdaptiveBlockSparseAttention(config))
    out, grads, stats = run(torch.compile(AdaptiveBlockSparseAttention(config), fullgraph=True))
    assert stats == eager_stats and 0 < stats["sparsity"] < 1  # same sampled positions -> same mask
    torch.testing.assert_close(out, eager_out, atol=2e-2, rtol=2e-2)  # inductor may round the pooling differently
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


def _sampling_run(model, inputs, timesteps, cfg_calls=1):
    """One sampling run's transformer calls: `cfg_calls` per timestep (2 = CFG's cond and uncond), in order."""
    outs = []
    for t in timesteps:
        for _ in range(cfg_calls):
            outs.append(model(**inputs, timestep=torch.tensor([t], device=DEVICE))[0])
    return outs


def test_whole_transformer_with_asa_compiles_to_one_graph_per_call_and_matches_eager():
    """compile_scope="transformer": the whole forward is one fullgraph graph, the ASA step tracker (a forward
    pre-hook) still sees every timestep, and outputs and stats equal eager over a sampling run."""
    from blade.speed import speed_up_pipeline

    model, handle, inputs = _tiny_wan_with_asa()
    timesteps = [900.0, 700.0, 500.0, 300.0]
    with torch.no_grad():
        reference = _sampling_run(model, inputs, timesteps, cfg_calls=2)
        reference_stats, reference_step = handle.stats(), handle.step
        handle.reset()
        counter = CompileCounterWithBackend("aot_eager")
        pipe = type("P", (), {"transformer": model, "vae": None})()
        report = speed_up_pipeline(pipe, compile_transformer=True, compile_scope="transformer",
                                   compile_kwargs={"backend": counter})  # fmt: skip
        outs = _sampling_run(model, inputs, timesteps, cfg_calls=2)
    assert report["transformer_compile_scope"] == "transformer" and "transformer_compile_errors" not in report
    assert counter.frame_count == 2  # one graph before any stats exist, one after; none per step
    assert handle.step == reference_step == 3
    for got, expected in zip(outs, reference):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert handle.stats() == reference_stats and reference_stats["calls"] == 8 * 2  # 2 layers x 8 calls


def test_cuda_graphs_refuse_a_seeded_prober_before_compiling():
    """A seeded prober's private generator cannot be captured by a CUDA graph (the first GPU run failed inside the
    capture): the call is refused with what to do, before anything compiles, and runs once ASA is switched off."""
    from blade.speed import speed_up_pipeline

    model, handle, inputs = _tiny_wan_with_asa(prober_seed=0)
    pipe = type("P", (), {"transformer": model, "vae": None})()
    speed_up_pipeline(pipe, compile_transformer=True, compile_scope="transformer",
                      compile_kwargs={"mode": "reduce-overhead"})  # fmt: skip
    with torch.no_grad(), pytest.raises(ValueError, match="seed=None"):
        model(**inputs, timestep=torch.tensor([500.0], device=DEVICE))


@pytest.mark.gpu
def test_whole_transformer_under_cuda_graphs_matches_eager():
    """mode="reduce-overhead" (CUDA graphs, inductor) over a CFG sampling run: each call's output and the ASA stats
    survive the next replay (the wrapper copies them out of the graph's memory pool). The prober draws from the
    global RNG (a seeded one is refused): reseeded before each run, replays draw the eager run's positions."""
    from blade.speed import speed_up_pipeline

    model, handle, inputs = _tiny_wan_with_asa(prober_seed=None)
    timesteps = [900.0, 700.0, 500.0, 300.0]
    with torch.no_grad():
        torch.manual_seed(0)
        reference = _sampling_run(model, inputs, timesteps, cfg_calls=2)
        reference_stats = handle.stats()
        pipe = type("P", (), {"transformer": model, "vae": None})()
        report = speed_up_pipeline(pipe, compile_transformer=True, compile_scope="transformer",
                                   compile_kwargs={"mode": "reduce-overhead"})  # fmt: skip
        for _ in range(3):  # warm-up, recording, replays
            handle.reset()
            torch.manual_seed(0)
            outs = _sampling_run(model, inputs, timesteps, cfg_calls=2)
    assert report["transformer_compile_scope"] == "transformer", report.get("transformer_compile_errors")
    for got, expected in zip(outs, reference):  # every output still readable after all later replays
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    assert handle.stats() == reference_stats
