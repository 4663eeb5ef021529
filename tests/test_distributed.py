"""Compressed layers across ranks: torch.distributed on the CPU (gloo), two spawned processes."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsegemm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
                          nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsegemm.sparsify(model, dtype=torch.float32, min_features=8)
    int8 = nn.Sequential(nn.Linear(16, 16))
    sparsegemm.sparsify(int8, quantize="int8", min_features=8)
    model.append(int8[0])
    return model


def _outputs_agree(model: nn.Module, x: torch.Tensor) -> tuple:
    """(whether both ranks' outputs are equal, rank 0's output) under DDP without its buffer broadcast
    (torch recommends that for rank-local buffers): its start-up broadcast copies the parameters alone."""
    y = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)(x).detach()
    ys = [torch.empty_like(y) for _ in range(2)]
    dist.all_gather(ys, y)
    return torch.equal(ys[0], ys[1]), ys[0]


def _ranks(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100)
        x = torch.randn(4, 8, 4, 4)
        # Each rank prunes its own random weights: other 2:4 patterns. Without the broadcast, rank 1
        # runs rank 0's values under its own metadata.
        equal_without, _ = _outputs_agree(_model(seed=rank), x)
        model = _model(seed=rank)
        model(x)  # caches derived from the rank's own metadata, which the broadcast must replace
        sparsegemm.broadcast_compressed(model, src=0)
        equal_with, y = _outputs_agree(model, x)
        # FSDP2 shards the values (DTensors): a rank's file would hold its shard, under wrong ties.
        from torch.distributed.fsdp import fully_shard

        try:
            sparsegemm.save(fully_shard(_model(seed=0)), f"{result_file}.{rank}.safetensors")
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
        # load into a DDP-wrapped model would replace parameters its all-reduce keeps: refused
        try:
            sparsegemm.load(f"{result_file}.absent", nn.parallel.DistributedDataParallel(_model(seed=0)))
            load_refusal = None
        except ValueError as exc:
            load_refusal = str(exc)
        if rank == 0:
            reference = _model(seed=0)
            state = model.state_dict()
            torch.save({"without": equal_without, "with": equal_with, "as_rank0": torch.equal(y, reference(x)),
                        "state": all(torch.equal(v, state[k]) for k, v in reference.state_dict().items()),
                        "sharded save": refusal, "wrapped load": load_refusal}, result_file)
    finally:
        dist.destroy_process_group()


def test_broadcast_compressed_gives_every_rank_the_source_ranks_layers(tmp_path):
    result = tmp_path / "result.pt"
    mp.spawn(_ranks, args=(str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    got = torch.load(result)
    refusal, load_refusal = got.pop("sharded save"), got.pop("wrapped load")
    assert load_refusal is not None and "load into the bare model, then wrap it" in load_refusal
    assert got == {"without": False, "with": True, "as_rank0": True, "state": True}
    assert refusal is not None and "'0.values' is a DTensor, a shard of a sharded model (FSDP2)" in refusal
