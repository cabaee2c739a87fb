"""omni-data: multimodal samples, sources, token-budget packing, resumable loading, preprocessing."""

__version__ = "0.1.0"
