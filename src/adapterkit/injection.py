"""Run adapter modules inside a live model through forward hooks at sublayer boundaries.

A ``Site`` is one sublayer (attention or feed-forward) of one block. It hooks two modules that the
architecture description names: the input of a module that carries the block's residual stream,
and the output of the sublayer. The model's own ``forward`` runs unchanged. Only the sublayer
output is replaced, and the block then adds its residual and applies its layer norm as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .architectures import SublayerSpec, get_submodule
from .config import BottleneckConfig
from .methods.bottleneck import Bottleneck

# Returns the (config, module) pairs that should run at a site in this forward pass, in order.
ActiveLookup = Callable[[int, str], Sequence[tuple[BottleneckConfig, Bottleneck]]]


def apply_bottleneck(
    config: BottleneckConfig,
    adapter: Bottleneck,
    sublayer_output: torch.Tensor,
    residual_stream: torch.Tensor | None,
    layer_norm: nn.Module | None,
) -> torch.Tensor:
    """Return the new sublayer output with one bottleneck adapter applied.

    The block adds ``residual_stream`` to the value returned here and, in post-norm blocks, applies
    ``layer_norm`` afterwards, exactly as it does without adapters.

    Args:
        config: The adapter's configuration.
        adapter: The adapter module at this site.
        sublayer_output: ``(batch, seq_len, hidden)``, the sublayer output before the residual add.
        residual_stream: ``(batch, seq_len, hidden)``, what the block adds to the sublayer output.
        layer_norm: The block's own norm over ``output + residual``, or ``None`` in pre-norm blocks.
    """
    if config.parallel:
        return adapter(residual_stream, sublayer_output)

    adapter_input = sublayer_output
    if config.original_ln_before:
        adapter_input = adapter_input + residual_stream
        if layer_norm is not None:
            adapter_input = layer_norm(adapter_input)
    residual = sublayer_output if config.residual_before_ln else adapter_input
    return adapter(adapter_input, residual)


class Site:
    """The hooks of one sublayer of one block.

    Args:
        layer_index: Index of the block.
        sublayer: ``"attention"`` or ``"feed_forward"``.
        block: The block module.
        spec: Where the sublayer's output, residual input and layer norm are inside ``block``.
        lookup: Called at every forward to get the adapters that run here.
        family: Model family, for error messages.
    """

    def __init__(self, layer_index: int, sublayer: str, block: nn.Module, spec: SublayerSpec,
                 lookup: ActiveLookup, family: str = ""):
        self.layer_index = layer_index
        self.sublayer = sublayer
        self.lookup = lookup
        self.output_module = get_submodule(block, spec.output, family=family)
        self.residual_module = get_submodule(block, spec.residual.module, family=family)
        self.layer_norm = get_submodule(block, spec.layer_norm, family=family) if spec.layer_norm else None
        self.residual_position = spec.residual.position
        self.residual_keyword = spec.residual.keyword
        # The residual is captured before the sublayer output in the same forward. The storage is
        # thread-local, so two threads running one model do not read each other's tensors.
        self._captured = threading.local()
        self._handles = [
            self.residual_module.register_forward_pre_hook(self._capture_residual, with_kwargs=True),
            self.output_module.register_forward_hook(self._replace_output),
        ]

    def remove(self) -> None:
        """Remove both hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = threading.local()

    def _capture_residual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) > self.residual_position:
            self._captured.residual = args[self.residual_position]
        else:
            self._captured.residual = kwargs.get(self.residual_keyword)

    def _replace_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        adapters = self.lookup(self.layer_index, self.sublayer)
        if not adapters:
            return None
        residual_stream = getattr(self._captured, "residual", None)
        self._captured.residual = None  # do not keep the activation alive past this forward
        needs_residual = any(config.parallel or config.original_ln_before for config, _ in adapters)
        if needs_residual and residual_stream is None:
            raise RuntimeError(
                f"adapterkit found no residual input for the {self.sublayer} sublayer of block "
                f"{self.layer_index}: the module the architecture description names for it did not "
                "run before the sublayer output. Check the description's residual entry."
            )
        hidden = output
        for config, adapter in adapters:
            hidden = apply_bottleneck(config, adapter, hidden, residual_stream, self.layer_norm)
        return hidden

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_captured"] = None  # thread-local storage cannot be pickled or copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._captured = threading.local()
