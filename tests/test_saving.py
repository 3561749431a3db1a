"""save_pretrained(model, path): all or nothing, so a failed save never destroys the checkpoint already there."""

import contextlib
import os
import shutil
import subprocess
import sys

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


class Killed(BaseException):
    """The process is killed: nothing after this point runs, not even cleanup."""


@contextlib.contextmanager
def _killed_after_renames(count):
    """Kill an overwrite after `count` of its renames: from then on every rename and removal raises Killed (what a
    SIGKILL leaves on disk, without a subprocess)."""
    done = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst):
        if len(done) >= count:
            raise Killed
        done.append((src, dst))
        return real_replace(src, dst)

    def rmtree(*args, **kwargs):
        if len(done) >= count:
            raise Killed
        return real_rmtree(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            yield
    assert len(done) == count


def _logits(path):
    return AutoModelForCausalLM.from_pretrained(path)(_ids()).logits


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "out")


def test_killed_between_the_renames_the_next_save_first_puts_the_previous_checkpoint_back(tmp_path):
    good = _sparse()
    optimum_permllm.save_pretrained(good, tmp_path / "out")
    with _killed_after_renames(1):
        optimum_permllm.save_pretrained(_sparse(seed=1), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out").exists()  # the previous checkpoint is aside, the new one not in place
    assert any(".out.old-" in name for name in _leftovers(tmp_path))
    with pytest.raises(FileExistsError, match="overwrite=True"):  # as if the killed save had never started
        optimum_permllm.save_pretrained(_sparse(seed=2), tmp_path / "out")
    assert torch.equal(_logits(tmp_path / "out"), good(_ids()).logits)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("renames", [1, 2])
def test_saves_after_a_killed_overwrite_succeed_and_clear_what_it_left(renames, tmp_path):
    """Killed between the renames (1) or before the backup was removed (2); the same process id saves again
    (as after a restart in a container), twice, which collided with the leftover backup (Errno 39)."""
    optimum_permllm.save_pretrained(_sparse(), tmp_path / "out")
    with _killed_after_renames(renames):
        optimum_permllm.save_pretrained(_sparse(seed=1), tmp_path / "out", overwrite=True)
    for seed in (2, 3):
        model = _sparse(seed=seed)
        optimum_permllm.save_pretrained(model, tmp_path / "out", overwrite=True)
        assert torch.equal(_logits(tmp_path / "out"), model(_ids()).logits)
        assert _leftovers(tmp_path) == []


def test_a_second_rename_that_fails_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    good = _sparse()
    optimum_permllm.save_pretrained(good, tmp_path / "out")
    real_replace = os.replace

    def replace(src, dst):
        if ".partial-" in str(src):
            raise OSError("Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        optimum_permllm.save_pretrained(_sparse(seed=1), tmp_path / "out", overwrite=True)
    monkeypatch.undo()
    assert torch.equal(_logits(tmp_path / "out"), good(_ids()).logits)
    assert _leftovers(tmp_path) == []


def test_a_temporary_folder_left_by_a_process_that_is_gone_is_removed_by_the_next_save(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (tmp_path / f".out.partial-{pid}-abc123").mkdir()
    (tmp_path / f".out.partial-{pid}-abc123" / "config.json").write_text("{}")
    (tmp_path / f".out.partial-{os.getppid()}-def456").mkdir()  # a live process's save: left alone
    optimum_permllm.save_pretrained(_sparse(), tmp_path / "out")
    assert _leftovers(tmp_path) == [f".out.partial-{os.getppid()}-def456"]
