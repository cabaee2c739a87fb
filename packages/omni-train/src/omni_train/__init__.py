"""omni-train: config, trainer, metrics, launchers and the omni-train CLI."""

__version__ = "0.1.0"
