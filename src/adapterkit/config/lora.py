"""LoRA and (IA)^3: methods that change the frozen linear projections of a block."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from .base import (ROLES, MethodConfig, check_bools, check_choice, check_probability, check_roles, is_int, is_number,
                   register_config)

LORA_INITS = ("lora", "gaussian", "bert")
IA3_INITS = ("ones", "bert")
FF_OUT_SIDES = ("input", "output")

# "[<blocks>.]<role>[.<number>]", where <blocks> is a comma-separated list of indices and inclusive ranges.
_PATTERN_KEY = re.compile(r"(?:(?P<blocks>\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\.)?"
                          r"(?P<role>[A-Za-z_]+)(?:\.(?P<number>\d+))?")
PATTERN_KEY_FORMS = ("'<role>'", "'<blocks>.<role>'", "'<role>.<number>'", "'<blocks>.<role>.<number>'")


class PatternKey(NamedTuple):
    """A parsed ``rank_pattern`` or ``alpha_pattern`` key (see ``LoRAConfig``).

    Attributes:
        text: The key as written.
        blocks: The inclusive block ranges ``(first, last)`` it names, or None for every block.
        role: The projection role.
        number: The projection of that role within a block, or None for every one.
    """

    text: str
    blocks: tuple[tuple[int, int], ...] | None
    role: str
    number: int | None

    @property
    def specificity(self) -> tuple[bool, bool]:
        """The precedence of the key: naming blocks outranks naming a number, which outranks naming neither."""
        return self.blocks is not None, self.number is not None

    def matches(self, block: int, role: str, number: int) -> bool:
        """Return whether the key selects projection ``number`` of ``role`` in block ``block``."""
        return (role == self.role and (self.number is None or number == self.number)
                and (self.blocks is None or any(first <= block <= last for first, last in self.blocks)))


def parse_pattern_key(key: Any) -> PatternKey:
    """Parse a ``rank_pattern`` or ``alpha_pattern`` key such as ``"value"``, ``"0-2,5.ff_in"`` or ``"ff_in.1"``.

    Raises:
        ValueError: If ``key`` is not a string of one of the forms in ``PATTERN_KEY_FORMS``, names an
            unknown role or has a range whose start exceeds its end.
    """
    match = _PATTERN_KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise ValueError(f"key {key!r} is invalid: expected one of the forms {', '.join(PATTERN_KEY_FORMS)}, "
                         "for example 'value', '3.value', '0-5,7.ff_in' or 'ff_in.1'")
    role = match["role"]
    if role not in ROLES:
        raise ValueError(f"key {key!r} names the unknown role {role!r}: valid roles are {', '.join(ROLES)}")
    blocks = None
    if match["blocks"] is not None:
        blocks = []
        for item in match["blocks"].split(","):
            start, _, stop = item.partition("-")
            first, last = int(start), int(stop or start)
            if first > last:
                raise ValueError(f"key {key!r} has the block range {item!r}, whose start exceeds its end. Write "
                                 f"{last}-{first}")
            blocks.append((first, last))
        blocks = tuple(blocks)
    number = None if match["number"] is None else int(match["number"])
    return PatternKey(key, blocks, role, number)


def _overlap(first: PatternKey, second: PatternKey) -> bool:
    """Return whether two keys of equal specificity select a common projection."""
    if first.role != second.role or first.number != second.number:
        return False
    if first.blocks is None or second.blocks is None:
        return True
    return any(a_first <= b_last and b_first <= a_last
               for a_first, a_last in first.blocks for b_first, b_last in second.blocks)


def _check_pattern(name: str, pattern: Any, targets: Any, leave_out: Any, check_value: Any) -> list[str]:
    """Return the problems of one pattern field: invalid keys and values, and keys that can select nothing."""
    if not isinstance(pattern, dict):
        return [f"{name}={pattern!r}: expected a dict from keys such as 'value' or '3.value' to values"]
    problems = []
    parsed = []
    for key, value in pattern.items():
        problems += [f"{name}[{key!r}]={value!r}: {message}" for message in check_value(value)]
        try:
            entry = parse_pattern_key(key)
        except ValueError as error:
            problems.append(f"{name} {error}")
            continue
        if isinstance(targets, tuple) and entry.role not in targets:
            problems.append(f"{name} key {key!r} names the role {entry.role!r}, which is not in targets "
                            f"{list(targets)}, so it selects no module. Add the role to targets or remove the key")
        elif isinstance(leave_out, tuple) and entry.blocks is not None and _only_left_out(entry.blocks, leave_out):
            problems.append(f"{name} key {key!r} names only blocks in leave_out {list(leave_out)}, so it selects no "
                            "module. Remove the key or those blocks from leave_out")
        parsed.append(entry)
    for index, first in enumerate(parsed):
        for second in parsed[index + 1:]:
            if first.specificity == second.specificity and _overlap(first, second):
                problems.append(f"{name} keys {first.text!r} and {second.text!r} select the same projections with "
                                "equal precedence. Merge them or make their blocks disjoint")
    return problems


def _only_left_out(blocks: tuple[tuple[int, int], ...], leave_out: tuple[int, ...]) -> bool:
    left_out = set(leave_out)
    return all(last - first < len(left_out) and left_out.issuperset(range(first, last + 1)) for first, last in blocks)


def _check_rank(value: Any) -> list[str]:
    return [] if is_int(value) and value >= 1 else ["expected an integer rank >= 1"]


def _check_alpha(value: Any) -> list[str]:
    return [] if is_number(value) and value > 0 else ["expected a number > 0"]


def _lookup(pattern: Mapping[str, Any], block: int, role: str, number: int, default: Any) -> Any:
    """Return the value of the most specific key of ``pattern`` that selects the projection, else ``default``."""
    best = None
    for key in pattern:
        entry = parse_pattern_key(key)
        if entry.matches(block, role, number) and (best is None or entry.specificity > best.specificity):
            best = entry
    return default if best is None else pattern[best.text]


@register_config
@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Low-rank adaptation (Hu et al., 2021): each targeted projection ``W`` computes ``W x + s B A x``.

    ``rank_pattern`` and ``alpha_pattern`` override ``r`` and ``alpha`` for some projections. A key
    selects projections by role, optionally restricted to blocks and to one projection of that role:

    - ``"value"``: the value projection of every block.
    - ``"3.value"``, ``"0-2,5.value"``: the value projection of the listed blocks. Indices and
      inclusive ranges are separated by commas, and blocks are numbered as in ``leave_out``.
    - ``"ff_in.1"``, ``"3.ff_in.1"``: only the projection with that number among the block's
      projections of the role, in the order of the architecture description. On Llama ``ff_in.0``
      is ``gate_proj`` and ``ff_in.1`` is ``up_proj``. In T5 and BART decoder blocks ``query.0`` is
      self-attention and ``query.1`` cross-attention.

    Where several keys select a projection, one that names blocks wins over one that does not, and
    then one that names a number wins. Two keys with equal precedence that select a common projection
    are rejected. Each key's role must be in ``targets``, and keys naming blocks or numbers that the
    model lacks raise ``ValueError`` when the adapter is added.

    Attributes:
        r: Rank of ``A`` (r x in) and ``B`` (out x r).
        alpha: Scaling numerator: the update is multiplied by ``s = alpha / r``, where both may come
            from the patterns.
        dropout: Dropout probability on the input of ``A``.
        targets: Roles of the projections to adapt: ``query``, ``key``, ``value``,
            ``attention_output``, ``ff_in`` (every feed-forward input projection, gate included) and
            ``ff_out``. Attention roles cover self- and cross-attention.
        init_weights: ``"lora"``: ``A`` Kaiming-uniform and ``B`` zero, so a new adapter is the identity.
            ``"gaussian"``: ``A`` normal(0, 1/r) and ``B`` zero. ``"bert"``: both normal(0, 0.02).
        use_gating: Scale the update by a learned gate computed from the input (UniPELT).
        rank_pattern: Per-projection ranks, integers >= 1, by key as described above.
        alpha_pattern: Per-projection ``alpha`` values, numbers > 0, by key as described above. A
            projection with a rank from ``rank_pattern`` but no ``alpha_pattern`` key keeps ``alpha``,
            so its scaling changes, as in PEFT.
        leave_out: Indices of blocks that get no LoRA.
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    init_weights: str = "lora"
    use_gating: bool = False
    # Dicts are not hashable, so the hash of a config leaves the patterns out, but equality compares them.
    rank_pattern: dict[str, int] = field(default_factory=dict, hash=False)
    alpha_pattern: dict[str, float] = field(default_factory=dict, hash=False)

    architecture: ClassVar[str] = "lora"
    tuple_fields: ClassVar[tuple[str, ...]] = ("leave_out", "targets")

    def __post_init__(self) -> None:
        # A private copy, so that changing the caller's dict later cannot bypass validation.
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, {})
            elif isinstance(value, Mapping):
                object.__setattr__(self, name, dict(value))
        super().__post_init__()

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        if not is_int(self.r) or self.r < 1:
            problems.append(f"r={self.r!r}: expected an integer rank >= 1")
        if not is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha={self.alpha!r}: expected a number > 0")
        problems += check_probability("dropout", self.dropout)
        problems += check_roles("targets", self.targets)
        problems += check_choice("init_weights", self.init_weights, LORA_INITS)
        problems += check_bools(self, ("use_gating",))
        problems += _check_pattern("rank_pattern", self.rank_pattern, self.targets, self.leave_out, _check_rank)
        problems += _check_pattern("alpha_pattern", self.alpha_pattern, self.targets, self.leave_out, _check_alpha)
        return problems

    @property
    def scaling(self) -> float:
        """The factor ``alpha / r`` on the low-rank update of projections that no pattern key selects."""
        return self.alpha / self.r

    @property
    def max_rank(self) -> int:
        """The largest rank of any projection: ``r`` or a ``rank_pattern`` value."""
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, block: int, role: str, number: int = 0) -> int:
        """Return the rank of projection ``number`` of ``role`` in block ``block``."""
        return _lookup(self.rank_pattern, block, role, number, self.r)

    def alpha_for(self, block: int, role: str, number: int = 0) -> float:
        """Return the ``alpha`` of projection ``number`` of ``role`` in block ``block``."""
        return _lookup(self.alpha_pattern, block, role, number, self.alpha)

    def unmatched_pattern_keys(self, projections: Iterable[tuple[int, str, int]]) -> list[str]:
        """Return the pattern keys that select none of ``projections``, given as ``(block, role, number)``.

        Args:
            projections: Every projection the adapter adapts in a model.
        """
        projections = list(projections)
        unmatched = []
        for key in dict.fromkeys([*self.rank_pattern, *self.alpha_pattern]):
            entry = parse_pattern_key(key)
            if not any(entry.matches(*projection) for projection in projections):
                unmatched.append(key)
        return unmatched


@register_config
@dataclass(frozen=True)
class IA3Config(MethodConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors that rescale activations elementwise.

    Attention roles (``query``, ``key``, ``value``, ``attention_output``) and ``ff_in`` scale the
    projection's output. ``ff_out`` scales the input of the feed-forward output projection, which is
    the activation after the non-linearity, as in the paper, unless ``ff_out_side="output"``.

    Attributes:
        targets: Roles to rescale, from ``query``, ``key``, ``value``, ``attention_output``, ``ff_in``
            and ``ff_out``.
        init_weights: ``"ones"`` starts as the identity; ``"bert"`` draws from normal(1, 0.02).
        ff_out_side: ``"input"`` scales the input of the ``ff_out`` projection (a vector of its input
            width). ``"output"`` scales its output (a vector of the hidden size), as the ``adapters``
            library does for a module it wraps as ``intermediate_lora`` or ``output_lora``, which on
            Llama is ``down_proj``.
        leave_out: Indices of blocks that get no (IA)^3 vectors.
    """

    targets: tuple[str, ...] = ("key", "value", "ff_out")
    init_weights: str = "ones"
    ff_out_side: str = "input"

    architecture: ClassVar[str] = "ia3"
    tuple_fields: ClassVar[tuple[str, ...]] = ("leave_out", "targets")

    def _find_problems(self) -> list[str]:
        problems = super()._find_problems()
        problems += check_roles("targets", self.targets)
        problems += check_choice("init_weights", self.init_weights, IA3_INITS)
        problems += check_choice("ff_out_side", self.ff_out_side, FF_OUT_SIDES)
        return problems
