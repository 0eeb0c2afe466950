"""EDTalk networks in PyTorch, exact to the official checkpoints.

    import edtalk_live.edtalk as edtalk
    model = edtalk.load_model("EDTalk.pt", audio2lip="Audio2Lip.pt")
    src = model.encode(images)                       # [B,3,S,S] in [-1,1]
    frames = model.render(src, lip=lip, pose=pose, exp=exp)
"""

from edtalk_live.edtalk import audio
from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import CheckpointError, EDTalkError, InputError
from edtalk_live.edtalk.model import EDTalkModel, Source, load_model
from edtalk_live.edtalk.motion import Motion

__all__ = ["audio", "CheckpointError", "EDTalkError", "EDTalkModel", "InputError", "ModelConfig", "Motion",
           "Source", "load_model"]
