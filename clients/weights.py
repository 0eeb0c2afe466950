"""``edtalk-live weights download|list``: fetch the official weights into a folder, or show what one holds.

    edtalk-live weights download [--dir DIR] [--revision REV]
    edtalk-live weights list [--dir DIR]

The work (Hub listing, downloads, checks, the report text) is done by :mod:`edtalk_live.media.hub`;
this module prints the report and turns it into the exit code.
"""

from __future__ import annotations

from edtalk_live.edtalk.errors import InputError
from edtalk_live.media import hub

__all__ = ["main_weights"]


def main_weights(args) -> int:
    """``edtalk-live weights download|list``: print the report, return the exit code.

    ``args``: ``action`` (``"download"`` or ``"list"``), ``dir`` (folder or None for the default),
    and for download ``revision`` and ``source`` (both optional, may be absent). Returns 0 on
    success; 1 when a downloaded file failed its checks or a needed file is missing, or when
    ``list`` finds no usable generator. Hub failures raise :class:`EDTalkError` (one line).
    """
    action = getattr(args, "action", None)
    folder = getattr(args, "dir", None)
    if action == "download":
        report = hub.download_weights(folder, revision=getattr(args, "revision", None),
                                      source=getattr(args, "source", None))
        print(report.format())
        return 0 if report.ok else 1
    if action == "list":
        rows = hub.list_weights(folder)
        print(hub.format_weights(rows, folder))
        return 0 if hub.usable(rows) else 1
    raise InputError(f"unknown weights action {action!r} (expected download or list)")
