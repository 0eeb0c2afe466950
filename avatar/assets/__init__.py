"""Files shipped inside the package.

``default_avatar.png``: the default avatar, a 256×256 crop aligned by :mod:`edtalk_live.media.faces` from the
NASA portrait of astronaut Eileen Collins that scikit-image ships as ``skimage.data.astronaut()``
(``skimage/data/astronaut.png``, scikit-image 0.26.0, SHA-256
``88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5``). scikit-image's documentation
says it was downloaded from the NASA Great Images database (https://flic.kr/p/r9qvLn): "No known
copyright restrictions, released into the public domain" (a work of the US government).
``default_avatar.json`` records the transform from that photo to the crop.
"""

from pathlib import Path

__all__ = ["DEFAULT_AVATAR"]

DEFAULT_AVATAR = Path(__file__).with_name("default_avatar.png")
