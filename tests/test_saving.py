"""save_pretrained(model, path): all or nothing, so a failed save never destroys the checkpoint already there."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_permllm
from optimum_permllm import PermLLMConfig, PermLLMSparsifier

from .conftest import tiny_model


def _sparse(seed=0):
    model = tiny_model("llama", seed=seed)
    return PermLLMSparsifier(PermLLMConfig(metric="magnitude", permutation="none")).sparsify_model(model)


def _ids():
    return torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))


def test_saves_a_loadable_checkpoint_and_no_temporary_folder(tmp_path):
    model = _sparse()
    assert optimum_permllm.save_pretrained(model, tmp_path / "out") == tmp_path / "out"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(_ids()).logits, model(_ids()).logits)


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path):
    model = _sparse()
    optimum_permllm.save_pretrained(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        optimum_permllm.save_pretrained(model, tmp_path / "out")
    other = _sparse(seed=1)
    optimum_permllm.save_pretrained(other, tmp_path / "out", overwrite=True)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(_ids()).logits, other(_ids()).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(shard, tmp_path, monkeypatch):
    """A disk that fills up after the config (and some shards) were written: the old checkpoint still loads."""
    from transformers import modeling_utils

    good = _sparse()
    optimum_permllm.save_pretrained(good, tmp_path / "out")
    written = []

    def full_disk(tensors, filename, *args, **kwargs):
        written.append(filename)
        if len(written) == 2 or shard is None:
            raise OSError("No space left on device")
        return original(tensors, filename, *args, **kwargs)

    original = modeling_utils.safe_save_file
    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    kwargs = {"max_shard_size": shard} if shard else {}
    with pytest.raises(OSError, match="No space left"):
        optimum_permllm.save_pretrained(_sparse(seed=1), tmp_path / "out", overwrite=True, **kwargs)
    monkeypatch.undo()
    assert len(written) == (1 if shard is None else 2)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(_ids()).logits, good(_ids()).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
