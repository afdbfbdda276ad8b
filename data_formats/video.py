"""Video files: header facts (cheap: for token counts before decoding) and sampled frames (PyAV).

Sampling: a video of ``N`` frames at ``r`` frames per second lasts ``N / r`` seconds; at the
configured ``fps`` that is ``n = round(N / r · fps)`` frames, clamped to ``[1, max_frames]`` (and to
``N``), taken at evenly spaced frame indices ``round(i · (N − 1) / (n − 1))``. The sampled rate
``n / N · r`` goes to the processor as video metadata: Qwen2.5-VL turns it into the seconds each
temporal patch spans (``second_per_grid_ts``), which sets the temporal position ids. The same
numbers come from the header alone (:func:`video_header`), so a sample's video-token count is known
before any frame is decoded, exactly as for images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlm.data_formats import problems
from vlm.data_formats.conversation import ImageRef
from vlm.data_formats.images import resolve_image_path
from vlm.errors import ConfigError, DataError

DEFAULT_VIDEO_FPS = 2.0
DEFAULT_VIDEO_MAX_FRAMES = 32


@dataclass(frozen=True)
class VideoSampling:
    fps: float = DEFAULT_VIDEO_FPS
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES

    def __post_init__(self):
        if not self.fps > 0:
            raise ConfigError(f"video fps must be > 0, got {self.fps}")
        if int(self.max_frames) < 1:
            raise ConfigError(f"video max_frames must be >= 1, got {self.max_frames}")


@dataclass(frozen=True)
class VideoHeader:
    total_frames: int
    native_fps: float
    height: int
    width: int

    def indices(self, sampling: VideoSampling) -> list[int]:
        """Frame indices sampled (see the module docstring)."""
        seconds = self.total_frames / self.native_fps
        n = max(1, min(int(sampling.max_frames), self.total_frames, round(seconds * sampling.fps)))
        if n == 1:
            return [0]
        return [round(i * (self.total_frames - 1) / (n - 1)) for i in range(n)]

    def metadata(self, sampling: VideoSampling) -> dict:
        """transformers' ``VideoMetadata`` fields: ``sampled_fps = n / total · fps``."""
        return {"total_num_frames": self.total_frames, "fps": self.native_fps,
                "frames_indices": self.indices(sampling), "width": self.width, "height": self.height,
                "duration": self.total_frames / self.native_fps, "video_backend": "pyav"}


def patch_times(indices: list[int], native_fps: float, frames_per_patch: int) -> list[float]:
    """Seconds at which each temporal patch of sampled frames sits: frames ``indices`` of a video at
    ``native_fps`` are grouped ``frames_per_patch`` at a time (the last group filled by repeating the
    last frame), and group k's time is the mean of its first and last frame's time,
    t_k = (i_first / fps + i_last / fps) / 2. Qwen3-VL writes it before each patch's tokens."""
    p = max(1, int(frames_per_patch))
    padded = list(indices) + [indices[-1]] * (-len(indices) % p)
    return [(padded[k] + padded[k + p - 1]) / 2 / native_fps for k in range(0, len(padded), p)]


def _path(ref: ImageRef, root) -> str:
    if ref.kind != "path":
        raise DataError(f"video {ref.describe()} must be a file path", code=problems.WRONG_TYPE)
    return str(resolve_image_path(ref.value, root, what="video"))


def _open(path: str):
    try:
        import av
    except ImportError:  # pragma: no cover - a dependency
        raise ConfigError("video records need PyAV: pip install av") from None
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"video {os.path.basename(path)!r} is unreadable: {e}",
                        code=problems.CORRUPT_VIDEO) from None
    if not container.streams.video:
        container.close()
        raise DataError(f"video {os.path.basename(path)!r} has no video stream", code=problems.CORRUPT_VIDEO)
    return av, container


def video_header(ref: ImageRef, root=None) -> VideoHeader:
    """Frame count, frame rate and size from the container (frames counted from packets when the
    header does not say)."""
    path = _path(ref, root)
    av, container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.base_rate or 0)
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for p in container.demux(stream) if p.size)
        height, width = stream.codec_context.height, stream.codec_context.width
    except av.error.FFmpegError as e:
        raise DataError(f"video {os.path.basename(path)!r} is unreadable: {e}",
                        code=problems.CORRUPT_VIDEO) from None
    finally:
        container.close()
    if total <= 0 or rate <= 0 or not height or not width:
        raise DataError(f"video {os.path.basename(path)!r} has no frames or no frame rate "
                        f"({total} frames, {rate} fps, {width}x{height})", code=problems.CORRUPT_VIDEO)
    return VideoHeader(total, rate, height, width)


def read_video(ref: ImageRef, root=None, sampling: VideoSampling = VideoSampling()):
    """``(frames, metadata)``: the sampled frames as an ``(n, H, W, 3)`` uint8 array and the
    ``VideoMetadata`` dict for the processor. Exactly ``len(header.indices(sampling))`` frames
    (a file whose tail does not decode repeats its last decoded frame, so counts never drift)."""
    import numpy as np

    header = video_header(ref, root)
    wanted = header.indices(sampling)
    want = set(wanted)
    av, container = _open(_path(ref, root))
    got: dict[int, np.ndarray] = {}
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    except av.error.FFmpegError as e:
        if not got:
            raise DataError(f"video {ref.describe()} does not decode: {e}", code=problems.CORRUPT_VIDEO) from None
    finally:
        container.close()
    if not got:
        raise DataError(f"video {ref.describe()} decoded no frame", code=problems.CORRUPT_VIDEO)
    frames, last = [], None
    for i in wanted:
        last = got.get(i, last if last is not None else got[min(got)])
        frames.append(last)
    return np.stack(frames), header.metadata(sampling)


def processor_video_kwargs(processor, clips) -> dict:
    """The processor keyword arguments for already-sampled clips (``(frames, metadata)`` pairs from
    :func:`read_video`), the same for training and evaluation so a model sees a video the same way in
    both: frames are not sampled again (``do_sample_frames=False``), and where transformers (>= 5.19)
    caps the pixels of a whole video, that cap is off, because its own token counter
    (``_get_num_multimodal_tokens``, which plans sample lengths) does not apply it."""
    kwargs = {"videos": [frames for frames, _ in clips], "video_metadata": [meta for _, meta in clips],
              "do_sample_frames": False}
    if hasattr(getattr(processor, "video_processor", None), "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False
    return kwargs
