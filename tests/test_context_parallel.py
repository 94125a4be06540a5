"""Ulysses context parallelism with ASA (blade.parallel over diffusers' enable_parallelism), proven on CPU: two
processes over gloo give what one process gives, sparse ASA (seeded prober, global tokens, dense warm-up step) and
keep-all ASA alike."""

import pytest
import torch

from blade.attention import AdaptiveBlockSparseAttention, ASAConfig
from blade.models.wan import apply_asa
from blade.testing.tiny import tiny_wan_transformer

KEEP_ALL = ASAConfig(block_size=16, threshold=1.0, min_keep=1.0, max_keep=1.0, pool_size=None)
SPARSE = ASAConfig(block_size=16, threshold=0.5, min_keep=0.2, max_keep=0.5, pool_size=8, seed=3)
HEADS = 4  # 2 per process
TIMESTEPS = (500.0, 400.0)  # with dense_steps=1: a dense warm-up forward, then a sparse one


def _model():
    return tiny_wan_transformer(num_attention_heads=HEADS)


def _inputs():
    """Batch 2, token grid 3 x 5 x 6 = 90 (even: 45 a process; 6 blocks of 16), 6 text tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 10, 12, generator=g)
    e = torch.randn(2, 6, 32, generator=g)
    return x, e


def _run(model, t):
    x, e = _inputs()
    with torch.no_grad():
        return model(x, torch.full((2,), t), e, return_dict=False)[0]


def _worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from blade.parallel import enable_context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Sparse ASA applied before diffusers' parallelism; a dense warm-up forward, then a sparse one.
        model = _model()
        handle = apply_asa(model, SPARSE, dense_steps=1)
        enable_context_parallel(model)
        seen = []
        model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        outs = [_run(model, t) for t in TIMESTEPS]
        kept = handle.asa.stats()["kept_blocks"]

        # Keep-all ASA applied after.
        model = _model()
        enable_context_parallel(model)
        apply_asa(model, KEEP_ALL)
        keep_all = _run(model, TIMESTEPS[0])
        results[rank] = {"sparse": outs, "kept": kept, "keep_all": keep_all, "block_tokens": seen}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    init = tmp_path_factory.mktemp("cp") / "init"
    mp.spawn(_worker, args=(2, str(init), results), nprocs=2, join=True)
    return dict(results)


def test_sequence_is_split_across_the_two_processes(two_process_results):
    for rank in range(2):
        assert two_process_results[rank]["block_tokens"] == [45, 45]  # 90 tokens, half a process, both forwards


def test_sparse_asa_under_ulysses_equals_one_process(two_process_results):
    model = _model()
    handle = apply_asa(model, SPARSE, dense_steps=1)
    reference = [_run(model, t) for t in TIMESTEPS]
    assert handle.stats()["sparsity"] > 0.2  # the sparse forward really skipped blocks
    for rank in range(2):
        for out, ref in zip(two_process_results[rank]["sparse"], reference):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Each process attends its own 2 heads with the masks one process picks for them: the kept blocks add up.
    kept = sum(two_process_results[rank]["kept"] for rank in range(2))
    assert kept == handle.stats()["kept_blocks"]


def test_keep_all_asa_under_ulysses_equals_stock_one_process(two_process_results):
    reference = _run(_model(), TIMESTEPS[0])  # stock diffusers attention, no ASA
    for rank in range(2):
        torch.testing.assert_close(two_process_results[rank]["keep_all"], reference, rtol=1e-5, atol=1e-5)


def test_prober_draws_for_a_slice_of_heads_what_it_draws_for_all():
    config = ASAConfig(block_size=16, threshold=0.5, min_keep=0.2, max_keep=0.5, seed=11)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 4, 96, 8, generator=g).unbind(0)
    full = AdaptiveBlockSparseAttention(config).estimate_mask(q, k)
    for first in (0, 2):
        part = AdaptiveBlockSparseAttention(config).estimate_mask(
            q[:, first : first + 2], k[:, first : first + 2], heads=(first, 4)
        )
        assert torch.equal(part.dense(), full.dense()[:, first : first + 2])
    with pytest.raises(ValueError, match="do not lie"):
        AdaptiveBlockSparseAttention(config).estimate_mask(q[:, :2], k[:, :2], heads=(3, 4))
