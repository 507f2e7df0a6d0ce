"""litefed edge client: trains converted models on a device with LiteRT.

Needs only numpy, paho-mqtt and ai-edge-litert; never TensorFlow.
"""

# The single source of the package version (pyproject.toml reads it). A plain
# string: importlib.metadata would pull email, csv & co. into every board's RSS.
__version__ = "0.1.0"
