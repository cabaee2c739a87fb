"""Built-in encoders (each with its processors): Qwen2-VL vision, SigLIP, Whisper."""
