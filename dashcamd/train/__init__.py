"""Training of the face+plate detector (CPU-budget YOLOv5): data, loss, loop, export.

`main(argv)` is the `dashcamd train` / `python -m dashcamd.train` entry point.
"""

from .cli import main

__all__ = ["main"]
