"""``edtalk-live serve``: load the weights, prepare the avatars, start the WebRTC server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

import edtalk_live.edtalk as edtalk
import edtalk_live.engines as engines
from edtalk_live.avatar.driving import read_clip_motion
from edtalk_live.avatar.prepare import default_avatar
from edtalk_live.avatar.store import AvatarStore
from edtalk_live.edtalk.errors import InputError
from edtalk_live.media.weights import find_weights, load_preset
from edtalk_live.realtime.access import TURN_SECRET_ENV, secret_from_args
from edtalk_live.realtime.rtmp import targets_from_args
from edtalk_live.realtime.server import AvatarServer, ServerSettings

logger = logging.getLogger(__name__)


def build_server(weights_dir: str | Path | None, avatar: str | Path | None = None, backend: str = "auto",
                 device: str | None = None, pose_video: str | Path | None = None,
                 settings: ServerSettings | None = None, avatars_dir: str | Path | None = None,
                 align: bool = True, cache: bool = True, face: int = 0) -> AvatarServer:
    """Everything heavy happens here, before the first connection: model, engines, avatar preparation.

    ``avatar`` is one image, ``avatars_dir`` a folder of images (each prepared once, cached on disk
    by image and weights hash, a bad image skipped with a warning); with neither, the default avatar
    shipped with the package is used. Avatars are prepared by the same code as ``render``'s
    (:mod:`edtalk_live.avatar.prepare`), with the same defaults.
    """
    settings = settings or ServerSettings()
    weights = find_weights(weights_dir)
    weights.require_audio2lip()
    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip)
    if backend == "auto":
        backend = engines.default_backend(device)
    options = {}
    if backend == "onnxruntime":
        options = {"threads": settings.render_threads, "spin": False}
    # process-wide, whatever the backend: the torch ops outside the renderer (lip sync, poses, frames) are
    # small, and a second OpenMP thread would spin after each one (measured: a third of the process's CPU
    # with the ONNX Runtime backend)
    torch.set_num_threads(settings.render_threads)
    renderer = engines.create_renderer(backend, model=model, device=device, **options)
    logger.info("backend: %s", renderer.describe())
    clip = read_clip_motion(renderer, pose_video, align).pose if pose_video else None
    store = AvatarStore(renderer, model.weights_id, engines.cache_dir() if cache else None, align=align, face=face)
    if avatars_dir is not None:
        prepared, failed = store.prepare_dir(avatars_dir, keep_photo=True)
        for file, why in failed.items():
            logger.warning("avatar %s skipped: %s", file, why)
        if not prepared:
            raise InputError(f"{avatars_dir}: none of the images could be used as an avatar")
    else:
        path = Path(avatar) if avatar is not None else default_avatar()
        prepared = {path.stem: store.prepare(path, keep_photo=True)}
    presets = {n: load_preset(p) for n, p in sorted(weights.presets.items())} if model.has_expression else {}
    return AvatarServer(renderer, prepared, presets, settings, clip_poses=clip)


def settings_from_args(args, host: str | None = None, port: int | None = None,
                       behind_supervisor: bool = False) -> ServerSettings:
    """The :class:`ServerSettings` of ``serve``'s command-line arguments (``host``/``port`` override theirs).

    ``behind_supervisor``: a worker of ``serve --workers N``, whose offers all come from the supervisor's
    address: the supervisor applies the per-address offer rate and CORS, the worker only the token check.
    """
    ports = None
    if args.udp_ports:
        try:
            lo, hi = (int(x) for x in args.udp_ports.split("-"))
        except ValueError:
            raise InputError(f"--udp-ports must look like 40000-40100, got {args.udp_ports!r}") from None
        ports = (lo, hi)
    ice, turn = [], []
    turn_secret = getattr(args, "turn_secret", None) or os.environ.get(TURN_SECRET_ENV) or None
    for url in args.ice_server or []:
        entry = {"urls": url}
        if url.startswith(("turn:", "turns:")):
            if turn_secret:                    # credentials made per caller (TURN REST API)
                turn.append(url)
                continue
            if not (args.turn_username and args.turn_credential):
                raise InputError(f"TURN server {url} needs --turn-secret (credentials made per caller), or "
                                 "--turn-username and --turn-credential")
            entry.update(username=args.turn_username, credential=args.turn_credential)
        ice.append(entry)
    return ServerSettings(host=args.host if host is None else host, port=args.port if port is None else port,
                          max_sessions=args.max_sessions, max_viewers=getattr(args, "max_viewers", 32),
                          ice_servers=tuple(ice), udp_ports=ports,
                          inactivity_timeout=args.inactivity_timeout, connect_timeout=args.connect_timeout,
                          render_budget=args.render_budget,
                          max_batch=args.max_batch, render_threads=args.render_threads,
                          audio_prefetch=args.audio_prefetch, token_secret=secret_from_args(args),
                          offer_rate=None if behind_supervisor or not args.offer_rate else args.offer_rate,
                          offer_burst=args.offer_burst,
                          cors_origins=() if behind_supervisor else tuple(args.cors_origin or ()),
                          turn_servers=tuple(turn), turn_secret=turn_secret if turn else None,
                          turn_ttl=getattr(args, "turn_ttl", 3600.0),
                          rtmp_targets=targets_from_args(args))


def server_from_args(args, host: str | None = None, port: int | None = None,
                     behind_supervisor: bool = False) -> AvatarServer:
    """The server ``serve``'s arguments describe, built by :func:`build_server` (a worker of
    ``serve --workers N`` builds its own through here too, on its private ``host``/``port``)."""
    settings = settings_from_args(args, host, port, behind_supervisor)
    return build_server(args.weights, args.avatar, backend=args.backend, device=args.device,
                        pose_video=args.pose_video, settings=settings, avatars_dir=args.avatars,
                        align=not args.no_align)


def serve(args) -> int:
    """``serve`` in one process (``--workers 1``): :mod:`edtalk_live.realtime.workers` runs several."""
    from aiohttp import web

    server = server_from_args(args)
    print(f"serving on http://{args.host}:{args.port}/ (open it in a browser; Ctrl-C stops)", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0
