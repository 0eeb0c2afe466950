"""Where the desktop client shows the avatar: a virtual camera (pyvirtualcam) or a window (pygame).

Each output runs off the event loop, in a thread of its own (the window: on the thread that calls
:meth:`AvatarWindow.run`, the main thread, as macOS requires), fed through a bounded drop-oldest queue of
:class:`VideoItem` s. An item carries the decoded frame and the moment it is due on screen (its arrival,
plus a hold when the voice is set to lead the video); an output shows each frame once it is due and calls
``on_shown(item, time)`` the first time it does, for the latency measurements.

The virtual camera sends a frame every 40 ms on its own clock (25 fps), the newest one due, repeating the
last one while no new frame is due, so a video-call app sees a steady camera whatever the network does.
Both optional packages are imported only when used, with an error naming the extra that installs them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edtalk_live.edtalk.errors import EDTalkError
from edtalk_live.edtalk.timing import FPS
from edtalk_live.realtime.sinks import DropOldest

logger = logging.getLogger(__name__)

VIRTUAL_CAMERA_HELP = ("Linux: load v4l2loopback (sudo modprobe v4l2loopback exclusive_caps=1 card_label=EDTalk); "
                       "Windows: install OBS Studio 26 or later, or Unity Capture; macOS: install OBS Studio "
                       "(macOS 13+: 30 or later), start its virtual camera once and stop it)")


@dataclass(frozen=True)
class VideoItem:
    """One received frame: ``image`` uint8 ``[H, W, 3]`` RGB, ``arrival`` and ``due`` on ``time.monotonic()``;
    ``index`` the frame's painted index in probe mode (None otherwise)."""

    image: np.ndarray
    arrival: float
    due: float
    index: int | None = None


def fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` ``[H, W, 3]`` scaled to fit ``width`` x ``height`` (aspect kept, centred on black)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    from PIL import Image

    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    out = np.zeros((height, width, 3), np.uint8)
    y, x = (height - nh) // 2, (width - nw) // 2
    out[y:y + nh, x:x + nw] = resized
    return out


class FrameOutput:
    """A frame output fed from the event loop (:meth:`put` never waits) and drained on another thread.

    ``capacity`` bounds the frames waiting (enough for the video hold); ``on_shown(item, t)`` is called on the
    output's thread the first time each frame is shown. :attr:`shown_times` keeps when the last frames were
    shown (``time.monotonic()``), :attr:`sent` counts what went out (repeats included).
    """

    def __init__(self, capacity: int = 2 * FPS, on_shown: Callable[[VideoItem, float], None] | None = None):
        self.queue = DropOldest(capacity)
        self.on_shown = on_shown
        self.sent = 0
        self.shown = 0
        self.sent_times: list[float] = []
        self.error: BaseException | None = None
        self._pending: VideoItem | None = None
        self._stop = threading.Event()

    def put(self, item: VideoItem) -> None:
        self.queue.put(item)

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def due(self, now: float) -> VideoItem | None:
        """The newest frame due by ``now`` (older ones due too are skipped), or None when none is."""
        newest = None
        while True:
            item = self._pending if self._pending is not None else self.queue.get_nowait()
            self._pending = None
            if item is None:
                return newest
            if item.due > now:
                self._pending = item
                return newest
            newest = item

    def next_due(self) -> float | None:
        """When the next waiting frame is due (None: none waits)."""
        if self._pending is None:
            self._pending = self.queue.get_nowait()
        return None if self._pending is None else self._pending.due

    def _mark(self, item: VideoItem | None, now: float) -> None:
        self.sent += 1
        self.sent_times.append(now)
        if len(self.sent_times) > 30 * FPS:
            del self.sent_times[:FPS]
        if item is not None:
            self.shown += 1
            if self.on_shown is not None:
                self.on_shown(item, now)

    def fps(self, seconds: float = 5.0) -> float | None:
        """Frames sent per second over the last ``seconds``."""
        times = [t for t in self.sent_times[-int(seconds * FPS * 2):] if t >= time.monotonic() - seconds]
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return (len(times) - 1) / (times[-1] - times[0])


def pyvirtualcam():
    try:
        import pyvirtualcam
    except ImportError:
        raise EDTalkError("the virtual camera needs pyvirtualcam: pip install 'edtalk-live[virtualcam]'") from None
    return pyvirtualcam


class VirtualCamera(FrameOutput):
    """The avatar as a camera: ``pyvirtualcam.Camera(width, height, fps=25, fmt=RGB)``, sent on its own 25 fps clock.

    The camera opens when this is made (no device: an :class:`EDTalkError` saying what the OS needs); frames go
    out from :meth:`start` on, black until the first one is due. ``device``/``backend`` pick a camera
    (pyvirtualcam's names: ``/dev/video2``, ``OBS Virtual Camera``; ``v4l2loopback``, ``obs``,
    ``unitycapture``) or the first that works. :attr:`late` counts ticks that came more than a frame late
    (skipped, so the clock keeps 25 fps on average).
    """

    def __init__(self, width: int, height: int, device: str | None = None, backend: str | None = None,
                 fps: float = FPS, capacity: int = 2 * FPS,
                 on_shown: Callable[[VideoItem, float], None] | None = None):
        super().__init__(capacity, on_shown)
        pvc = pyvirtualcam()
        self.width, self.height, self.fps_target = width, height, fps
        try:
            self.camera = pvc.Camera(width, height, fps, fmt=pvc.PixelFormat.RGB, device=device, backend=backend)
        except (RuntimeError, KeyError, ValueError) as e:
            which = f" {device!r}" if device else ""
            raise EDTalkError(f"cannot open the virtual camera{which}: {' / '.join(str(e).splitlines())} "
                              f"({VIRTUAL_CAMERA_HELP})") from None
        self.device = self.camera.device
        self.late = 0
        self._thread = threading.Thread(target=self._run, name="virtual-camera", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        image = np.zeros((self.height, self.width, 3), np.uint8)
        period = 1.0 / self.fps_target
        t0 = time.monotonic()
        tick = 0
        try:
            while not self._stop.wait(max(0.0, t0 + tick * period - time.monotonic())):
                now = time.monotonic()
                item = self.due(now + period / 2)     # the tick nearest each frame's due time: on time on average
                if item is not None:
                    image = fit(item.image, self.width, self.height)
                self.camera.send(image)
                self._mark(item, now)
                tick += 1
                behind = int((time.monotonic() - (t0 + tick * period)) / period)
                if behind > 0:                  # the thread was held up: skip the ticks missed, keep the clock
                    self.late += behind
                    tick += behind
        except Exception as e:  # noqa: BLE001 - reported by the client
            self.error = e
            logger.error("the virtual camera stopped: %s", e)
        finally:
            self.camera.close()

    def stop(self) -> None:
        super().stop()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


class AvatarWindow(FrameOutput):
    """The avatar in a window (pygame), shown by :meth:`run` on the calling thread (the main thread: macOS needs
    it). Closing the window (or Escape) calls ``on_close``. ``scale`` enlarges small avatars (default: to about
    512 pixels)."""

    def __init__(self, title: str = "edtalk-live", scale: int | None = None, capacity: int = 2 * FPS,
                 on_shown: Callable[[VideoItem, float], None] | None = None,
                 on_close: Callable[[], None] | None = None):
        super().__init__(capacity, on_shown)
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")     # pygame greets on stdout when imported
        try:
            import pygame
        except ImportError:
            raise EDTalkError("the avatar window needs pygame: pip install 'edtalk-live[desktop]'") from None
        self._pygame = pygame
        self.title = title
        self.scale = scale
        self.on_close = on_close

    def run(self) -> None:
        """Show frames as they fall due until :meth:`stop` or the window is closed."""
        pg = self._pygame
        pg.display.init()
        screen = None
        try:
            while not self._stop.is_set():
                for event in pg.event.get():
                    if event.type == pg.QUIT or (event.type == pg.KEYDOWN and event.key == pg.K_ESCAPE):
                        self._stop.set()
                if self._stop.is_set():
                    break
                now = time.monotonic()
                item = self.due(now)
                if item is not None:
                    h, w = item.image.shape[:2]
                    scale = self.scale or max(1, 512 // max(w, h))
                    size = (w * scale, h * scale)
                    if screen is None or screen.get_size() != size:
                        screen = pg.display.set_mode(size)
                        pg.display.set_caption(self.title)
                    surface = pg.surfarray.make_surface(np.ascontiguousarray(item.image.swapaxes(0, 1)))
                    if scale != 1:
                        surface = pg.transform.scale(surface, size)
                    screen.blit(surface, (0, 0))
                    pg.display.flip()
                    self._mark(item, now)
                    continue
                nxt = self.next_due()
                if nxt is None:         # wait for a frame, pumping the window's events every 40 ms meanwhile
                    self._pending = self.queue.get_blocking(1.0 / FPS)
                else:
                    self._stop.wait(min(max(nxt - time.monotonic(), 0.0), 1.0 / FPS))
        finally:
            pg.display.quit()
            if self.on_close is not None:
                self.on_close()
