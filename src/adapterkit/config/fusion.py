"""AdapterFusion layers: attention over the outputs of several bottleneck adapters (Pfeiffer et al., 2021).

The field names and the two presets are those of AdapterHub ``adapters`` 1.3.0
(``configuration/adapter_fusion_config.py``), so ``to_dict`` writes the ``config`` entry of its
``adapter_fusion_config.json`` and ``from_dict`` reads it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from .base import check_bools, check_probability

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionConfig:
    """Configuration of the AdapterFusion layer at each bottleneck site.

    At a site with hidden state ``h`` and fused adapter outputs ``v_1 ... v_n`` (each adapter's
    change to the residual), the layer computes
    ``residual + sum_j softmax_j(query(h) . key(v_j) / T) * value(v_j)``.

    Attributes:
        key: Project the adapter outputs with a learned ``key`` matrix before the dot product.
        query: Project the hidden state with a learned ``query`` matrix.
        value: Project the adapter outputs with a learned ``value`` matrix (no bias).
        query_before_ln: Take the query from the sublayer output before the block's layer norm
            instead of from the input of the last fused adapter.
        regularization: Pull the ``value`` matrix towards the identity during training: every
            backward pass adds the gradient of ``0.01 * ||value.weight - I||^2``.
        residual_before: Add the residual to every adapter output before the ``value`` projection,
            instead of adding it to the attention output.
        temperature: Start the softmax temperature ``T`` at 50 and lower it by 0.05 per training
            forward of the model, down to 1. With False, ``T`` is 1.
        value_before_softmax: Apply ``value`` to each adapter output before the weighted sum
            (True) or to the weighted sum (False).
        value_initialized: Start ``value`` at the identity (off-diagonal entries 1e-6) instead of
            at random.
        dropout_prob: Dropout on the attention scores. ``None`` takes the model config's
            ``attention_probs_dropout_prob``, or 0 when it has none.
    """

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        problems = check_bools(self, ("key", "query", "value", "query_before_ln", "regularization",
                                      "residual_before", "temperature", "value_before_softmax",
                                      "value_initialized"))
        if self.dropout_prob is not None:
            problems += check_probability("dropout_prob", self.dropout_prob)
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))

    def replace(self, **changes: Any) -> FusionConfig:
        """Return a copy with ``changes`` applied, validated like a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data with the field names of ``adapters`` 1.3.0."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, unknown_keys: str = "raise") -> FusionConfig:
        """Build a config from ``to_dict`` output or an ``adapters`` fusion config.

        Args:
            data: The fields. ``adapters`` writes ``value_initialized`` as a bool, or as a string
                in old versions, where any non-empty string means True.
            unknown_keys: ``"raise"`` rejects keys that are not fields, ``"warn"`` logs and drops
                them, ``"ignore"`` drops them.

        Raises:
            ValueError: If a key is unknown (with ``unknown_keys="raise"``) or a value is invalid.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and unknown_keys == "raise":
            raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        if unknown and unknown_keys == "warn":
            logger.warning("Ignoring %s keys %s, which this adapterkit version does not know", cls.__name__, unknown)
        fields = {key: value for key, value in data.items() if key in known}
        if isinstance(fields.get("value_initialized"), str):
            fields["value_initialized"] = bool(fields["value_initialized"])
        return cls(**fields)


FUSION_PRESETS: dict[str, FusionConfig] = {
    # Pfeiffer et al. (2021): query, key and value projections, the value regularised towards the identity.
    "dynamic": FusionConfig(),
    # The same attention without a value projection: the output is a weighted sum of the adapter outputs.
    "static": FusionConfig(value=False, regularization=False, value_initialized=False),
}


def resolve_fusion_config(config: FusionConfig | str | dict[str, Any] | None) -> FusionConfig:
    """Turn a ``FusionConfig``, a preset name (``"dynamic"``, ``"static"``), a dict or ``None`` into a config.

    ``None`` is the ``"dynamic"`` preset.

    Raises:
        ValueError: For an unknown preset name or invalid fields.
        TypeError: For any other type.
    """
    if config is None:
        return FUSION_PRESETS["dynamic"]
    if isinstance(config, FusionConfig):
        return config
    if isinstance(config, str):
        preset = FUSION_PRESETS.get(config.lower())
        if preset is None:
            raise ValueError(f"Unknown fusion preset {config!r}; known presets: {', '.join(FUSION_PRESETS)}. "
                             "Pass one of them or a FusionConfig")
        return preset
    if isinstance(config, dict):
        return FusionConfig.from_dict(config)
    raise TypeError(f"config must be a FusionConfig, a preset name or a dict, not {type(config).__name__}")
