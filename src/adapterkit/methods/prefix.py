"""The prefix tuning module: trained keys and values for every attention layer of one stack."""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn import functional as F

from .bottleneck import _ACTIVATIONS


class PrefixTuning(nn.Module):
    """Prefix keys and values for ``n_layers`` attention layers (Li and Liang, 2021, "Prefix-Tuning").

    Each attention layer attends to ``prefix_length`` extra key/value positions placed before the real
    ones. ``prefix_attention`` puts them there. This module only produces them.

    Not flat, the prefixes are reparametrised as in the paper: an embedding ``(prefix_length,
    hidden_size)`` goes through the MLP ``hidden_size -> bottleneck_size -> n_layers * 2 * n_kv_heads *
    head_dim``, with ``non_linearity`` between the two linear layers. Flat, that output is one
    parameter, ``prefix``, of shape ``(prefix_length, n_layers * 2 * n_kv_heads * head_dim)``. In both cases the last dimension is laid out as ``(n_layers, 2, n_kv_heads, head_dim)``,
    keys before values, so a flat module can take the output of a trained MLP as its ``prefix``.

    Args:
        n_layers: Number of attention layers that get a prefix.
        n_kv_heads: Key/value heads per layer (fewer than the query heads under grouped-query attention).
        head_dim: Size of one key/value head.
        hidden_size: Width of the model's hidden states, the embedding width of the MLP and the gate input.
        prefix_length: Prefix positions per layer.
        bottleneck_size: Hidden width of the MLP. Unused when ``flat``.
        non_linearity: Activation of the MLP, a name from ``methods.bottleneck`` such as ``"tanh"``.
        dropout: Dropout probability on the keys and values, in ``[0, 1)``.
        flat: Train the prefixes directly, without the MLP.
        use_gating: Add the UniPELT gate, one ``nn.Linear(hidden_size, 1)`` per layer (see ``gate_value``).
        gate_from_input: With ``use_gating``, compute the gate from the attention input (True) or learn
            one logit per layer that does not depend on the input (False). Prefix values are shared by
            every query, so causal models need the latter: an input-dependent gate would let a position
            see later tokens.

    Raises:
        ValueError: If an argument is out of the range given above.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, hidden_size: int, prefix_length: int = 30,
                 bottleneck_size: int = 512, non_linearity: str = "tanh", dropout: float = 0.0, flat: bool = False,
                 use_gating: bool = False, gate_from_input: bool = True):
        super().__init__()
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("hidden_size", hidden_size), ("prefix_length", prefix_length),
                            ("bottleneck_size", bottleneck_size)):
            _check_positive_int(name, value)
        if non_linearity not in _ACTIVATIONS:
            raise ValueError(f"non_linearity={non_linearity!r} is invalid: expected one of {', '.join(_ACTIVATIONS)}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} is invalid: expected a probability in [0, 1), for example 0.1")
        for name, value in (("flat", flat), ("use_gating", use_gating), ("gate_from_input", gate_from_input)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: expected True or False")

        self.n_layers = int(n_layers)
        self.n_kv_heads = int(n_kv_heads)
        self.head_dim = int(head_dim)
        self.hidden_size = int(hidden_size)
        self.prefix_length = int(prefix_length)
        self.bottleneck_size = int(bottleneck_size)
        self.flat = flat
        self.use_gating = use_gating
        self.layer_width = 2 * self.n_kv_heads * self.head_dim

        if flat:
            self.prefix = nn.Parameter(torch.empty(self.prefix_length, self.n_layers * self.layer_width))
            self.embedding = None
            self.mlp = None
        else:
            self.prefix = None
            self.embedding = nn.Embedding(self.prefix_length, self.hidden_size)
            self.mlp = nn.Sequential(
                nn.Linear(self.hidden_size, self.bottleneck_size),
                _ACTIVATIONS[non_linearity](),
                nn.Linear(self.bottleneck_size, self.n_layers * self.layer_width),
            )
        self.dropout = nn.Dropout(dropout)
        self.gates = None
        self.gate_logits = None
        if use_gating and gate_from_input:
            self.gates = nn.ModuleList(nn.Linear(self.hidden_size, 1) for _ in range(self.n_layers))
        elif use_gating:
            self.gate_logits = nn.Parameter(torch.zeros(self.n_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the flat prefix or the embedding, and the gate weights, from ``normal(0, 0.02)``.

        The MLP's linear layers and the gate biases keep the ``nn.Linear`` default.
        """
        if self.flat:
            nn.init.normal_(self.prefix, std=0.02)
        else:
            nn.init.normal_(self.embedding.weight, std=0.02)
            for layer in (self.mlp[0], self.mlp[2]):
                layer.reset_parameters()
        if self.gates is not None:
            for gate in self.gates:
                gate.reset_parameters()
                nn.init.normal_(gate.weight, std=0.02)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the prefixes of all layers, with dropout.

        Returns:
            ``(keys, values)``, each ``(n_layers, n_kv_heads, prefix_length, head_dim)``, in the dtype of
            the parameters. The gate is not applied (see ``gate_value``).
        """
        return self._split(self._rows(0, self.n_layers), self.n_layers)

    def outputs(self) -> torch.Tensor:
        """Return the prefixes of all layers without dropout, ``(prefix_length, n_layers * layer_width)``.

        That is the MLP's output, or the flat ``prefix`` parameter itself. A caller that needs several
        layers' prefixes in one forward computes this once and passes it to ``layer_prefix``.
        """
        return self._rows(0, self.n_layers)

    def layer_prefix(self, layer: int, outputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the prefix of one layer, with dropout.

        Equal to ``forward()`` indexed at ``layer`` (up to dropout). Without ``outputs``, it computes
        only that layer's slice of the MLP's last linear layer. The backward pass of that slice fills
        a zero tensor the size of the whole weight, so a caller that needs every layer's prefix in
        one forward should pass ``outputs`` instead.

        Args:
            layer: Index of the layer, in ``[0, n_layers)``.
            outputs: What ``outputs()`` returned in this forward, or ``None``.

        Returns:
            ``(keys, values)``, each ``(n_kv_heads, prefix_length, head_dim)``. The gate is not applied.

        Raises:
            IndexError: If ``layer`` is out of range.
        """
        self._check_layer(layer)
        if outputs is None:
            rows = self._rows(layer, layer + 1)
        else:
            rows = outputs[:, layer * self.layer_width:(layer + 1) * self.layer_width]
        keys, values = self._split(rows, 1)
        return keys[0], values[0]

    def gate_value(self, layer: int, hidden_states: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the UniPELT gate of one layer: ``sigmoid(gate(h))`` averaged over the sequence.

        With ``gate_from_input=False`` it is ``sigmoid`` of the layer's learned logit, shape
        ``(1, 1, 1, 1)``, and ``hidden_states`` is not read.

        The caller multiplies that layer's prefix values by it, so it broadcasts against values shaped
        ``(batch, n_kv_heads, prefix_length, head_dim)``.

        Args:
            layer: Index of the layer, in ``[0, n_layers)``.
            hidden_states: Input of that attention layer, ``(batch, seq_len, hidden_size)``.
            attention_mask: Optional ``(batch, seq_len)`` with 1 for real tokens and 0 for padding. When
                given, the average runs over the real tokens only.

        Returns:
            ``(batch, 1, 1, 1)`` in ``(0, 1)``, in the dtype of ``hidden_states``.

        Raises:
            ValueError: If the module has no gate or a tensor has the wrong shape.
            IndexError: If ``layer`` is out of range.
        """
        if self.gate_logits is not None:
            self._check_layer(layer)
            return torch.sigmoid(self.gate_logits[layer]).view(1, 1, 1, 1)
        if self.gates is None:
            raise ValueError("gate_value needs gates: build PrefixTuning with use_gating=True")
        self._check_layer(layer)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected (batch, seq_len, "
                             f"{self.hidden_size})")
        gate = self.gates[layer]
        scores = torch.sigmoid(F.linear(hidden_states, gate.weight.to(hidden_states.dtype),
                                        gate.bias.to(hidden_states.dtype)))
        if attention_mask is None:
            average = scores.mean(dim=1)
        else:
            if attention_mask.shape != hidden_states.shape[:2]:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected "
                                 f"{tuple(hidden_states.shape[:2])}, the (batch, seq_len) of hidden_states")
            weights = attention_mask.to(scores.dtype).unsqueeze(-1)
            average = (scores * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return average.view(-1, 1, 1, 1)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Return the output columns of layers ``start`` to ``stop - 1``, ``(prefix_length, layers * layer_width)``."""
        whole = start == 0 and stop == self.n_layers
        columns = slice(start * self.layer_width, stop * self.layer_width)
        if self.flat:
            return self.prefix if whole else self.prefix[:, columns]
        hidden = self.mlp[1](self.mlp[0](self.embedding.weight))
        last = self.mlp[2]
        if whole:
            return last(hidden)
        return F.linear(hidden, last.weight[columns], last.bias[columns])

    def _split(self, rows: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.dropout(rows)
        # (prefix_length, layers * 2 * heads * head_dim) -> (layers, 2, heads, prefix_length, head_dim)
        blocks = rows.reshape(self.prefix_length, n_layers, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return blocks[:, 0], blocks[:, 1]

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.n_layers:
            raise IndexError(f"layer={layer!r} is out of range: this PrefixTuning has {self.n_layers} layers, "
                             f"so expected an integer in [0, {self.n_layers})")

    def extra_repr(self) -> str:
        return (f"n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_length={self.prefix_length}, flat={self.flat}, use_gating={self.use_gating}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
