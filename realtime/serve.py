"""``edtalk-live serve``: load the weights, prepare the avatars, start the WebRTC server."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import edtalk
import engines
from edtalk.errors import InputError
from edtalk.weights import find_weights, load_preset

from .server import AvatarServer, ServerSettings, prepare_avatar

logger = logging.getLogger(__name__)


def _read_pose_clip(renderer: engines.Renderer, path: str | Path) -> torch.Tensor:
    """Pose coefficients ``[N,6]`` of every frame of a driving clip (read once at start-up)."""
    import numpy as np

    from clients import media

    frames = list(media.iter_video_frames(path, renderer.config.size, fps=25))
    if not frames:
        raise InputError(f"{path}: no video frames")
    images = media.uint8_to_tensor(np.stack(frames))
    return renderer.read_motion(images).pose


def build_server(weights_dir: str | Path, avatar: str | Path | None, backend: str = "torch",
                 device: str | None = None, pose_video: str | Path | None = None,
                 settings: ServerSettings | None = None) -> AvatarServer:
    """Everything heavy happens here, before the first connection: model, engines, avatar encoding."""
    from clients import media

    if avatar is None:
        raise InputError("--avatar is required: a face image filling a square crop")
    weights = find_weights(weights_dir)
    weights.require_audio2lip()
    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip)
    image = media.load_image(avatar, model.config.size)
    renderer = engines.create_renderer(backend, model=model, device=device)
    logger.info("backend: %s", renderer.describe())
    clip = _read_pose_clip(renderer, pose_video) if pose_video else None
    name = Path(avatar).stem
    assets = {name: prepare_avatar(renderer, name, image, clip_poses=clip)}
    presets = {n: load_preset(p) for n, p in sorted(weights.presets.items())} if model.has_expression else {}
    return AvatarServer(renderer, assets, presets, settings or ServerSettings())


def serve(args) -> int:
    from aiohttp import web

    ports = None
    if args.udp_ports:
        try:
            lo, hi = (int(x) for x in args.udp_ports.split("-"))
        except ValueError:
            raise InputError(f"--udp-ports must look like 40000-40100, got {args.udp_ports!r}") from None
        ports = (lo, hi)
    ice = []
    for url in args.ice_server or []:
        entry = {"urls": url}
        if url.startswith(("turn:", "turns:")):
            if not (args.turn_username and args.turn_credential):
                raise InputError(f"TURN server {url} needs --turn-username and --turn-credential")
            entry.update(username=args.turn_username, credential=args.turn_credential)
        ice.append(entry)
    settings = ServerSettings(host=args.host, port=args.port, max_sessions=args.max_sessions, ice_servers=tuple(ice),
                              udp_ports=ports, inactivity_timeout=args.inactivity_timeout,
                              render_budget=args.render_budget, max_batch=args.max_batch)
    server = build_server(args.weights, args.avatar, backend=args.backend, device=args.device,
                          pose_video=args.pose_video, settings=settings)
    print(f"serving on http://{args.host}:{args.port}/ (open it in a browser; Ctrl-C stops)", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0
