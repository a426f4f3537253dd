"""Add one adapter with the same hyper-parameters in adapterkit, AdapterHub `adapters` or PEFT.

Each ``prepare_*`` function takes a plain transformers model, adds adapter ``ADAPTER_NAME`` for one
method, makes it the only trainable part besides the classification head, and returns a
``PreparedModel``. A library is imported only in the process that measures it, because imports count
towards the process's peak memory.

Shared hyper-parameters (the table below) follow adapterkit's presets, which match `adapters` 1.3.0's
defaults except MAM, whose prefix MLP is 800 wide in `adapters` and 512 here in all libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

ADAPTER_NAME = "bench"

METHODS = ("pfeiffer", "houlsby", "parallel", "lora", "prefix_tuning", "compacter", "ia3", "mam")
LIBRARIES = ("adapterkit", "adapters", "peft")
# The methods of METHODS that each library has. PEFT has no bottleneck adapters, so no Compacter or MAM either.
LIBRARY_METHODS = {
    "adapterkit": METHODS,
    "adapters": METHODS,
    "peft": ("lora", "prefix_tuning", "ia3"),
}
# Methods whose update folds into the base weights, so inference is also timed after merging.
MERGEABLE_METHODS = ("lora", "ia3")

# The same adapter hyper-parameters in every library.
HYPER_PARAMETERS = {
    "pfeiffer": {"reduction_factor": 16, "non_linearity": "relu", "placement": "after the feed-forward block"},
    "houlsby": {"reduction_factor": 16, "non_linearity": "swish", "placement": "after attention and feed-forward"},
    "parallel": {"reduction_factor": 2, "non_linearity": "relu", "scaling": 4.0,
                 "placement": "beside the feed-forward block"},
    "lora": {"r": 8, "alpha": 8, "dropout": 0.0, "targets": "query, value"},
    "prefix_tuning": {"prefix_length": 30, "bottleneck_size": 512, "non_linearity": "tanh"},
    "compacter": {"reduction_factor": 32, "non_linearity": "gelu", "phm_dim": 4,
                  "placement": "after attention and feed-forward"},
    "ia3": {"targets": "key, value, feed-forward"},
    "mam": {"prefix_length": 30, "bottleneck_size": 512, "parallel_reduction_factor": 2, "parallel_scaling": 4.0},
}

# Module names for PEFT's target_modules, per model family. PEFT matches a string as a regular
# expression over the whole module name. BERT's feed-forward output projection is `layer.N.output.dense`;
# a plain "output.dense" would also match the attention output `attention.output.dense`.
_PEFT_LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
_PEFT_IA3_TARGETS = {
    "bert": (r".*\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)", r".*\.layer\.\d+\.output\.dense"),
    "llama": (r".*\.(k_proj|v_proj|down_proj)", r".*\.down_proj"),
}
_PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass
class PreparedModel:
    """A model ready for the timing loops.

    Attributes:
        model: The module to call with the batch; it returns an output with ``loss`` and ``logits``.
        save: Writes what a user of the library would ship into a folder.
        merge: Folds the adapter into the base weights, or ``None`` when the method cannot be merged.
        notes: Facts about this setup that the report should show.
        other_saves: Other ways the library can save the adapter, by name, measured for information.
    """

    model: nn.Module
    save: Callable[[Path], None]
    merge: Callable[[], None] | None = None
    notes: list[str] = field(default_factory=list)
    other_saves: dict[str, Callable[[Path], None]] = field(default_factory=dict)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return each parameter with ``requires_grad`` once, also when modules share it."""
    seen: set[int] = set()
    found = []
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            found.append(parameter)
    return found


def count_head_parameters(model: nn.Module) -> int:
    """Return how many trainable parameters belong to a classification head (``classifier`` or ``score``)."""
    seen: set[int] = set()
    total = 0
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if parameter.requires_grad and ("classifier" in parts or "score" in parts) and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


# -- adapterkit ------------------------------------------------------------------------------------


def _adapterkit_config(method: str):
    import adapterkit

    presets = {"pfeiffer": "pfeiffer", "houlsby": "houlsby", "parallel": "parallel", "lora": "lora",
               "prefix_tuning": "prefix_tuning", "compacter": "compacter", "ia3": "ia3", "mam": "mam"}
    config = adapterkit.PRESETS[presets[method]]
    _check_adapterkit_preset(method, config)
    return config


def _check_adapterkit_preset(method: str, config) -> None:
    """Raise ``RuntimeError`` if an adapterkit preset drifted from ``HYPER_PARAMETERS``."""
    expected = HYPER_PARAMETERS[method]
    members = list(getattr(config, "methods", [config]))
    actual: dict[str, object] = {}
    for member in members:
        for key in ("reduction_factor", "non_linearity", "scaling", "r", "alpha", "dropout", "prefix_length",
                    "bottleneck_size", "phm_dim"):
            if hasattr(member, key):
                actual.setdefault(key, getattr(member, key))
    if method == "mam":
        actual["parallel_reduction_factor"] = members[1].reduction_factor
        actual["parallel_scaling"] = members[1].scaling
    wrong = {key: (actual[key], value) for key, value in expected.items() if key in actual and actual[key] != value}
    if wrong:
        raise RuntimeError(f"adapterkit preset {method!r} no longer matches the benchmark's hyper-parameters "
                           f"(preset value, expected value): {wrong}. Update HYPER_PARAMETERS or the preset")


def prepare_adapterkit(model: nn.Module, method: str, family: str, task: str) -> PreparedModel:
    """Add and train one adapterkit adapter; its trainable head is adapterkit's per-adapter copy of the head."""
    import adapterkit

    model = adapterkit.init(model)
    model.add_adapter(ADAPTER_NAME, _adapterkit_config(method))
    model.train_adapter(ADAPTER_NAME)
    merge = (lambda: model.merge_adapter(ADAPTER_NAME)) if method in MERGEABLE_METHODS else None
    return PreparedModel(model, save=lambda folder: model.save_adapter(folder, ADAPTER_NAME), merge=merge,
                         notes=["merge: model.merge_adapter(name)"] if merge else [])


# -- adapters (AdapterHub) ---------------------------------------------------------------------------


def _adapters_config(method: str):
    import adapters

    h = HYPER_PARAMETERS
    if method == "pfeiffer":
        return adapters.SeqBnConfig(reduction_factor=h["pfeiffer"]["reduction_factor"],
                                    non_linearity=h["pfeiffer"]["non_linearity"])
    if method == "houlsby":
        return adapters.DoubleSeqBnConfig(reduction_factor=h["houlsby"]["reduction_factor"],
                                          non_linearity=h["houlsby"]["non_linearity"])
    if method == "parallel":
        return adapters.ParBnConfig(reduction_factor=h["parallel"]["reduction_factor"],
                                    non_linearity=h["parallel"]["non_linearity"], scaling=h["parallel"]["scaling"])
    if method == "lora":
        return adapters.LoRAConfig(r=h["lora"]["r"], alpha=h["lora"]["alpha"], dropout=h["lora"]["dropout"],
                                   attn_matrices=["q", "v"])
    if method == "prefix_tuning":
        return adapters.PrefixTuningConfig(prefix_length=h["prefix_tuning"]["prefix_length"],
                                           bottleneck_size=h["prefix_tuning"]["bottleneck_size"],
                                           non_linearity=h["prefix_tuning"]["non_linearity"])
    if method == "compacter":
        return adapters.CompacterConfig(reduction_factor=h["compacter"]["reduction_factor"],
                                        non_linearity=h["compacter"]["non_linearity"],
                                        phm_dim=h["compacter"]["phm_dim"])
    if method == "ia3":
        return adapters.IA3Config()
    if method == "mam":
        prefix = adapters.PrefixTuningConfig(prefix_length=h["mam"]["prefix_length"],
                                             bottleneck_size=h["mam"]["bottleneck_size"])
        parallel = adapters.ParBnConfig(reduction_factor=h["mam"]["parallel_reduction_factor"],
                                        scaling=h["mam"]["parallel_scaling"])
        return adapters.MAMConfig(prefix, parallel)
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}")


def prepare_adapters(model: nn.Module, method: str, family: str, task: str) -> PreparedModel:
    """Add and train one AdapterHub adapter on the plain transformers model (``adapters.init``).

    ``train_adapter`` freezes only the base model, so the model's own classification head stays trainable.
    """
    import adapters

    adapters.init(model)
    model.add_adapter(ADAPTER_NAME, config=_adapters_config(method))
    model.train_adapter(ADAPTER_NAME)
    merge = (lambda: model.merge_adapter(ADAPTER_NAME)) if method in MERGEABLE_METHODS else None
    # save_adapter also writes the model's head by default. For a causal LM that is the whole output
    # embedding matrix, so the size without the head is recorded too.
    return PreparedModel(model, save=lambda folder: model.save_adapter(str(folder), ADAPTER_NAME), merge=merge,
                         notes=["merge: model.merge_adapter(name)"] if merge else [],
                         other_saves={"without_head": lambda folder: model.save_adapter(str(folder), ADAPTER_NAME,
                                                                                        with_head=False)})


# -- PEFT ----------------------------------------------------------------------------------------------


def _peft_config(method: str, family: str, task: str):
    import peft

    task_type = _PEFT_TASK_TYPES[task]
    h = HYPER_PARAMETERS
    if method == "lora":
        return peft.LoraConfig(task_type=task_type, r=h["lora"]["r"], lora_alpha=h["lora"]["alpha"],
                               lora_dropout=h["lora"]["dropout"], target_modules=_PEFT_LORA_TARGETS[family])
    if method == "ia3":
        targets, feed_forward = _PEFT_IA3_TARGETS[family]
        return peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feed_forward)
    if method == "prefix_tuning":
        # prefix_projection=True gives the MLP re-parameterisation that adapterkit and `adapters` use.
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=h["prefix_tuning"]["prefix_length"],
                                       prefix_projection=True,
                                       encoder_hidden_size=h["prefix_tuning"]["bottleneck_size"])
    raise ValueError(f"PEFT has no {method!r} in this benchmark; it has {', '.join(LIBRARY_METHODS['peft'])}")


def prepare_peft(model: nn.Module, method: str, family: str, task: str) -> PreparedModel:
    """Wrap the model with ``peft.get_peft_model``.

    For sequence classification PEFT adds the head to ``modules_to_save``: it trains a copy of it.
    """
    import peft

    peft_model = peft.get_peft_model(model, _peft_config(method, family, task))
    merge = peft_model.merge_adapter if method in MERGEABLE_METHODS else None
    return PreparedModel(peft_model, save=lambda folder: peft_model.save_pretrained(str(folder)), merge=merge,
                         notes=["merge: peft_model.merge_adapter()"] if merge else [])


PREPARE = {"adapterkit": prepare_adapterkit, "adapters": prepare_adapters, "peft": prepare_peft}


# -- floors: no adapter -------------------------------------------------------------------------------


def prepare_frozen(model: nn.Module) -> PreparedModel:
    """Freeze every weight and make the token embeddings require grad.

    A training step then costs the frozen model's forward plus the backward down to its input
    embeddings, with no weight gradient and no optimizer work: the least any adapter method can cost.
    """
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()

    def require_grad(module: nn.Module, args: tuple, output):
        if output.is_floating_point() and not output.requires_grad and not _inference_mode():
            output.requires_grad_(True)

    embeddings.register_forward_hook(require_grad)
    return PreparedModel(model, save=lambda folder: None, notes=["no checkpoint: nothing is trained"])


def _inference_mode() -> bool:
    import torch

    return torch.is_inference_mode_enabled() or not torch.is_grad_enabled()


def prepare_full_finetune(model: nn.Module) -> PreparedModel:
    """Train every weight of the model; the checkpoint is the whole model (``save_pretrained``, safetensors)."""
    model.requires_grad_(True)
    return PreparedModel(model, save=lambda folder: model.save_pretrained(str(folder)))


# -- per-sample routing ---------------------------------------------------------------------------------

ROUTING_ADAPTERS = 8


def prepare_routing(model: nn.Module) -> tuple[PreparedModel, Callable[[dict], dict]]:
    """Add ``ROUTING_ADAPTERS`` adapterkit LoRA adapters and activate one of them.

    Returns:
        The model with one active adapter (the reference: one adapter for the whole batch), and a
        function that returns the batch with ``adapter_names`` added, so that row ``i`` runs through
        adapter ``i % ROUTING_ADAPTERS``.
    """
    import adapterkit

    model = adapterkit.init(model)
    for index in range(ROUTING_ADAPTERS):
        model.add_adapter(f"route{index}", _adapterkit_config("lora"))
    # train_adapter freezes the base model and activates route0 alone.
    model.train_adapter("route0")

    def route_per_sample(batch: dict) -> dict:
        rows = next(iter(batch.values())).shape[0]
        return {**batch, "adapter_names": [f"route{i % ROUTING_ADAPTERS}" for i in range(rows)]}

    return PreparedModel(model, save=lambda folder: None), route_per_sample
