"""edtalk-live: a real-time streaming talking-face server built on EDTalk.

The repository root is the ``edtalk_live`` package; each top-level folder is one stage of it, and
imports run one way, from the model up to the command line:

    edtalk_live.edtalk      the model: networks, checkpoints, audio features, timing constants
    edtalk_live.media       media I/O (PyAV, images), the weights folder and Hub, face alignment
    edtalk_live.export      PyTorch -> ONNX, one graph per stage; the manifest format
    edtalk_live.engines     one Renderer interface; torch, onnxruntime and tensorrt backends
    edtalk_live.avatar      one path from a photo to a prepared avatar; motion; offline rendering
    edtalk_live.realtime    the aiohttp + aiortc server (and a Python client for it)
    edtalk_live.benchmarks  FPS, latency and capacity measurements
    edtalk_live.clients     the command line (``edtalk-live``)

The model's public API is re-exported here::

    import edtalk_live
    model = edtalk_live.load_model("EDTalk.pt", audio2lip="Audio2Lip.pt")
"""

from edtalk_live.edtalk import audio
from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import CheckpointError, EDTalkError, InputError
from edtalk_live.edtalk.model import EDTalkModel, Source, load_model
from edtalk_live.edtalk.motion import Motion

__version__ = "0.1.0"

__all__ = ["audio", "CheckpointError", "EDTalkError", "EDTalkModel", "InputError", "ModelConfig", "Motion",
           "Source", "load_model"]
