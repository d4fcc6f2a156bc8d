"""siesta_dmguess: equivariant ML initial density matrices for SIESTA.

Learn converged SIESTA density matrices, predict the DM of a new structure,
write it as a ``.DM`` that SIESTA reads with ``DM.UseSaveDM T``, and measure the
SCF iterations saved. See ``docs/`` for units and conventions.
"""

__version__ = "0.1.0"

from .errors import DMGuessError, InputFileError, ModelCompatibilityError, SiestaError  # noqa: F401

# The stack a model is trained and run with; each version is read from the installed metadata, not imported.
STACK = ("torch", "e3nn", "sisl", "ase", "numpy")


def software_versions() -> dict[str, str]:
    """Versions of this package, Python and :data:`STACK` (recorded in model cards and printed by ``--version``)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"siesta_dmguess": __version__, "python": sys.version.split()[0], **{name: installed(name) for name in STACK}}


def __getattr__(name):
    # The ASE calculator pulls in torch and ASE's SIESTA interface: import it on first use.
    if name in ("DMGuessSiesta", "GuessRecord"):
        from . import calculator

        return getattr(calculator, name)
    raise AttributeError(name)


__all__ = ["DMGuessSiesta", "GuessRecord", "DMGuessError", "InputFileError", "ModelCompatibilityError", "SiestaError", "__version__",
           "software_versions"]
