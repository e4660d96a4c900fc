"""automodel.recipes — see packages/automodel-recipes/README.md."""

__version__ = "0.1.0"

__all__ = ["__version__"]
