"""EDTalk networks in PyTorch, exact to the official checkpoints.

    import edtalk
    model = edtalk.load_model("EDTalk.pt", audio2lip="Audio2Lip.pt")
    src = model.encode(images)                       # [B,3,S,S] in [-1,1]
    frames = model.render(src, lip=lip, pose=pose, exp=exp)
"""

from . import audio
from .config import ModelConfig
from .errors import CheckpointError, EDTalkError, InputError
from .model import EDTalkModel, Source, load_model
from .motion import Motion

__all__ = ["audio", "CheckpointError", "EDTalkError", "EDTalkModel", "InputError", "ModelConfig", "Motion",
           "Source", "load_model"]
