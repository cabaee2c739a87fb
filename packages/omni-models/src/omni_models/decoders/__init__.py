"""Built-in decoders (generated modalities): a VQ image decoder on Janus's VQ-VAE."""
