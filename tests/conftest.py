"""Tiny random transformers models shared by the adapter tests, as fixtures.

Every model has 2 blocks and a hidden size of 32, is built with
``AutoModelForSequenceClassification.from_config`` under a fixed seed and is returned in eval mode,
so two calls with the same arguments give the same weights.

Test modules reach these builders through the fixtures only: ``import conftest`` could pick up
another folder's conftest module, because pytest loads each ``conftest.py`` outside a package under
the one module name ``conftest``.
"""

from __future__ import annotations

import pytest
import torch
import transformers

FAMILIES = ("bert", "roberta", "distilbert", "mpnet", "gpt2", "llama")
PRESET_NAMES = ("houlsby", "pfeiffer", "parallel")
VOCAB_SIZE = 99

# Matrices this small gain nothing from intra-op threads, and on a machine with few cores that
# other processes also use, idle-waiting threads made each forward pass up to 100 times slower.
torch.set_num_threads(1)


def tiny_config(family: str, num_labels: int = 3, hidden_size: int = 32) -> transformers.PretrainedConfig:
    """Return a 2-block config of ``family`` with ``hidden_size`` units and 4 attention heads."""
    common = dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=VOCAB_SIZE, max_position_embeddings=64)
    if family == "bert":
        config = transformers.BertConfig(**common)
    elif family == "roberta":
        config = transformers.RobertaConfig(**common, pad_token_id=1)
    elif family == "mpnet":
        config = transformers.MPNetConfig(**common)
    elif family == "distilbert":
        config = transformers.DistilBertConfig(dim=hidden_size, n_layers=2, n_heads=4, hidden_dim=37,
                                               vocab_size=VOCAB_SIZE, max_position_embeddings=64)
    elif family == "gpt2":
        # GPT-2 classifies from the last non-padding token, so it needs a pad id inside the vocabulary.
        config = transformers.GPT2Config(n_embd=hidden_size, n_layer=2, n_head=4, vocab_size=VOCAB_SIZE,
                                         n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    elif family == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common, pad_token_id=0)
    else:
        raise ValueError(f"tiny_config has no recipe for family {family!r}")
    config.num_labels = num_labels
    return config


def build_tiny_model(family: str, num_labels: int = 3, hidden_size: int = 32, seed: int = 0,
                     **config_changes) -> torch.nn.Module:
    """Return a tiny random sequence classifier of ``family`` in eval mode, with weights fixed by ``seed``.

    ``config_changes`` set attributes of the config before the weights are drawn, for example
    ``initializer_range``.
    """
    torch.manual_seed(seed)
    config = tiny_config(family, num_labels=num_labels, hidden_size=hidden_size)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def random_input_ids(batch_size: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Return token ids in ``[2, VOCAB_SIZE)``, so no id is a padding id of any family above."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB_SIZE, (batch_size, length), generator=generator)


@pytest.fixture
def tiny_model():
    """The builder ``tiny_model(family, num_labels=3, hidden_size=32, seed=0, **config_changes)``."""
    return build_tiny_model


@pytest.fixture
def input_ids() -> torch.Tensor:
    return random_input_ids()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each family adapterkit describes, one per test run. ``pytest.mark.parametrize("family", ...)`` overrides it."""
    return request.param


@pytest.fixture(params=PRESET_NAMES)
def preset(request) -> str:
    return request.param
