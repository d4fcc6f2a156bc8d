"""siesta_dmguess: equivariant ML initial density matrices for SIESTA.

Learn converged SIESTA density matrices, predict the DM of a new structure,
write it as a ``.DM`` that SIESTA reads with ``DM.UseSaveDM T``, and measure the
SCF iterations saved. See ``docs/`` for units and conventions.
"""

__version__ = "0.1.0"

from .errors import DMGuessError, InputFileError, ModelCompatibilityError, SiestaError  # noqa: F401



def __getattr__(name):
    # The ASE calculator pulls in torch and ASE's SIESTA interface: import it on first use.
    if name in ("DMGuessSiesta", "GuessRecord"):
        from . import calculator

        return getattr(calculator, name)
    raise AttributeError(name)


__all__ = ["DMGuessSiesta", "GuessRecord", "DMGuessError", "InputFileError", "ModelCompatibilityError", "SiestaError", "__version__"]
