"""Typed errors. Each carries a one-line, user-facing message naming the file or value at fault."""


class EDTalkError(Exception):
    """Base class of every error the project raises on purpose."""


class CheckpointError(EDTalkError, ValueError):
    """A weight file is missing, unreadable, of the wrong kind or damaged."""


class InputError(EDTalkError, ValueError):
    """A user input (image, audio, video, coefficient tensor, option) cannot be used."""
