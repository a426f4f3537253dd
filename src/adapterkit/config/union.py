"""``ConfigUnion``: several methods in one adapter, trained, saved and activated together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import MethodConfig, register_config


@register_config
@dataclass(frozen=True, init=False)
class ConfigUnion(MethodConfig):
    """Several method configs that form one adapter, applied in the order given.

    Example: ``ConfigUnion(PrefixTuningConfig(prefix_length=30), BottleneckConfig(parallel=True))``.

    Attributes:
        configs: The member configs; a nested union is flattened into its members.
    """

    configs: tuple[MethodConfig, ...] = ()

    architecture: ClassVar[str] = "union"
    tuple_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *configs: MethodConfig):
        flat: list[Any] = []
        for config in configs:
            flat.extend(config.methods if isinstance(config, ConfigUnion) else [config])
        object.__setattr__(self, "configs", tuple(flat))
        object.__setattr__(self, "leave_out", ())
        self.__post_init__()

    def _find_problems(self) -> list[str]:
        problems = []
        if not self.configs:
            problems.append("configs=(): a ConfigUnion needs at least one member config")
        for index, config in enumerate(self.configs):
            if not isinstance(config, MethodConfig):
                problems.append(f"member {index} is a {type(config).__name__}, not an adapter config")
        single = [config.architecture for config in self.configs
                  if isinstance(config, MethodConfig) and config.architecture in ("prefix_tuning", "invertible")]
        repeated = sorted({name for name in single if single.count(name) > 1})
        if repeated:
            problems.append(f"{', '.join(repeated)} appears more than once: a model has one prefix and one "
                            "embedding slot per adapter; merge those members into one config")
        return problems

    @property
    def methods(self) -> tuple[MethodConfig, ...]:
        return self.configs

    def replace(self, **changes: Any) -> ConfigUnion:
        """Return a copy whose members all get ``changes`` where they have those fields (e.g. ``leave_out``)."""
        return ConfigUnion(*(member.replace(**{key: value for key, value in changes.items()
                                               if hasattr(member, key)}) for member in self.configs))

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "configs": [config.to_dict() for config in self.configs]}

    @classmethod
    def _from_fields(cls, data: dict[str, Any], unknown_keys: str) -> ConfigUnion:
        members = data.get("configs")
        if not isinstance(members, list):
            raise ValueError(f"A union config needs a list under 'configs', not {members!r}")
        return cls(*(MethodConfig.from_dict(member, unknown_keys=unknown_keys) for member in members))
