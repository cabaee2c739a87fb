"""Decoding raw media bytes (images, audio, video) for the processors; bad bytes raise ValueError."""

from __future__ import annotations

import io
import math

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


def video_info(data: bytes) -> tuple[float, int, int]:
    """(duration seconds, width, height) from the container header."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            if s.duration is not None and s.time_base is not None:
                duration = float(s.duration * s.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000
            else:
                raise ValueError("the container states no duration")
            return duration, s.codec_context.width, s.codec_context.height
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable video: {e}") from None


def sample_times(duration: float, fps: float, max_frames: int, multiple: int) -> list[float]:
    """Timestamps to sample: `fps` per second, at most max_frames, a positive multiple of `multiple`."""
    n = min(max_frames, max(1, math.floor(duration * fps)))
    n = max(multiple, n - n % multiple)
    return [k / fps for k in range(n)]


def decode_video(data: bytes, times: list[float], size: tuple[int, int]) -> torch.Tensor:
    """Frames nearest at or after each timestamp (the last frame past the end), float (F, 3, H, W)."""
    import av

    frames = []
    try:
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.video[0]
            want = iter(times)
            t = next(want, None)
            last = None
            for frame in c.decode(stream):
                last = frame
                ts = float(frame.pts * stream.time_base) if frame.pts is not None else 0.0
                while t is not None and ts + 1e-6 >= t:
                    frames.append(frame.to_image())
                    t = next(want, None)
                if t is None:
                    break
            while t is not None and last is not None:  # past the last frame
                frames.append(last.to_image())
                t = next(want, None)
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"not a decodable video: {e}") from None
    if len(frames) != len(times):
        raise ValueError("video has no decodable frames")
    from PIL import Image

    out = torch.empty(len(frames), 3, size[1], size[0])
    for i, im in enumerate(frames):
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        out[i] = (
            torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            .view(size[1], size[0], 3)
            .permute(2, 0, 1)
        )
    return out / 255.0
