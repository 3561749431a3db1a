"""Two gloo ranks give the single-process permutations: layer-parallel learning (`layer` scope) exactly, and
the data-parallel joint training (`model` scope) with the same global batch. One spawn serves both tests."""

import os
import socket
from dataclasses import replace

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


def _joint_plan():
    plan = PermLLMConfig(permutation="learned", scope="model", steps=6, block_size=32).to_plan()
    return replace(plan, learning=replace(plan.learning, batch_size=4, micro_batch=1))


def _ids(batch=2):
    return torch.randint(0, 128, (batch, 16), generator=torch.Generator().manual_seed(0))


def _perms(model):
    return {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("input_perm")}


def _prune_layer_scope():
    model = tiny_model("llama")
    sparsify_layerwise(model, _ids(), _config().to_plan(), progress=False)
    return _perms(model)


def _prune_joint():
    """Prune a tiny model with the `model` scope; returns its permutations and the joint training's info."""
    model, infos = tiny_model("llama"), []
    sparsify_layerwise(model, _ids(batch=9), _joint_plan(), progress=False,
                       callback=lambda index, info: infos.append(info.get("joint")))
    return _perms(model), infos[0]


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        owners = map_across_ranks(lambda item: (item, dist.get_rank()), list(range(5)))
        perms = _prune_layer_scope()
        joint_perms, joint_info = _prune_joint()
        torch.save({"owners": owners, "perms": perms, "distributed": is_distributed(), "joint_perms": joint_perms,
                    "joint_info": joint_info}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks computed."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


def test_two_ranks_learn_the_same_permutations_as_one_process(ranks, one_thread):
    expected = _prune_layer_scope()
    assert expected and not is_distributed()
    for result in ranks:
        assert result["distributed"]
        assert result["owners"] == [(i, i % 2) for i in range(5)]  # round robin, gathered in order
        assert result["perms"].keys() == expected.keys()
        assert all(torch.equal(result["perms"][k], expected[k]) for k in expected)


def test_two_ranks_train_jointly_as_one_process_with_the_same_global_batch(ranks, one_thread):
    perms, info = _prune_joint()
    assert info["best_step"] > 0  # learned permutations, not the heuristic fallback
    for result in ranks:
        assert result["joint_perms"].keys() == perms.keys()
        assert all(torch.equal(result["joint_perms"][k], perms[k]) for k in perms)
        assert result["joint_info"]["best_step"] == info["best_step"]
        # each rank runs half of every batch and of the held-out windows; the sums agree to rounding
        for key in ("train_losses", "heldout_history"):
            assert result["joint_info"][key] == pytest.approx(info[key], rel=1e-5)
