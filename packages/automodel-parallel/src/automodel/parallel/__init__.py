"""automodel.parallel — see packages/automodel-parallel/README.md."""

__version__ = "0.1.0"

__all__ = ["__version__"]
