"""SimpleSliceNet engine: volume I/O, preprocessing, slice encoder, flow, scoring, model files, CLI.

Imports neither ``slicer`` nor ``qt``: the same code serves the command line, training and the
3D Slicer module.
"""

__version__ = "0.1.0"
