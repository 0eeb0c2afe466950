"""Avatars and offline rendering: one path from a photo to a prepared avatar, motion sources, the renderer of files."""
