"""litefed edge client: trains converted models on a device with LiteRT.

Needs only numpy, paho-mqtt and ai-edge-litert; never TensorFlow.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("litefed")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
