"""e3nn's ``o3`` and ``nn``, imported without loading ``torch._dynamo``.

e3nn 0.6 marks one of its functions with ``torch.compiler.disable`` as it is imported, and that decorator imports
``torch._dynamo``: about 1.5 s of the start-up of every ``siesta-dmguess predict`` (docs/benchmarks.md,
"Prediction cost, threads and start-up"). The mark only matters under ``torch.compile``, which this package never
uses, so the decorator is a no-op while e3nn is imported here. Every module of the package takes e3nn from here;
if e3nn was imported before (by the user), nothing changes.
"""

import torch

_compiler_disable = torch.compiler.disable


def _unmarked(fn=None, *args, **kwargs):
    return fn if fn is not None else (lambda f: f)


torch.compiler.disable = _unmarked
try:
    from e3nn import nn, o3
finally:
    torch.compiler.disable = _compiler_disable

__all__ = ["nn", "o3"]
