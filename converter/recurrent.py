"""Embedding and recurrent layers (LSTM, GRU), unrolled over a static sequence length: ops and their lowerings."""

from __future__ import annotations

from collections.abc import Callable

import keras

from converter.ops import Op

LOWERINGS: dict[str, Callable[[keras.layers.Layer], list[Op]]] = {}
"""Layer types of this family and their lowerings (merged into :data:`converter.lowering.SUPPORTED_LAYERS`)."""
