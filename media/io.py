"""Media files in and out with PyAV and Pillow: audio, face images, driving videos, mp4 output.

:func:`read_image` is the one image reader of the project: RGB ``uint8`` ``[H,W,3]``, upright per
the photo's EXIF orientation (phones store photos sideways with a rotation tag). Images and frames
cross the model boundary as float tensors ``[B,3,S,S]`` in [-1, 1]; frames going to an encoder are
``uint8`` arrays ``[B,S,S,3]`` (RGB). Every failure caused by the file itself is raised as
:class:`edtalk.errors.InputError` with a one-line message naming the file. :func:`atomic_write`
puts a file in place only once it is complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE

logger = logging.getLogger(__name__)

__all__ = [
    "VideoWriter",
    "atomic_write",
    "image_to_tensor",
    "iter_video_frames",
    "load_audio",
    "load_image",
    "open_image",
    "probe_video",
    "read_image",
    "read_video_frames",
    "to_uint8",
    "uint8_to_tensor",
    "write_video",
]

_RESAMPLE = Image.Resampling.LANCZOS


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    return path


def _open_container(path: Path, what: str) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """A one-line reason from a PyAV/Pillow exception."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, renamed onto it only if that succeeds.

    On any error the temporary file is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the output the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- audio


def load_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file PyAV reads (wav, mp3, m4a, mp4, ...).

    Returns mono float32 samples ``[N]`` at ``sample_rate`` (channels are mixed down and the
    rate converted by libswresample; the resampler is flushed so no trailing samples are lost).
    """
    path = _existing_file(path, "audio file")
    container = _open_container(path, "audio file")
    chunks: list[np.ndarray] = []
    try:
        if not container.streams.audio:
            raise InputError(f"no audio stream in {path}")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(stream):
            frame.pts = None  # let the resampler count samples; odd input timestamps must not matter
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode audio file {path}: {_reason(exc)}") from exc
    finally:
        container.close()
    wav = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if wav.size == 0:
        raise InputError(f"audio file has no samples: {path}")
    logger.debug("loaded %s: %d samples at %d Hz", path, len(wav), sample_rate)
    return wav


# ----------------------------------------------------------------------------------------------- images


#: the largest image file the readers accept, in bytes, and in pixels (checked from the header, before decoding)
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``[H,W,3]``, upright per its EXIF orientation.

    The file is fully decoded (fails fast on anything that is not an image). A missing or unreadable
    file, or one over :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS`, raises :class:`InputError`
    with a one-line message naming it (the pixel count is read from the header, before decoding).
    """
    path = _existing_file(path, "image file")
    size = os.path.getsize(path)
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"image file too large: {path} ({size / 2**20:.0f} MiB; at most "
                         f"{MAX_IMAGE_BYTES // 2**20} MiB)")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image too large: {path} ({img.width}x{img.height}; at most "
                                 f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels)")
            img.load()
            upright = ImageOps.exif_transpose(img)
            return np.asarray(upright.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"not a readable image: {path} ({_reason(exc)})") from exc


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """:func:`read_image` as a PIL image (RGB, upright per EXIF)."""
    return Image.fromarray(read_image(path))


def _resize(img: Image.Image, size: int) -> Image.Image:
    if img.size == (size, size):
        return img
    if img.width != img.height:
        logger.warning(
            "image %dx%d is not square; it is stretched to %dx%d", img.width, img.height, size, size
        )
    return img.resize((size, size), _RESAMPLE)


def uint8_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``[B,S,S,3]`` (or ``[S,S,3]``) -> float32 ``[B,3,S,S]`` in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if not frames.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        frames = frames.copy()
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> float32 ``[1,3,S,S]`` in [-1, 1], resized to ``size``×``size`` (Lanczos)."""
    return uint8_to_tensor(np.asarray(_resize(img.convert("RGB"), size)))


def load_image(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """Read a face image -> float32 ``[1,3,S,S]`` in [-1, 1], RGB, resized to ``size``×``size``."""
    return image_to_tensor(Image.fromarray(read_image(path)), size)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Raw network images ``[B,3,S,S]`` (about [-1, 1]) -> RGB ``uint8`` ``[B,S,S,3]``.

    Values are clamped to [-1, 1] and mapped by ``(x + 1) * 127.5``, rounded; no per-video
    normalisation, so the same network output always gives the same pixels.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [B,3,S,S], got {tuple(frames.shape)}")
    x = ((frames.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ----------------------------------------------------------------------------------------------- video in


def probe_video(path: str | os.PathLike[str]) -> None:
    """Check that ``path`` is a video with at least one decodable frame (cheap; for early validation)."""
    for _ in iter_video_frames(path, size=None, max_frames=1):
        return


def iter_video_frames(
    path: str | os.PathLike[str],
    size: int | None,
    fps: int = FPS,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the frames of a video as RGB ``uint8`` ``[S,S,3]``, resampled to ``fps`` by timestamp.

    Output frame ``k`` is the source frame nearest to time ``k / fps`` (counted from the first
    frame), so a 30 fps clip drops every sixth frame and a 25 fps clip passes through unchanged.
    ``size=None`` keeps the source size. Frames are decoded and converted one at a time.
    """
    from itertools import islice

    from edtalk_live.media.clips import iter_video  # here, not at the top: media.clips imports this module

    path = _existing_file(path, "video file")
    for frame in islice(iter_video(path, fps), max_frames):
        yield np.asarray(_resize(Image.fromarray(frame), size)) if size else frame


def read_video_frames(
    path: str | os.PathLike[str],
    size: int,
    fps: int = FPS,
    max_frames: int | None = None,
) -> torch.Tensor:
    """All frames of a video, resampled to ``fps`` -> float32 ``[N,3,S,S]`` in [-1, 1].

    Holds the whole clip in memory; use :func:`iter_video_frames` for long clips.
    """
    frames = list(iter_video_frames(path, size, fps=fps, max_frames=max_frames))
    return uint8_to_tensor(np.stack(frames))


# ----------------------------------------------------------------------------------------------- video out


class VideoWriter:
    """Stream RGB frames into an H.264 (libx264, yuv420p) + AAC mp4, atomically.

    Frames are encoded as they arrive; audio (mono float32 at ``sample_rate``, known up front)
    is interleaved with them. Everything goes to a hidden temporary file next to ``path``,
    renamed onto ``path`` only when :meth:`close` succeeds; on any error (or :meth:`abort`)
    the temporary file is deleted, so no partial output is ever left behind. Use as a context
    manager::

        with VideoWriter("out.mp4", size=256, audio=wav) as writer:
            for batch in batches:          # uint8 [B,S,S,3]
                writer.write(batch)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | tuple[int, int],
        fps: int = FPS,
        audio: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        self.path = Path(path)
        self.width, self.height = (size, size) if isinstance(size, int) else size
        if self.width % 2 or self.height % 2:
            raise InputError(f"video size must be even for yuv420p, got {self.width}x{self.height}")
        if not self.path.parent.is_dir():
            raise InputError(f"output folder does not exist: {self.path.parent}")
        if "libx264" not in av.codecs_available:
            raise EDTalkError("this PyAV build has no libx264 encoder; install the PyAV wheel from PyPI")
        self.fps = fps
        self.sample_rate = sample_rate
        self.frames_written = 0
        self._audio = None if audio is None else np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        self._audio_pos = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            self._video = self._container.add_stream("libx264", rate=fps)
            self._video.width, self._video.height = self.width, self.height
            self._video.pix_fmt = "yuv420p"
            self._video.codec_context.time_base = Fraction(1, fps)
            self._video.options = {"crf": str(crf), "preset": preset}
            self._audio_stream = None
            if self._audio is not None:
                self._audio_stream = self._container.add_stream("aac", rate=sample_rate)
                self._audio_stream.layout = "mono"
                self._audio_stream.codec_context.time_base = Fraction(1, sample_rate)
        except BaseException:
            self._discard()
            raise
        self._open = True

    # -- writing

    def write(self, frames: np.ndarray) -> None:
        """Encode RGB ``uint8`` frames ``[B,H,W,3]`` (or a single ``[H,W,3]``)."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames [B,{self.height},{self.width},3], got {frames.dtype} {frames.shape}"
            )
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1
        self._write_audio_until(self.frames_written * self.sample_rate // self.fps)

    def _write_audio_until(self, end: int | None) -> None:
        if self._audio is None or self._audio_stream is None:
            return
        end = len(self._audio) if end is None else min(end, len(self._audio))
        if end <= self._audio_pos:
            return
        chunk = self._audio[self._audio_pos : end]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_pos
        frame.time_base = Fraction(1, self.sample_rate)
        self._container.mux(self._audio_stream.encode(frame))
        self._audio_pos = end

    # -- finishing

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it onto ``path``. Returns ``path``."""
        if not self._open:
            return self.path
        try:
            if self.frames_written == 0:
                raise InputError(f"no video frames to write to {self.path}")
            self._write_audio_until(None)
            self._container.mux(self._video.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        self._open = False
        logger.info("wrote %s: %d frames at %d fps", self.path, self.frames_written, self.fps)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary file; ``path`` is left untouched."""
        if self._open:
            self._discard()

    def _discard(self) -> None:
        self._open = False
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the original error matters, not this one
                logger.debug("closing a failed output container raised", exc_info=True)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(
    path: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    audio: np.ndarray | None = None,
    fps: int = FPS,
    sample_rate: int = SAMPLE_RATE,
) -> int:
    """Write an mp4 from an iterable of RGB ``uint8`` frames ``[H,W,3]`` or batches ``[B,H,W,3]``.

    Frames are consumed lazily (never all in memory); ``audio`` is mono float32 at
    ``sample_rate``. The file appears atomically at ``path`` only if everything succeeded;
    if the iterable or the encoder raises, nothing is left behind. Returns the frame count.
    """
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InputError(f"no video frames to write to {path}")
    first = np.asarray(first)
    if first.ndim not in (3, 4) or first.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [H,W,3] or [B,H,W,3], got shape {first.shape}")
    height, width = first.shape[-3], first.shape[-2]
    with VideoWriter(path, (width, height), fps=fps, audio=audio, sample_rate=sample_rate) as writer:
        writer.write(first)
        for batch in iterator:
            writer.write(batch)
    return writer.frames_written
