"""The clocks the networks were trained on, defined once: 16 kHz audio, 25 fps video, 640 samples a frame.

Every module that converts between audio samples, video frames and seconds imports these rather than
repeating the numbers (:mod:`edtalk_live.edtalk.audio` re-exports them for its callers).
"""

from __future__ import annotations

from typing import Final

__all__ = ["FPS", "FRAME_SECONDS", "SAMPLE_RATE", "SAMPLES_PER_FRAME"]

SAMPLE_RATE: Final[int] = 16000
"""Audio sample rate the networks were trained on (Hz)."""
FPS: Final[int] = 25
"""Video frame rate the networks were trained on (frames per second)."""
SAMPLES_PER_FRAME: Final[int] = SAMPLE_RATE // FPS  # 640
"""Audio samples per video frame."""
FRAME_SECONDS: Final[float] = 1.0 / FPS  # 0.04
"""Duration of one video frame (seconds)."""
