"""Layer-parallel learning across two gloo ranks gives exactly the single-process permutations."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimum_permllm import PermLLMConfig
from optimum_permllm.pipeline.distributed import is_distributed, map_across_ranks
from optimum_permllm.pipeline.layerwise import sparsify_layerwise

from ..conftest import tiny_model

pytestmark = pytest.mark.distributed


def _config():
    return PermLLMConfig(permutation="learned", steps=2, block_size=32)


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _perms(model):
    return {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("input_perm")}


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        owners = map_across_ranks(lambda item: (item, dist.get_rank()), list(range(5)))
        model = tiny_model("llama")
        sparsify_layerwise(model, _ids(), _config().to_plan(), progress=False)
        torch.save({"owners": owners, "perms": _perms(model), "distributed": is_distributed()},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_learn_the_same_permutations_as_one_process(tmp_path, one_thread):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = tiny_model("llama")
    sparsify_layerwise(single, _ids(), _config().to_plan(), progress=False)
    expected = _perms(single)
    assert expected and not is_distributed()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["distributed"]
        assert result["owners"] == [(i, i % 2) for i in range(5)]  # round robin, gathered in order
        assert result["perms"].keys() == expected.keys()
        assert all(torch.equal(result["perms"][k], expected[k]) for k in expected)
