"""tem_ij_plugin: learn to segment TEM images from a few partially annotated patches.

Importing the package is light (no torch, no Java); the engine lives in submodules.
"""

__version__ = "0.2.0"
