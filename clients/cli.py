"""The ``edtalk-live`` command line.

    edtalk-live render --weights DIR --image face.jpg --audio speech.wav --out out.mp4
        [--pose-video clip.mp4 | --still] [--emotion happy | --exp-video clip.mp4]
        [--batch-size N] [--device cpu] [--no-progress] [-v]

User errors (missing or unreadable files, bad options, wrong weights) print one line
``error: ...`` on stderr and return a non-zero exit code, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edtalk_live.edtalk.errors import EDTalkError

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

PROG = "edtalk-live"
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
WEIGHTS_HELP = ("folder with EDTalk.pt or EDTalk_lip_pose.pt, Audio2Lip.pt, predefined_exp_weights/ (default: "
                "$EDTALK_LIVE_WEIGHTS, else ~/.cache/edtalk-live/weights; see `edtalk-live weights download`)")
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talking-face video from a face image and speech, with EDTalk.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    render = commands.add_parser(
        "render",
        help="render an mp4 from a face image and an audio file",
        description="Render a talking-face mp4 (H.264 + AAC, 25 fps) from a face image and speech.",
    )
    render.add_argument(
        "--weights",
        default=None,
        metavar="DIR",
        help=WEIGHTS_HELP,
    )
    render.add_argument("--image", help="a photo with a face: detected and aligned to EDTalk's crop (default: the "
                        "portrait shipped with the package)")
    render.add_argument("--audio", required=True, help="speech: any audio or video file with sound")
    render.add_argument("--out", required=True, help="output .mp4 (written atomically)")
    pose = render.add_mutually_exclusive_group()
    pose.add_argument(
        "--pose-video", metavar="CLIP", help="drive head motion with this video (25 fps, looped)"
    )
    pose.add_argument("--still", action="store_true", help="keep the head pose of the image (the default)")
    exp = render.add_mutually_exclusive_group()
    exp.add_argument("--emotion", metavar="NAME", help="expression preset, e.g. happy (EDTalk.pt only)")
    exp.add_argument(
        "--exp-video", metavar="CLIP", help="drive the expression with this video (EDTalk.pt only)"
    )
    render.add_argument("--intensity", type=float, metavar="X",
                        help="strength of --emotion from 0 (the image's own expression) to 2 (1), as the live "
                        "session option")
    render.add_argument("--low-latency", action="store_true",
                        help="the live low-latency lip sync (40 ms look-ahead, causal smoothing): renders what a "
                        "low_latency session streams")
    render.add_argument("--batch-size", type=int, default=8, metavar="N", help="frames per decoder call (8)")
    render.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (cpu)")
    render.add_argument(
        "--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
        help="inference backend (torch); onnxruntime/tensorrt export the graphs into the cache on first use",
    )
    render.add_argument("--no-align", action="store_true",
                        help="take --image and the clips as given (already aligned crops), only resized")
    render.add_argument("--face", type=int, default=0, metavar="N", help="use the N-th largest face (0)")
    render.add_argument("--paste-back", action="store_true",
                        help="write frames at the photo's size, the generated face blended back into the photo")
    render.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    render.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    render.set_defaults(run=_run_render)

    export = commands.add_parser(
        "export",
        help="export the networks to ONNX, one graph per stage",
        description="Export encoder, motion reader, Audio2Lip, expression features and the per-frame decoder "
        "to ONNX (dynamic batch), check them (onnx.checker, TensorRT operator set) and verify them against "
        "PyTorch with ONNX Runtime.",
    )
    export.add_argument("--weights", metavar="DIR", help=WEIGHTS_HELP)
    export.add_argument("--out", required=True, metavar="DIR", help="folder for the .onnx files and manifest.json")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    export.add_argument("--no-simplify", action="store_true", help="skip graph simplification (onnxslim)")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    export.set_defaults(run=_run_export)

    build = commands.add_parser(
        "build",
        help="build TensorRT engines from an ONNX export",
        description="Build serialized TensorRT engines (cached by GPU, TensorRT version and ONNX hash).",
    )
    build.add_argument("--onnx", required=True, metavar="DIR", help="folder written by `edtalk-live export`")
    build.add_argument("--out", metavar="DIR", help="engine cache folder (default: the user cache)")
    build.add_argument("--fp16", action="store_true", help="allow FP16 kernels (overflow-prone layers stay FP32)")
    build.add_argument("--max-batch", type=int, default=64, metavar="N", help="largest batch of the profile (64)")
    build.set_defaults(run=_run_build)

    serve = commands.add_parser(
        "serve",
        help="start the WebRTC avatar server",
        description="Serve a talking avatar over WebRTC: POST /offer, a browser page at /, /health, /metrics.",
    )
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (8080)")
    serve.add_argument("--max-sessions", type=int, default=8, metavar="N",
                       help="session limit of the whole server (all workers); then 503 (8)")
    serve.add_argument("--max-viewers", type=int, default=32, metavar="N",
                       help="WHEP viewers a server (each worker) sends the avatar to at once; then 503 (32)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes behind the one address, each with its own sessions and model "
                       "(default: one per 2 CPU cores, at least 1, at most 8; 1: a single process)")
    _add_render_arguments(serve)
    serve.add_argument("--audio-prefetch", type=int, default=1, metavar="N",
                       help="audio frames (20 ms) the WebRTC receiver holds before use (1; aiortc's own default: 4)")
    serve.add_argument("--inactivity-timeout", type=float, default=8.0, metavar="S",
                       help="reclaim a session after this many seconds without incoming audio (8)")
    serve.add_argument("--connect-timeout", type=float, default=15.0, metavar="S",
                       help="reclaim a session whose peer has not connected after this many seconds (15)")
    serve.add_argument("--ice-server", action="append", metavar="URL",
                       help="STUN/TURN server for peers behind NAT, e.g. stun:stun.l.google.com:19302 (repeatable)")
    serve.add_argument("--turn-secret", metavar="SECRET",
                       help="the TURN server's shared secret (coturn: static-auth-secret): each caller with a token "
                       "gets its own credentials for the turn: servers, valid --turn-ttl seconds (needs "
                       "--token-secret; default: $EDTALK_LIVE_TURN_SECRET)")
    serve.add_argument("--turn-ttl", type=float, default=3600.0, metavar="S",
                       help="seconds the TURN credentials of --turn-secret stay valid (3600; at least the longest "
                       "call that may need the relay)")
    serve.add_argument("--turn-username", help="fixed username for the TURN servers (without --turn-secret)")
    serve.add_argument("--turn-credential", help="fixed credential for the TURN servers (without --turn-secret)")
    serve.add_argument("--udp-ports", metavar="LO-HI", help="UDP port range for media, e.g. 40000-40100")
    serve.add_argument("--token-secret", metavar="SECRET",
                       help="HS256 secret (32+ bytes): POST /offer then needs 'Authorization: Bearer <JWT>' "
                       "(see `edtalk-live token`); default: $EDTALK_LIVE_TOKEN_SECRET, else no token needed")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without a token secret (anyone reaching it opens sessions)")
    serve.add_argument("--offer-rate", type=float, default=1.0, metavar="PER_S",
                       help="offers a second from one client address, then 429 (1; 0: no limit)")
    serve.add_argument("--offer-burst", type=int, default=5, metavar="N",
                       help="offers one client address may send at once before --offer-rate applies (5)")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="web origin allowed to call the server from its pages, e.g. https://app.example.com "
                       "(repeatable; default: none, only the server's own page)")
    serve.add_argument("--rtmp-target", action="append", metavar="NAME=URL",
                       help="an RTMP receiver sessions may push to, chosen by NAME (session option rtmp), e.g. "
                       "live=rtmp://a.rtmp.youtube.com/live2/KEY (repeatable; more in $EDTALK_LIVE_RTMP_TARGETS, "
                       "space-separated, which keeps stream keys out of ps)")
    serve.set_defaults(run=_run_serve)

    livekit = commands.add_parser(
        "livekit-worker",
        help="play the avatar in LiveKit rooms: an agent server for LiveKit Agents (one per GPU)",
        description="Register an avatar worker (agent name edtalk-avatar) with a LiveKit server: each room it is "
        "dispatched to gets the avatar, speaking the agent's TTS audio (see the README's LiveKit section). Needs "
        "the livekit extra: pip install 'edtalk-live[livekit]'.",
    )
    livekit.add_argument("--url", help="LiveKit server URL, e.g. wss://example.livekit.cloud (default: $LIVEKIT_URL)")
    livekit.add_argument("--api-key", help="LiveKit API key (default: $LIVEKIT_API_KEY)")
    livekit.add_argument("--api-secret", help="LiveKit API secret (default: $LIVEKIT_API_SECRET)")
    _add_model_arguments(livekit)
    _add_render_arguments(livekit)
    livekit.add_argument("--max-streams", type=int, default=8, metavar="N",
                         help="rooms this worker serves at once; then it declines more (8)")
    livekit.add_argument("--load-threshold", type=float, default=0.8, metavar="X",
                         help="load (0-1: the renderer's busy fraction, or streams over --max-streams) at which the "
                         "worker is marked unavailable and gets no more rooms (0.8)")
    livekit.add_argument("--agent-name", default="edtalk-avatar", metavar="NAME",
                         help="agent name rooms dispatch the avatar by (edtalk-avatar)")
    livekit.add_argument("--http-port", type=int, default=8081, metavar="PORT",
                         help="health-check HTTP port (8081; give each worker of a box its own, or 0 for any)")
    livekit.set_defaults(run=_run_livekit_worker)

    token = commands.add_parser(
        "token",
        help="print a bearer token for a server started with --token-secret",
        description="Print a JWT (HS256, audience edtalk-live) that POST /offer accepts until it expires. The "
        "secret comes from --token-secret or $EDTALK_LIVE_TOKEN_SECRET, as serve's.",
    )
    token.add_argument("--token-secret", metavar="SECRET", help="the server's secret (default: "
                       "$EDTALK_LIVE_TOKEN_SECRET)")
    token.add_argument("--ttl", type=float, default=3600.0, metavar="S", help="seconds the token is valid (3600)")
    token.add_argument("--subject", help="who the token is for (its sub claim)")
    token.set_defaults(run=_run_token)

    client = commands.add_parser(
        "client",
        help="talk to a server: an audio file recorded to an mp4, or the microphone with the avatar on screen, "
             "as a virtual camera and the voice on a speaker",
        description="Connect to an edtalk-live server. --audio FILE sends a file in real time and records video + "
        "voice to an mp4 (--out). --mic sends the microphone and plays the returned voice on a speaker, shows the "
        "avatar in a window (--show) and/or as a virtual camera (--virtual-camera) for a video-call app; it "
        "reports the latency and the A/V offset every few seconds and at the end (needs the [desktop] extra; "
        "the virtual camera the [virtualcam] extra). --audio with --speaker, --show or --virtual-camera sends "
        "the file the same way.",
    )
    client.add_argument("--server", default="http://127.0.0.1:8080", help="server URL")
    source = client.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="speech to send (any format PyAV decodes)")
    source.add_argument("--mic", action="store_true", help="send the microphone (sounddevice)")
    source.add_argument("--list-devices", action="store_true", help="list the audio devices and exit")
    client.add_argument("--out", help="recorded .mp4 (H.264 + AAC; --audio without desktop outputs)")
    client.add_argument("--avatar", help="avatar name (see GET /config)")
    client.add_argument("--emotion", help="emotion preset name")
    client.add_argument("--pose", choices=["still", "clip", "idle"], help="pose mode")
    client.add_argument("--token", help="bearer token for a server with a token secret (default: $EDTALK_LIVE_TOKEN)")
    desk = client.add_argument_group("desktop (--mic)")
    desk.add_argument("--mic-device", metavar="DEV",
                      help="microphone: a device number or (part of) a name from --list-devices (default: the "
                      "system's; PulseAudio/PipeWire: 'pulse', the source chosen by $PULSE_SOURCE)")
    desk.add_argument("--speaker", metavar="DEV",
                      help="where the voice plays: a device number or name from --list-devices, or 'none' "
                      "(default with --mic: the system's output; PulseAudio/PipeWire: 'pulse', the sink chosen "
                      "by $PULSE_SINK)")
    desk.add_argument("--show", action="store_true", help="show the avatar in a window (pygame)")
    desk.add_argument("--virtual-camera", nargs="?", const="", default=None, metavar="DEVICE",
                      help="send the avatar to a virtual camera at 25 fps (pyvirtualcam; DEVICE e.g. /dev/video2 "
                      "or 'OBS Virtual Camera'; default: the first one found)")
    desk.add_argument("--camera-backend", metavar="NAME",
                      help="pyvirtualcam backend: v4l2loopback, obs, unitycapture (default: the first that works)")
    desk.add_argument("--camera-size", metavar="WxH",
                      help="virtual camera frame size, the avatar scaled to fit (default: the server's frame size)")
    desk.add_argument("--voice-delay", type=float, default=0.0, metavar="MS",
                      help="shift the voice against the video: positive plays the voice later, negative holds the "
                      "video back (0)")
    desk.add_argument("--jitter-ms", type=float, default=80.0, metavar="MS",
                      help="the voice buffer's target before the voice delay (80)")
    desk.add_argument("--duration", type=float, metavar="S", help="end after S seconds (default: until Ctrl-C)")
    desk.add_argument("--report-every", type=float, default=5.0, metavar="S",
                      help="seconds between latency reports (5)")
    desk.add_argument("--probe", action="store_true",
                      help="measure the video latency and A/V offset exactly: the server paints each frame's index "
                      "into the avatar's top rows (for testing)")
    client.set_defaults(run=_run_client)

    prepare = commands.add_parser(
        "prepare",
        help="align a photo (or crop a driving clip) the way the networks expect",
        description="Detect the face in a photo and warp it onto EDTalk's crop template (writes the crop and a JSON "
        "transform beside it), or crop a driving clip with one fixed box and resample it to 25 fps.",
    )
    what = prepare.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="a photo with one or more faces")
    what.add_argument("--video", help="a driving clip (pose or expression)")
    prepare.add_argument("--out", required=True, help="output image (.png/.jpg) or .mp4")
    prepare.add_argument("--size", type=int, default=256, help="crop size in pixels (256)")
    prepare.add_argument("--face", type=int, default=0, metavar="N", help="use the N-th largest face (0)")
    prepare.set_defaults(run=_run_prepare)

    weights = commands.add_parser(
        "weights",
        help="download or list the official EDTalk weights",
        description="download: fetch the official checkpoints and emotion presets from the Hugging Face Hub "
        "(tanhshuai0219/EDTalk), validate them and place them in the weights folder. list: show what a "
        "weights folder holds.",
    )
    weights.add_argument("action", choices=["download", "list"])
    weights.add_argument("--dir", metavar="DIR", default=None,
                         help="weights folder (default: $EDTALK_LIVE_WEIGHTS, else ~/.cache/edtalk-live/weights)")
    weights.add_argument("--revision", default=None, help="branch, tag or commit of tanhshuai0219/EDTalk (main)")
    weights.add_argument("--source", default=None, help=argparse.SUPPRESS)  # a local folder laid out like the Hub
    weights.set_defaults(run=_run_weights)

    bench = commands.add_parser(
        "bench",
        help="benchmark this machine: frames/s per backend and batch, offline render throughput (--help for options)",
        description="Benchmark this machine; `edtalk-live bench --help` lists the options.",
        add_help=False,
    )
    # the benchmark's own parser reads everything after `bench` (one parser: benchmarks/fps.py's build_parser)
    bench.set_defaults(run=_run_bench, own_arguments=True)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The weights, avatars and backend of a command that runs the real-time engine (``serve``,
    ``livekit-worker``)."""
    parser.add_argument("--weights", metavar="DIR", help=WEIGHTS_HELP)
    avatar = parser.add_mutually_exclusive_group()
    avatar.add_argument("--avatar", metavar="IMAGE", help="the avatar: a photo with a face (default: the "
                        "portrait shipped with the package)")
    avatar.add_argument("--avatars", metavar="DIR", help="a folder of avatar images; sessions pick one by name")
    parser.add_argument("--no-align", action="store_true", help="take avatar images as given (already aligned crops)")
    parser.add_argument("--pose-video", metavar="CLIP", help="driving clip for the 'clip' pose mode")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                        help="inference backend (auto: torch on a CUDA GPU, else onnxruntime, whose graphs are "
                             "exported into the cache on the first start)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def _add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """The frame scheduler's batching and the render budget (``serve``, ``livekit-worker``)."""
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="frames per renderer call (16)")
    parser.add_argument("--render-threads", type=int, default=1, metavar="N",
                        help="CPU threads of the renderer (1: the other cores go to the sessions' media)")
    parser.add_argument("--render-budget", type=float, default=None, metavar="S",
                        help="seconds of output delay reserved for rendering, on top of the lip-sync look-ahead "
                        "(default: measured from the frames rendered so far, 0.1 until then)")


def _run_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import edtalk_live.edtalk as edtalk
    from edtalk_live.export.onnx import export_model
    from edtalk_live.media.weights import find_weights

    weights = find_weights(args.weights)
    model = edtalk.load_model(weights.gen, audio2lip=weights.audio2lip)
    stages = 5 if model.has_expression else 4
    with tqdm(total=stages, desc="export", unit="graph") as bar:
        started: list[str] = []

        def progress(stage: str) -> None:  # called before each stage
            if started:
                bar.update(1)
            started.append(stage)
            bar.set_postfix_str(stage)

        graphs = export_model(model, args.out, opset=args.opset, simplify=not args.no_simplify,
                              verify=not args.no_verify, progress=progress)
        bar.update(bar.total - bar.n)
    cfg = model.config
    print(f"wrote {len(graphs)} graphs to {args.out} ({cfg.family}, {cfg.size}px, opset {args.opset}):")
    for g in graphs:
        err = f"max |ORT - torch| {max(g.max_error.values()):.1e}" if g.max_error else "not verified"
        print(f"  {g.path.name:<18} {g.size_mb:7.1f} MB  inputs {', '.join(g.inputs)}  ({err})")
    return 0


def _run_build(args: argparse.Namespace) -> int:
    from edtalk_live.engines.trt_build import BuildOptions, build_all

    engines = build_all(args.onnx, args.out, BuildOptions(fp16=args.fp16, max_batch=args.max_batch))
    for stage, path in engines.items():
        print(f"  {stage:<12} {path}")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from edtalk_live.clients.prepare import main_prepare  # imports torch: only when used

    return main_prepare(args)


def _run_weights(args: argparse.Namespace) -> int:
    from edtalk_live.clients.weights import main_weights  # imports torch and huggingface_hub: only when used

    return main_weights(args)


def _run_serve(args: argparse.Namespace) -> int:
    from edtalk_live.realtime.access import check_bind, secret_from_args
    from edtalk_live.realtime.rtmp import targets_from_args
    from edtalk_live.realtime.workers import resolve_workers, supervise

    check_bind(args.host, secret_from_args(args), args.insecure)
    targets_from_args(args)         # a bad RTMP target fails now, before the model loads or a worker starts
    if args.offer_rate < 0 or args.offer_burst < 1:
        raise EDTalkError(f"--offer-rate must be >= 0 and --offer-burst >= 1, got {args.offer_rate:g} and "
                          f"{args.offer_burst}")

    workers = resolve_workers(args.workers)
    if workers > 1:
        return supervise(args, workers)
    from edtalk_live.realtime.serve import serve

    return serve(args)


def _run_livekit_worker(args: argparse.Namespace) -> int:
    try:
        from edtalk_live.integrations.livekit_worker import main_worker, worker_settings
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "livekit":
            raise
        raise EDTalkError(f"livekit-worker needs LiveKit Agents ({exc.name} is not installed): "
                          "pip install 'edtalk-live[livekit]'") from None
    settings = worker_settings(args)
    print(f"avatar worker {settings.agent_name!r}: loading the model, then registering with {settings.url} "
          "(Ctrl-C stops)", flush=True)
    return main_worker(args, settings)


def _run_token(args: argparse.Namespace) -> int:
    from edtalk_live.realtime.access import TOKEN_SECRET_ENV, make_token, secret_from_args

    secret = secret_from_args(args)
    if secret is None:
        raise EDTalkError(f"no secret: give --token-secret or set ${TOKEN_SECRET_ENV}")
    print(make_token(secret, args.ttl, args.subject))
    return 0


def _run_client(args: argparse.Namespace) -> int:
    desktop = args.mic or args.show or args.virtual_camera is not None or args.speaker is not None
    if args.list_devices:
        from edtalk_live.clients.sound import list_devices

        print(list_devices())
        return 0
    if desktop:
        if args.out:
            raise EDTalkError("--out records a file's session; with --mic, --speaker, --show or --virtual-camera "
                              "leave it out")
        from edtalk_live.clients.desktop import main_desktop

        return main_desktop(args)
    from edtalk_live.realtime.client import main_client

    return main_client(args)


def _run_bench(args: argparse.Namespace) -> int:
    from edtalk_live.benchmarks.fps import main as bench_main

    try:
        return bench_main(args.arguments, prog=f"{PROG} bench")
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def _run_render(args: argparse.Namespace) -> int:
    from edtalk_live.avatar.render import render_file  # imports torch and the model: only when rendering

    summary = render_file(
        weights_dir=args.weights,
        image=args.image,
        audio=args.audio,
        out=args.out,
        pose_video=args.pose_video,
        still=args.still,
        emotion=args.emotion,
        exp_video=args.exp_video,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        backend=args.backend,
        align=not args.no_align,
        face=args.face,
        paste_back=args.paste_back,
        intensity=args.intensity,
        low_latency=args.low_latency,
    )
    print(
        f"wrote {summary.out}: {summary.frames} frames, {summary.seconds:.2f} s at {summary.fps} fps "
        f"({summary.family}, {summary.elapsed:.1f} s)"
    )
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _oserror_message(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 on success)."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if getattr(args, "own_arguments", False):   # a command with its own parser (bench) gets the rest
            args.arguments = rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # argparse has printed usage or help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "own_arguments", False):   # bench sets up its own logging, as when run as a module
        level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if args.verbose == 0:   # the Hub client logs every retry; our own one-line error says what matters
            logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except EDTalkError as exc:
        logger.debug("user error", exc_info=True)
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
    except OSError as exc:  # disk full, permission denied, ... at the edges
        logger.debug("OS error", exc_info=True)
        print(f"error: {_one_line(_oserror_message(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
