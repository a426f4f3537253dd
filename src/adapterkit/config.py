"""Adapter configurations: frozen dataclasses, presets by name and a JSON round trip.

Every config validates itself in ``__post_init__`` and reports all invalid fields in one
``ValueError``, so a user fixes a config in one pass instead of one field per run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "identity")
INIT_WEIGHTS = ("bert", "houlsby", "near_identity", "zero_up")
SCALING_MODES = ("learned", "channel")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class BottleneckConfig:
    """Configuration of a bottleneck adapter: ``h + W_up f(W_down x + b_down) + b_up``.

    The adapter sits at the output of a transformer sublayer (attention or feed-forward), before
    the residual connection of the block is added.

    Attributes:
        mh_adapter: Insert an adapter after the attention sublayer of every block.
        output_adapter: Insert an adapter after the feed-forward sublayer of every block.
        reduction_factor: Bottleneck width is ``hidden_size // reduction_factor``.
        bottleneck_size: Explicit bottleneck width; overrides ``reduction_factor`` when set.
        non_linearity: Activation between the down and up projections, one of ``NON_LINEARITIES``.
        parallel: Read the sublayer input and add the result to the sublayer output (He et al., 2022),
            instead of transforming the sublayer output in series.
        scaling: Factor on the up-projection output: a number, ``"learned"`` (one scalar parameter)
            or ``"channel"`` (one parameter per hidden unit).
        residual_before_ln: Take the adapter's residual from the sublayer output before the
            block's layer norm (True) or after it (False).
        original_ln_before: Add the block residual and apply the block's own layer norm before the
            adapter (Pfeiffer et al., 2021). The block applies them again after the adapter.
        ln_before: A new layer norm on the adapter input.
        ln_after: A new layer norm on the adapter output.
        init_weights: ``"bert"``: projections from normal(0, 0.02), biases zero. ``"houlsby"``:
            truncated normal(0, 0.01) on both projections (Houlsby et al., 2019, section 3.6).
            ``"near_identity"``: like ``"houlsby"`` with the up-projection drawn 1000 times smaller, so
            a new adapter changes block outputs by well under 1e-4. ``"zero_up"``: the
            up-projection starts at zero, so a new adapter is exactly the identity.
        dropout: Dropout probability on the adapter output.
        leave_out: Indices of blocks that get no adapter.
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    parallel: bool = False
    scaling: float | str = 1.0
    residual_before_ln: bool = True
    original_ln_before: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    dropout: float = 0.0
    leave_out: tuple[int, ...] = field(default_factory=tuple)

    architecture: ClassVar[str] = "bottleneck"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples, so configs stay hashable and comparable.
        if isinstance(self.leave_out, list):
            object.__setattr__(self, "leave_out", tuple(self.leave_out))
        if isinstance(self.non_linearity, str):
            object.__setattr__(self, "non_linearity", self.non_linearity.lower())
        problems = self._find_problems()
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))

    def _find_problems(self) -> list[str]:
        problems = []
        for name in ("mh_adapter", "output_adapter", "parallel", "residual_before_ln",
                     "original_ln_before", "ln_before", "ln_after"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                problems.append(f"{name}={value!r}: expected True or False")
        if not (self.mh_adapter or self.output_adapter):
            problems.append("mh_adapter=False and output_adapter=False: the adapter would be inserted "
                            "nowhere; set at least one of them to True")
        if not _is_number(self.reduction_factor) or self.reduction_factor <= 0:
            problems.append(f"reduction_factor={self.reduction_factor!r}: expected a number > 0")
        if self.bottleneck_size is not None and (not _is_int(self.bottleneck_size) or self.bottleneck_size < 1):
            problems.append(f"bottleneck_size={self.bottleneck_size!r}: expected an integer >= 1, "
                            "or None to use reduction_factor")
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(f"non_linearity={self.non_linearity!r}: expected one of {', '.join(NON_LINEARITIES)}")
        if not (_is_number(self.scaling) or self.scaling in SCALING_MODES):
            problems.append(f"scaling={self.scaling!r}: expected a number, 'learned' or 'channel'")
        if self.init_weights not in INIT_WEIGHTS:
            problems.append(f"init_weights={self.init_weights!r}: expected one of {', '.join(INIT_WEIGHTS)}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r}: expected a probability in [0, 1)")
        if not isinstance(self.leave_out, tuple) or not all(_is_int(i) and i >= 0 for i in self.leave_out):
            problems.append(f"leave_out={self.leave_out!r}: expected a list of block indices >= 0")
        return problems

    def bottleneck_width(self, hidden_size: int) -> int:
        """Return the bottleneck width for a model of ``hidden_size``.

        Raises:
            ValueError: If ``reduction_factor`` leaves less than one unit.
        """
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        width = int(hidden_size // self.reduction_factor)
        if width < 1:
            raise ValueError(
                f"reduction_factor={self.reduction_factor} leaves a bottleneck of {width} units for "
                f"hidden_size={hidden_size}; use a reduction_factor <= {hidden_size} or set bottleneck_size"
            )
        return width

    def replace(self, **changes: Any) -> BottleneckConfig:
        """Return a copy with ``changes`` applied, validated like a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data, with its ``architecture`` tag."""
        data = dataclasses.asdict(self)
        data["leave_out"] = list(self.leave_out)
        return {"architecture": self.architecture, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BottleneckConfig:
        """Build a config from ``to_dict`` output.

        Raises:
            ValueError: If a key is not a field of this config, naming the unknown keys.
        """
        data = dict(data)
        architecture = data.pop("architecture", cls.architecture)
        if architecture != cls.architecture:
            raise ValueError(f"architecture={architecture!r}: expected {cls.architecture!r} for {cls.__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> BottleneckConfig:
        """Build a config from a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


AdapterConfig = BottleneckConfig

PRESETS: dict[str, BottleneckConfig] = {
    # Houlsby et al. (2019): adapters after attention and after the feed-forward block.
    "houlsby": BottleneckConfig(mh_adapter=True, output_adapter=True, reduction_factor=16,
                                non_linearity="swish", original_ln_before=False),
    # Pfeiffer et al. (2021): one adapter after the feed-forward block, behind the block's layer norm.
    "pfeiffer": BottleneckConfig(mh_adapter=False, output_adapter=True, reduction_factor=16,
                                 non_linearity="relu", original_ln_before=True),
    # He et al. (2022): a scaled parallel adapter beside the feed-forward block.
    "parallel": BottleneckConfig(mh_adapter=False, output_adapter=True, reduction_factor=2,
                                 non_linearity="relu", parallel=True, scaling=4.0,
                                 original_ln_before=False, init_weights="zero_up"),
}


def resolve_config(config: BottleneckConfig | str | dict[str, Any] | None) -> BottleneckConfig:
    """Turn a config object, preset name, dict or ``None`` (the ``"pfeiffer"`` preset) into a config.

    Raises:
        ValueError: For an unknown preset name, listing the known ones.
        TypeError: For any other type.
    """
    if config is None:
        return PRESETS["pfeiffer"]
    if isinstance(config, BottleneckConfig):
        return config
    if isinstance(config, str):
        preset = PRESETS.get(config.lower())
        if preset is None:
            raise ValueError(f"Unknown adapter preset {config!r}; known presets: {', '.join(PRESETS)}. "
                             "Pass one of them or an AdapterConfig(...)")
        return preset
    if isinstance(config, dict):
        return BottleneckConfig.from_dict(config)
    raise TypeError(f"config must be an AdapterConfig, a preset name or a dict, not {type(config).__name__}")
