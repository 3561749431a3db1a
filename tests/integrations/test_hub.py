"""Model card and Hub upload, without network: the huggingface_hub commit call is replaced by a recorder."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load as load_safetensors

from optimum_permllm import PermLLMConfig, PermLLMSparsifier
from optimum_permllm.integrations import hub

from ..conftest import tiny_model
from ..data.tiny_text import tiny_tokenizer
from .test_save_load import _sparsify_with_random_permutations

BASE = "HuggingFaceTB/SmolLM2-135M"
RESULTS = {"perplexity": {"dense": 20.25, "sparse": 31.5}, "zero_shot": {"piqa": 0.61, "boolq": 0.55},
           "evaluation": "Offline Wikipedia evaluation split."}


@pytest.fixture
def sparse_model():
    return _sparsify_with_random_permutations(tiny_model("llama", vocab=len(tiny_tokenizer())))


@pytest.fixture
def hub_calls(monkeypatch):
    """Record create_repo / create_commit (with the bytes of each uploaded file) instead of calling the Hub."""
    calls = {"create_repo": [], "create_commit": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["create_commit"].append({"repo_id": repo_id, "files": files, "message": commit_message, **kwargs})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_card_metadata_and_content(sparse_model):
    card = hub.create_model_card(sparse_model, base_model=BASE, results=RESULTS, repo_id="me/tiny-24", license="apache-2.0")
    parsed = ModelCard(str(card))  # renders and parses back as the Hub would
    assert parsed.data.base_model == BASE and parsed.data.license == "apache-2.0"
    assert parsed.data.library_name == "transformers"
    assert {"permllm", "sparse", "2-4-sparsity", "magnitude"} <= set(parsed.data.tags)
    text = parsed.text
    assert "import optimum_permllm" in text and 'from_pretrained("me/tiny-24")' in text
    assert "| perplexity | 20.25 | 31.50 |" in text and "| piqa | 0.6100 |" in text
    assert "Offline Wikipedia evaluation split." in text
    assert "14 linear layers (2:4); 14 keep an input permutation" in text


def test_card_describes_permutation_and_calibration_settings(sparse_model):
    sparse_model.config.quantization_config = PermLLMConfig(metric="wanda", permutation="learned", learner="ot",
                                                            scope="model", num_samples=16, seq_len=256, seed=3)
    text = hub.create_model_card(sparse_model, base_model=BASE, license="mit").text
    assert "learned (learner=ot, scope=model, block_size=64, steps=default" in text and "learned_layers" not in text
    assert "16 sequences of 256 tokens (seed 3)" in text and "offline Wikipedia" in text
    assert "No evaluation results" in text


def test_card_names_the_learned_layers_and_a_budget_of_zero_steps(sparse_model):
    sparse_model.config.quantization_config = PermLLMConfig(permutation="learned", scope="model", steps=0,
                                                            learned_layers=6)
    text = hub.create_model_card(sparse_model, base_model=BASE, license="mit").text
    assert "scope=model, block_size=64, steps=0, lr=default, learned_layers=6)" in text


def test_licence_is_carried_from_the_base_model_card(sparse_model, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    card = hub.create_model_card(sparse_model, base_model=BASE, base_model_card=tmp_path)
    assert card.data.license == "apache-2.0" and "carried over from the base model" in card.text


def test_unreadable_base_licence_becomes_other_with_a_note(sparse_model, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "model_info", offline)
    card = hub.create_model_card(sparse_model, base_model=BASE)
    assert card.data.license == "other" and "could not be read" in card.text


def test_template_with_missing_fields_is_a_clear_error(sparse_model, tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n{{ sparsity }} {{ training_budget }} {{ hardware }}\n")
    with pytest.raises(ValueError, match="not filled: hardware, training_budget"):
        hub.create_model_card(sparse_model, base_model=BASE, license="mit", template=template)


def test_the_template_ships_as_package_data():
    import tomllib
    package = Path(hub.__file__).parents[1]
    globs = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p for pattern in globs["optimum_permllm"] for p in package.glob(pattern)]
    assert hub.template_path() in shipped and not hub.template_path().is_symlink()


def test_a_dense_model_and_a_local_base_path_are_refused(sparse_model, tmp_path):
    with pytest.raises(ValueError, match="no permllm quantization config"):
        hub.create_model_card(tiny_model("llama"), base_model=BASE)
    with pytest.raises(ValueError, match="Hub id of the dense model"):
        hub.create_model_card(sparse_model, base_model=str(tmp_path))


def test_unknown_result_keys_are_refused(sparse_model):
    with pytest.raises(ValueError, match="Unknown result keys"):
        hub.create_model_card(sparse_model, base_model=BASE, license="mit", results={"ppl": 3.0})


def test_push_uploads_checkpoint_tokenizer_and_card_in_one_commit(sparse_model, hub_calls):
    hub.push_to_hub(sparse_model, tiny_tokenizer(), "me/tiny-24", token="hf_test", results=RESULTS,
                    base_model=BASE, license="apache-2.0")
    assert [repo for repo, _ in hub_calls["create_repo"]] == ["me/tiny-24"]
    (commit,) = hub_calls["create_commit"]
    files = commit["files"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert commit["message"] == "Upload 2:4 sparse model (magnitude, permutation=none)"
    config = json.loads(files["config.json"])["quantization_config"]
    assert config["quant_method"] == "permllm" and config["sparsity"] == "2:4"
    tensors = load_safetensors(files["model.safetensors"])
    layer = sparse_model.model.layers[0].mlp.down_proj
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"], layer.weight)
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight_mask"], layer.weight_mask)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE and "permllm" in card.data.tags and "| piqa | 0.6100 |" in card.text


def test_push_commit_message_and_privacy_are_passed(sparse_model, hub_calls):
    hub.push_to_hub(sparse_model, None, "me/tiny", token="hf_test", private=True, commit_message="v2",
                    base_model=BASE, license="mit")
    assert hub_calls["create_repo"][0][1]["private"] is True
    assert hub_calls["create_commit"][0]["message"] == "v2"
    assert "tokenizer.json" not in hub_calls["create_commit"][0]["files"]


@pytest.mark.parametrize("repo_id", ["bad repo", "a/b/c", "x--y", ""])
def test_invalid_repo_id_fails_before_anything_is_written(sparse_model, hub_calls, monkeypatch, repo_id):
    monkeypatch.setattr(type(sparse_model), "save_pretrained", lambda *a, **k: pytest.fail("wrote files"))
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        hub.push_to_hub(sparse_model, None, repo_id, token="hf_test", base_model=BASE, license="mit")
    assert hub_calls == {"create_repo": [], "create_commit": []}


def test_missing_token_fails_before_anything_is_written(sparse_model, hub_calls, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(type(sparse_model), "save_pretrained", lambda *a, **k: pytest.fail("wrote files"))
    with pytest.raises(ValueError, match="huggingface-cli login. .*or pass token="):
        hub.push_to_hub(sparse_model, None, "me/tiny", base_model=BASE, license="mit")
    assert hub_calls == {"create_repo": [], "create_commit": []}


def test_a_model_with_lora_adapters_is_refused(sparse_model, hub_calls):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(sparse_model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        hub.push_to_hub(peft_model, None, "me/tiny", token="hf_test", base_model=BASE, license="mit")
    assert hub_calls["create_commit"] == []


@pytest.fixture
def no_remote_card(monkeypatch):
    """transformers' push looks for an existing card in the repo; answer that there is none."""
    from huggingface_hub.errors import EntryNotFoundError

    def missing(*args, **kwargs):
        raise EntryNotFoundError("no README.md in the repo")

    monkeypatch.setattr(ModelCard, "load", missing)


def _check_transformers_upload(commit, model):
    files = commit["files"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["quant_method"] == "permllm"
    tensors = load_safetensors(files["model.safetensors"])
    names = model.config.quantization_config.converted_modules
    assert all(f"{name}.{key}" in tensors for name in names for key in ("weight", "weight_mask", "input_perm"))
    layer = model.model.layers[1].self_attn.q_proj
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], layer.weight)


def test_transformers_model_push_to_hub_uploads_the_packed_checkpoint(sparse_model, hub_calls, no_remote_card):
    sparse_model.push_to_hub("me/tiny", token="hf_test")
    (commit,) = hub_calls["create_commit"]
    assert commit["repo_id"] == "me/tiny"
    _check_transformers_upload(commit, sparse_model)


def test_transformers_save_pretrained_push_to_hub_uploads_the_packed_checkpoint(sparse_model, hub_calls,
                                                                               no_remote_card, tmp_path):
    sparse_model.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id="me/tiny", token="hf_test")
    (commit,) = hub_calls["create_commit"]
    _check_transformers_upload(commit, sparse_model)


def test_card_for_a_model_sparsified_in_memory():
    model = tiny_model("llama")
    PermLLMSparsifier(PermLLMConfig(metric="magnitude", permutation="none")).sparsify_model(model)
    text = hub.create_model_card(model, base_model=BASE, license="mit").text
    assert "14 linear layers (2:4); 0 keep an input permutation" in text
