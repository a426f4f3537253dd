"""The worked example in docs/architectures.md runs as written and adapts an unlisted family."""

import re
from pathlib import Path

import pytest
import torch

from adapterkit.architectures import ARCHITECTURES

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture
def documented_example():
    """Run the page's Python blocks in one namespace, then unregister BioGPT again."""
    namespace = {}
    try:
        for block in python_blocks(DOC.read_text(encoding="utf-8")):
            exec(compile(block, str(DOC), "exec"), namespace)
        yield namespace
    finally:
        ARCHITECTURES.pop("biogpt", None)


def test_doc_has_runnable_blocks():
    assert len(python_blocks(DOC.read_text(encoding="utf-8"))) == 2


def test_doc_example_adapts_biogpt(documented_example):
    model = documented_example["model"]
    assert set(model.adapter_names) == {"houlsby", "parallel", "lora", "ia3", "prefix_tuning", "mam", "compacter"}
    assert documented_example["logits"].shape == (1, 4, 99)


def test_doc_example_trains_only_lora(documented_example):
    model = documented_example["model"]
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    for parameter in model._adapterkit.modules_of("lora").parameters():
        torch.nn.init.normal_(parameter, std=0.1)

    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()

    lora_ids = {id(p) for p in model._adapterkit.modules_of("lora")["methods"].parameters()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert lora_ids and lora_ids <= with_grad
    assert with_grad <= {id(p) for p in model._adapterkit.modules_of("lora").parameters()}


@pytest.mark.parametrize("name", ["houlsby", "parallel", "ia3", "prefix_tuning", "mam", "compacter"])
def test_doc_example_methods_change_output(documented_example, name):
    model = documented_example["model"]
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.set_active_adapters(None)
    with torch.no_grad():
        bare = model(input_ids=input_ids).logits
        for parameter in model._adapterkit.modules_of(name)["methods"].parameters():
            torch.nn.init.normal_(parameter, mean=0.1, std=0.2)
        model.set_active_adapters(name)
        adapted = model(input_ids=input_ids).logits

    assert (adapted - bare).abs().max() > 1e-3


def test_doc_example_invertible_raises(documented_example):
    model = documented_example["model"]

    with pytest.raises(ValueError, match="no embeddings module"):
        model.add_adapter("language", "invertible")
