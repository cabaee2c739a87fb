"""Decoding raw media bytes (images, audio, a video's audio track) for the processors; bad bytes raise
ValueError (video frames are decoded by transformers' PyAV reader, see encoders/qwen2_vl_processing.py)."""

from __future__ import annotations

import io

import torch


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image: {e}") from None


def open_image(data: bytes):
    """The image as an RGB PIL image; bytes that do not decode are a ValueError (the data side's decode error)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a decodable image: {e}") from None


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image as float (3, H, W) in [0, 1], resized (bicubic) to `size` = (width, height) if given."""
    from PIL import Image

    im = open_image(data)
    if size is not None and im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    w, h = im.size
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return pixels.view(h, w, 3).permute(2, 0, 1).float() / 255.0


def audio_frames(data: bytes) -> tuple[int, int]:
    """(frames, sample rate) from the header (wav, flac, ogg: whatever libsndfile reads)."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"not a readable audio file: {e}") from None
    return int(info.frames), int(info.samplerate)


def resampled_length(frames: int, rate: int, target: int) -> int:
    return frames if rate == target else max(1, round(frames * target / rate))


def decode_audio(data: bytes, target_rate: int) -> torch.Tensor:
    """Mono float waveform at `target_rate` (band-limited FFT resampling)."""
    import soundfile as sf

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"not a decodable audio file: {e}") from None
    x = torch.from_numpy(wave).mean(dim=1)
    n = resampled_length(x.numel(), rate, target_rate)
    if n == x.numel():
        return x
    spec = torch.fft.rfft(x.double())
    keep = min(spec.numel(), n // 2 + 1)
    out = torch.zeros(n // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    return (torch.fft.irfft(out, n=n) * (n / x.numel())).float()


def video_audio(data: bytes, target_rate: int) -> torch.Tensor | None:
    """The audio track of a video container as a mono float waveform at `target_rate` (FFmpeg's
    resampler, through PyAV); None when the container has no audio stream."""
    import av
    import numpy as np

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
            chunks = [g.to_ndarray().reshape(-1) for f in c.decode(audio=0) for g in resampler.resample(f)]
            chunks += [g.to_ndarray().reshape(-1) for g in resampler.resample(None)]
    except av.error.FFmpegError as e:
        raise ValueError(f"not a decodable audio track: {e}") from None
    if not chunks:
        raise ValueError("the audio track decodes to no samples")
    return torch.from_numpy(np.concatenate(chunks))
