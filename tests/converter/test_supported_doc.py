"""README's "Supported" lists exactly what converts: the lowering tables, not a hand-kept copy."""

from __future__ import annotations

import re

from converter.activations import ACTIVATIONS
from converter.frozen import FROZEN_LAYERS
from converter.lowering import SUPPORTED_LAYERS
from tests.helpers import REPO_ROOT


def _bullet(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Supported", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"^- \*\*{re.escape(title)}[^*]*:\*\*(.*?)(?=^- \*\*|\Z)", section, re.S | re.M)
    assert match, f"README's Supported section has no bullet {title!r}"
    return " ".join(match.group(1).split())


def _names(text: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Za-z0-9]+(?:[0-9]D)?\b", text))


def test_the_layers_bullet_names_every_supported_layer_and_no_other():
    names = _names(_bullet("Layers").split(".")[0])
    assert names == set(SUPPORTED_LAYERS)


def test_the_frozen_bullet_names_every_frozen_part_layer():
    listed = _names(_bullet("Frozen layers and frozen nested models").split(":", 1)[1].split(".")[0])
    assert listed == set(FROZEN_LAYERS) - {"Dropout"}  # Dropout is named as refused, in the next sentence


def test_the_activations_bullet_names_every_activation():
    assert set(re.findall(r"[a-z_0-9]+", _bullet("Activations"))) == set(ACTIVATIONS)
