"""``edtalk-live prepare``: align a photo (or crop a driving clip) the way the networks expect.

    edtalk-live prepare --image photo.jpg --out face.png [--size 256] [--face N]   # + face.json beside it
    edtalk-live prepare --video clip.mov --out clip.mp4 [--size 256]              # fixed box, 25 fps

The work is done by :mod:`edtalk_live.media.faces` and :mod:`edtalk_live.media.clips`; this module
checks the options, writes the outputs and prints what was found.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS
from edtalk_live.media.clips import prepare_video
from edtalk_live.media.faces import align_file, alignment_json_path, save_alignment_json
from edtalk_live.media.io import atomic_write

__all__ = ["main_prepare"]

_IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def main_prepare(args) -> int:
    """``edtalk-live prepare``: ``args.image`` or ``args.video``, ``args.out``, ``args.size``, ``args.face``.

    An image becomes an aligned crop at ``out`` plus the transform beside it (``face.png`` ->
    ``face.json``); a clip becomes a fixed-box 25 fps mp4. Prints what was found on stdout.
    Raises :class:`InputError` (nothing written) on any problem with the inputs.
    """
    image, video = getattr(args, "image", None), getattr(args, "video", None)
    size = int(getattr(args, "size", None) or 256)
    face = int(getattr(args, "face", None) or 0)
    if (image is None) == (video is None):
        raise InputError("prepare needs exactly one of --image or --video")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"output folder does not exist: {out.parent}")
    if size < 16:
        raise InputError(f"--size must be at least 16, got {size}")
    if video is not None:
        if out.suffix.lower() != ".mp4":
            raise InputError(f"--out must be an .mp4 for a video, got {out}")
        box = prepare_video(video, out, size=size, fps=FPS)
        what = "already cropped, kept whole" if box.already_cropped else \
            "box " + ", ".join(f"{v:.0f}" for v in box.box)
        print(f"face found in {box.faces_found} of {box.frames_sampled} sampled frame(s); {what}")
        print(f"wrote {out} ({size}x{size}, {FPS} fps)")
        return 0
    fmt = _IMAGE_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"--out must be an image ({', '.join(_IMAGE_SUFFIXES)}), got {out}")
    if face < 0:
        raise InputError(f"--face must be 0 or more, got {face}")
    alignment = align_file(image, size=size, face=face)
    if alignment.already_aligned:
        print(f"found {alignment.face_count} face(s); already aligned, used as it is")
    else:
        box = ", ".join(f"{v:.0f}" for v in alignment.box)
        print(f"found {alignment.face_count} face(s); using face {face} (box {box})")
    json_path = alignment_json_path(out)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    atomic_write(out, lambda tmp: Image.fromarray(alignment.crop).save(tmp, format=fmt, **options))
    try:
        save_alignment_json(json_path, alignment, image, size)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    print(f"wrote {out} and {json_path.name}")
    return 0
