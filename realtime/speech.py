"""Pushed speech: a bot's text-to-speech audio driving a session instead of a microphone.

A TTS engine speaks faster than real time: its audio comes in bursts, seconds ahead of when it is heard. A
:class:`SpeechQueue` keeps it (any amount: an utterance is a few hundred kB) and places it on the session's
clock a little ahead of playout (:data:`SPEECH_AHEAD_S`), one utterance after another, each starting on a video
frame at the earliest sample the lip sync has not consumed yet: pushed speech is heard ``delay - jitter_margin``
after it is pushed (about 200 ms), and plays at exactly 25 fps with the lips in sync however fast it came.

Utterances: :meth:`SpeechQueue.push` adds to the current one (a new one once the last was ended),
:meth:`SpeechQueue.end` says no more audio comes for it. As the session's pacer hands the voice out
(:meth:`SpeechQueue.played`), each utterance reports ``playback_started`` when its first sample leaves and
``playback_finished`` (``position``: seconds played, ``interrupted``: False) when its last did;
:meth:`SpeechQueue.clear` (an interrupt) drops what is queued and finishes the utterances with the position
reached and ``interrupted``: True. Events are plain dicts, sent on the session's control channel and to the
pushed-speech stream.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from edtalk_live.realtime.audio_in import AudioInput

logger = logging.getLogger(__name__)

#: pushed speech is placed on the session clock at most this far ahead of real time (the rest waits in the queue)
SPEECH_AHEAD_S = 1.0
#: the most pushed speech a session queues (beyond it, pushes are refused): ten minutes
MAX_QUEUED_S = 600.0
#: sample rates pushed speech may have
MIN_RATE, MAX_RATE = 8_000, 192_000

PLAYBACK_STARTED = "playback_started"
PLAYBACK_FINISHED = "playback_finished"


def check_speech(samples: np.ndarray, rate: int) -> np.ndarray:
    """Pushed speech as float32 mono samples in [-1, 1] (from int16 or float), or :class:`InputError`."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InputError(f"pushed speech must be mono samples [N], got shape {list(x.shape)}")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise InputError(f"pushed speech sample rate must be {MIN_RATE}-{MAX_RATE} Hz, got {rate}")
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError("pushed speech has NaN or infinite samples")
    return x


@dataclass
class Utterance:
    id: int
    start: int | None = None     # its first sample on the session clock, once placed
    placed: int = 0              # samples placed so far
    ended: bool = False          # no more audio comes for it
    started: bool = False        # playback_started was reported

    @property
    def end(self) -> int | None:
        """One past its last sample on the session clock, once it ended and is all placed (else None)."""
        return None if self.start is None else self.start + self.placed


class SpeechQueue:
    """Speech pushed ahead of real time, placed on a session's clock as playout nears (see the module)."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None):
        self._on_event = on_event
        self._pending: collections.deque[tuple[Utterance, np.ndarray]] = collections.deque()
        self._pending_samples = 0
        self.utterances: collections.deque[Utterance] = collections.deque()   # not finished, oldest first
        self._current: Utterance | None = None       # the one pushes go to (None: the next push starts one)
        self._next_id = 1
        self._resampler: av.AudioResampler | None = None
        self._rate = SAMPLE_RATE

    # ------------------------------------------------------------ input (any thread of the session's loop)
    @property
    def queued_s(self) -> float:
        """Seconds of speech pushed but not placed on the clock yet."""
        return self._pending_samples / SAMPLE_RATE

    @property
    def active(self) -> bool:
        """Speech is queued or playing."""
        return bool(self.utterances)

    def push(self, samples: np.ndarray, rate: int = SAMPLE_RATE) -> int:
        """Queue mono speech (float in [-1, 1] or int16) at ``rate`` Hz; returns its utterance's id."""
        x = self._to_16k(check_speech(samples, rate), int(rate))
        if self._pending_samples + len(x) > MAX_QUEUED_S * SAMPLE_RATE:
            raise InputError(f"more than {MAX_QUEUED_S:g} s of pushed speech queued: wait for it to play")
        utt = self._current
        if utt is None or utt.ended:
            utt = self._current = Utterance(self._next_id)
            self._next_id += 1
            self.utterances.append(utt)
        if len(x):
            self._pending.append((utt, x))
            self._pending_samples += len(x)
        return utt.id

    def end(self) -> int | None:
        """The current utterance is complete (its end is reported once it has played); returns its id."""
        utt = self._current
        if utt is None or utt.ended:
            return None
        utt.ended = True
        return utt.id

    def _to_16k(self, x: np.ndarray, rate: int) -> np.ndarray:
        if rate == SAMPLE_RATE:
            return x
        if self._resampler is None or self._rate != rate:      # one resampler per rate: continuous across pushes
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._rate = rate
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    # ------------------------------------------------------------ the session's producer
    def place(self, audio: AudioInput, earliest: int, horizon: int) -> bool:
        """Move queued speech onto the clock up to sample ``horizon``: an utterance starts on the first frame
        boundary at or after both ``audio.cursor`` and ``earliest`` (what the lip sync has not consumed).
        Returns True when anything was placed."""
        placed = False
        while self._pending and audio.cursor < horizon:
            utt, chunk = self._pending[0]
            if utt.start is None:
                start = max(audio.cursor, earliest)
                start = -(-start // SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
                audio.fill_silence_until(start)
                utt.start = start
            n = min(len(chunk), horizon - audio.cursor)
            audio.ring.write(audio.cursor, chunk[:n])
            audio.cursor += n
            utt.placed += n
            self._pending_samples -= n
            placed = True
            if n == len(chunk):
                self._pending.popleft()
            else:
                self._pending[0] = (utt, chunk[n:])
        return placed

    def played(self, next_sample: int) -> None:
        """The session's voice has left up to ``next_sample``: report utterances that started or finished."""
        while self.utterances:
            utt = self.utterances[0]
            if utt.start is not None and not utt.started and next_sample > utt.start:
                utt.started = True
                self._emit({"type": PLAYBACK_STARTED, "utterance": utt.id})
            done = utt.ended and not any(u is utt for u, _ in self._pending)
            if not done:
                return
            if utt.start is None:                            # ended without a sample
                self._finish(utt, 0.0, interrupted=False)
            elif next_sample >= utt.end:
                if not utt.started:
                    utt.started = True
                    self._emit({"type": PLAYBACK_STARTED, "utterance": utt.id})
                self._finish(utt, utt.placed / SAMPLE_RATE, interrupted=False)
            else:
                return
            self.utterances.popleft()

    def clear(self, next_sample: int) -> None:
        """Interrupt: drop every queued sample; each utterance not finished ends here, ``interrupted``."""
        self._pending.clear()
        self._pending_samples = 0
        while self.utterances:
            utt = self.utterances.popleft()
            played = 0 if utt.start is None else min(max(next_sample - utt.start, 0), utt.placed)
            self._finish(utt, played / SAMPLE_RATE, interrupted=True)
        self._current = None

    def _finish(self, utt: Utterance, position: float, interrupted: bool) -> None:
        if self._current is utt:
            self._current = None
        self._emit({"type": PLAYBACK_FINISHED, "utterance": utt.id, "position": round(position, 4),
                    "interrupted": interrupted})

    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the playout
                logger.warning("pushed speech: event %s failed", event.get("type"), exc_info=True)
