"""The shared machinery of adapter configurations: validation, dict and JSON round trips.

Every method config is a frozen dataclass that validates itself in ``__post_init__`` and reports all
invalid fields in one ``ValueError``, so a user fixes a config in one pass instead of one field per run.
Its ``architecture`` tag names the method in saved configs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

# The projections inside a block that LoRA and (IA)^3 can target, named by their role.
ROLES = ("query", "key", "value", "attention_output", "ff_in", "ff_out")

# Method configs by their ``architecture`` tag, filled by ``register_config``.
CONFIG_CLASSES: dict[str, type[MethodConfig]] = {}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bools(config: Any, names: tuple[str, ...]) -> list[str]:
    return [f"{name}={getattr(config, name)!r}: expected True or False"
            for name in names if not isinstance(getattr(config, name), bool)]


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> list[str]:
    if value in choices:
        return []
    return [f"{name}={value!r}: expected one of {', '.join(choices)}"]


def check_probability(name: str, value: Any) -> list[str]:
    if is_number(value) and 0.0 <= value < 1.0:
        return []
    return [f"{name}={value!r}: expected a probability in [0, 1)"]


def check_roles(name: str, value: Any) -> list[str]:
    if not isinstance(value, tuple) or not value:
        return [f"{name}={value!r}: expected a non-empty list of roles from {', '.join(ROLES)}"]
    unknown = [role for role in value if role not in ROLES]
    if unknown:
        return [f"{name} has unknown roles {unknown}: expected roles from {', '.join(ROLES)}"]
    return []


def register_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``config_from_dict`` build ``cls`` for its ``architecture`` tag."""
    CONFIG_CLASSES[cls.architecture] = cls
    return cls


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    Attributes:
        leave_out: Indices of blocks that get no module of this method. In encoder-decoder models the
            decoder blocks are numbered after the encoder blocks.
    """

    leave_out: tuple[int, ...] = field(default_factory=tuple)

    architecture: ClassVar[str] = ""
    # Fields holding lists in JSON and tuples here, so configs stay hashable and comparable.
    tuple_fields: ClassVar[tuple[str, ...]] = ("leave_out",)

    def __post_init__(self) -> None:
        for name in self.tuple_fields:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = self._find_problems()
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))

    def _find_problems(self) -> list[str]:
        if not isinstance(self.leave_out, tuple) or not all(is_int(i) and i >= 0 for i in self.leave_out):
            return [f"leave_out={self.leave_out!r}: expected a list of block indices >= 0"]
        return []

    @property
    def methods(self) -> tuple[MethodConfig, ...]:
        """The single-method configs this config combines: itself, or a union's members."""
        return (self,)

    def replace(self, **changes: Any) -> MethodConfig:
        """Return a copy with ``changes`` applied, validated like a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready data, with its ``architecture`` tag."""
        data = dataclasses.asdict(self)
        for name in self.tuple_fields:
            data[name] = list(getattr(self, name))
        return {"architecture": self.architecture, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, unknown_keys: str = "raise") -> MethodConfig:
        """Build a config from ``to_dict`` output.

        Args:
            data: The dict; its ``architecture`` tag must match ``cls`` unless ``cls`` is ``MethodConfig``.
            unknown_keys: ``"raise"`` rejects keys that are not fields, ``"warn"`` logs and drops them
                (for configs written by a newer adapterkit).

        Raises:
            ValueError: If a key is unknown (with ``unknown_keys="raise"``) or the tag names another method.
        """
        data = dict(data)
        architecture = data.pop("architecture", cls.architecture)
        target = CONFIG_CLASSES.get(architecture) if cls is MethodConfig else cls
        if target is None:
            raise ValueError(f"architecture={architecture!r}: expected one of {', '.join(sorted(CONFIG_CLASSES))}")
        if architecture != target.architecture:
            raise ValueError(f"architecture={architecture!r}: expected {target.architecture!r} for {target.__name__}")
        return target._from_fields(data, unknown_keys)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], unknown_keys: str) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and unknown_keys == "raise":
            raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        if unknown:
            logger.warning("Ignoring %s keys %s, which this adapterkit version does not know; a newer "
                           "adapterkit may have written them", cls.__name__, unknown)
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MethodConfig:
        """Build a config from a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def config_from_dict(data: dict[str, Any], *, unknown_keys: str = "raise") -> MethodConfig:
    """Build the config that ``data["architecture"]`` names (a bottleneck adapter when it is missing)."""
    data = dict(data)
    data.setdefault("architecture", "bottleneck")
    return MethodConfig.from_dict(data, unknown_keys=unknown_keys)
