"""omni-models: modality encoders/decoders, HF foundations, the composite OmniModel and its plans."""

__version__ = "0.1.0"
