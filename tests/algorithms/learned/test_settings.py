"""LearningSettings: the one place the learned permutation's defaults live, and how they resolve per scope."""

import inspect

import pytest

from optimum_permllm import PermLLMConfig
from optimum_permllm.algorithms.learned import LearningSettings
from optimum_permllm.algorithms.learned.settings import USER_SETTINGS


def test_the_config_defaults_are_the_settings_defaults():
    signature = inspect.signature(PermLLMConfig.__init__).parameters
    defaults = LearningSettings()
    for name in USER_SETTINGS:
        assert signature[name].default == getattr(defaults, name)
    learning = PermLLMConfig(permutation="learned").to_plan().learning
    assert learning == LearningSettings()


def test_the_model_scope_resolves_to_the_papers_budget():
    wanda = LearningSettings(scope="model").resolved("wanda")
    assert (wanda.optimizer, wanda.lr, wanda.weight_decay, wanda.steps, wanda.batch_size) == ("adamw", 1e-3, 0.1, 400, 16)
    assert (wanda.tau, wanda.sinkhorn_iters, wanda.block_size, wanda.init_bias) == ((1.0, 0.1), 5, 64, 0.0)
    assert LearningSettings(scope="model").resolved("ria").lr == 5e-3


def test_the_layer_scope_resolves_to_its_short_search_and_given_values_win():
    layer = LearningSettings().resolved("ria")
    assert (layer.optimizer, layer.lr, layer.steps, layer.init_bias) == ("normalized", 0.02, 20, 1.0)
    given = LearningSettings(scope="model", steps=0, lr=0.5, optimizer="normalized", tau=(2.0, 1.0)).resolved("wanda")
    assert (given.steps, given.lr, given.optimizer, given.tau) == (0, 0.5, "normalized", (2.0, 1.0))
    assert LearningSettings(learner="ot").resolved("wanda").sinkhorn_iters == 20


@pytest.mark.parametrize("settings, message", [
    (dict(learner="genetic"), "learner='genetic' is not supported"),
    (dict(scope="block"), "scope='block' is not supported"),
    (dict(optimizer="sgd"), "optimizer='sgd' is not supported"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(learned_layers=0), "learned_layers must be a positive integer"),
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(heldout_share=1.0), "heldout_share must be in"),
])
def test_bad_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        LearningSettings(**settings)


def test_learned_layers_and_zero_steps_go_through_the_config():
    config = PermLLMConfig(permutation="learned", scope="model", learned_layers=6, steps=0)
    assert config.to_plan().learning.learned_layers == 6 and config.to_plan().learning.steps == 0
    with pytest.raises(ValueError, match="learned_layers must be a positive integer"):
        PermLLMConfig(permutation="learned", learned_layers=0)
    assert PermLLMConfig.from_dict(config.to_dict()).learned_layers == 6
