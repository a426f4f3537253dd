"""Tiny random transformers models shared by the adapter tests, as fixtures.

Every model has 2 blocks per stack and a hidden size of 32, is built with
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
    """Return a config of ``family`` with ``hidden_size`` units, 4 attention heads and 2 blocks per stack.

    Encoder-decoder families (t5, bart) get 2 encoder and 2 decoder blocks.
    """
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
    elif family == "electra":
        # An embedding width below the hidden size makes ELECTRA add its embeddings_project layer.
        config = transformers.ElectraConfig(**common, embedding_size=16)
    elif family == "deberta-v2":
        # Relative attention in both directions, so the disentangled score terms run.
        config = transformers.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                              position_buckets=8, pooler_hidden_size=hidden_size)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, num_key_value_heads=2, pad_token_id=0)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=2, pad_token_id=0)
    elif family == "gemma3_text":
        # One sliding-window block with a window shorter than the test inputs, and one global block.
        config = transformers.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=hidden_size // 4,
                                               pad_token_id=0, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"])
    elif family == "t5":
        # d_kv=16 makes the attention width (heads * d_kv = 64) differ from the hidden size. The gated
        # feed-forward has two input projections (wi_0, wi_1).
        config = transformers.T5Config(d_model=hidden_size, d_kv=16, d_ff=37, num_layers=2, num_decoder_layers=2,
                                       num_heads=4, vocab_size=VOCAB_SIZE, feed_forward_proj="gated-gelu",
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    elif family == "bart":
        config = transformers.BartConfig(d_model=hidden_size, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                         decoder_ffn_dim=37, vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                                         pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
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


# The end-of-sequence id of the families whose classifier reads the hidden state at the last <eos>.
EOS_TOKEN_IDS = {"t5": 1, "bart": 2}


def classifier_input_ids(family: str, batch_size: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Return ``(batch_size, length)`` token ids that ``family``'s sequence classifier accepts.

    The ids are drawn from ``[3, VOCAB_SIZE)``, clear of every family's padding, bos and eos ids.
    T5 and BART classify from the last ``<eos>``, and every row needs the same number of them, so
    for those families the last position of each row is ``<eos>``.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB_SIZE, (batch_size, length), generator=generator)
    if family in EOS_TOKEN_IDS:
        ids[:, -1] = EOS_TOKEN_IDS[family]
    return ids


def dropout_free_changes(family: str) -> dict[str, float]:
    """Return the config changes that set every dropout probability of ``family``'s tiny config to 0.

    Dropout probabilities are the float fields whose name contains ``dropout`` or ``pdrop``
    (``hidden_dropout_prob``, GPT-2's ``resid_pdrop``, T5's ``dropout_rate``, ...). BERT-like models
    use ``hidden_dropout_prob`` for a ``classifier_dropout`` left at ``None``, so that one is 0 too.
    """
    config = tiny_config(family).to_dict()
    return {key: 0.0 for key, value in config.items()
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float)}


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


@pytest.fixture
def tiny_inputs():
    """The function ``tiny_inputs(family, batch_size=2, length=7, seed=1)``, see ``classifier_input_ids``."""
    return classifier_input_ids


@pytest.fixture
def no_dropout():
    """The function ``no_dropout(family)`` returning config changes that turn off every dropout."""
    return dropout_free_changes
