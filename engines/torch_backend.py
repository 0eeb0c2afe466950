"""PyTorch backend: CPU fp32, or CUDA fp16 + channels-last + CUDA-graph replay for fixed batch sizes."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch

from edtalk_live.edtalk.model import EDTalkModel
from edtalk_live.edtalk.motion import Motion
from edtalk_live.engines.base import PreparedSource, Renderer, to_uint8_torch

logger = logging.getLogger(__name__)

#: batch sizes for which CUDA graphs are captured; other batches are padded up to the next one
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)


class _GraphedDecoder:
    """A decoder captured in a CUDA graph for one (frame batch, source batch); inputs are copied into static buffers."""

    def __init__(self, decoder: torch.nn.Module, latent: torch.Tensor, feats: Sequence[torch.Tensor]):
        self.latent = latent.clone()
        self.feats = [f.clone() for f in feats]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):                                   # warm-up outside the graph (cuDNN autotune)
                decoder(self.latent, self.feats)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = to_uint8_torch(decoder(self.latent, self.feats))

    def __call__(self, latent: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        self.latent.copy_(latent)
        for dst, src in zip(self.feats, feats, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.out


class TorchRenderer(Renderer):
    """Runs the EDTalk stages with PyTorch.

    On the CPU everything runs in fp32 (exact to the reference). On CUDA the per-frame decoder
    runs in ``dtype`` (fp16 by default) with channels-last memory and, when ``cuda_graphs``, as
    a replayed CUDA graph for each batch size in :data:`GRAPH_BATCHES`; the encoder, motion
    reader, EEM blocks and Audio2Lip (run rarely) stay fp32.
    """

    name = "torch"

    def __init__(self, model: EDTalkModel, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True, channels_last: bool | None = None):
        cuda = torch.device(device).type == "cuda"
        if cuda and not torch.cuda.is_available():
            from edtalk_live.edtalk.errors import InputError

            raise InputError(f"device {device} requested but CUDA is not available")
        super().__init__(model.config, device)
        self.dtype = dtype or (torch.float16 if cuda else torch.float32)
        self.model = model.to(self.device).float().eval()
        self.channels_last = cuda if channels_last is None else channels_last
        dec = self.model.generator.dec
        if self.dtype != torch.float32:
            dec = copy.deepcopy(dec).to(self.dtype)
        if self.channels_last:
            dec = dec.to(memory_format=torch.channels_last)
        self.decoder = dec.eval()
        self.cuda_graphs = cuda and cuda_graphs
        self._graphs: dict[tuple[int, int], _GraphedDecoder] = {}

    def describe(self) -> str:
        extra = ", channels-last" if self.channels_last else ""
        extra += ", CUDA graphs" if self.cuda_graphs else ""
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')}{extra})"

    def _feat(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.dtype)
        return f.contiguous(memory_format=torch.channels_last) if self.channels_last else f

    def _decoder_feats(self, feats: tuple) -> tuple:
        return tuple(self._feat(f) for f in feats)

    # ------------------------------------------------------------ rare stages (fp32)
    @torch.no_grad()
    def _prepare_source(self, image: torch.Tensor) -> PreparedSource:
        src = self.model.encode(image.to(self.device))
        return PreparedSource(src.wa, tuple(src.feats), self.name)

    @torch.no_grad()
    def _expression_feats(self, source: PreparedSource, exp: torch.Tensor) -> tuple:
        gen = self.model.generator
        z = gen.exp_latent(exp.to(self.device))
        return tuple(gen.dec.modulate(source.feats, z))

    @torch.no_grad()
    def _read_motion(self, images: torch.Tensor) -> Motion:
        m = self.model.read_motion(images.to(self.device))
        return self._motion([m.lip, m.pose] + ([] if m.exp is None else [m.exp]))

    @torch.no_grad()
    def _audio_to_lip(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.audio_to_lip(mel.to(self.device)).float().cpu()

    # ------------------------------------------------------------ every frame
    @torch.no_grad()
    def _render(self, wa: torch.Tensor, feats: tuple, lip: torch.Tensor, pose: torch.Tensor,
                exp: torch.Tensor | None, raw: bool) -> torch.Tensor:
        b = lip.shape[0]
        parts = [lip, pose] + ([exp] if exp is not None else [])
        alpha = torch.cat(parts, dim=1).to(self.device)
        latent = self.model.generator.latent(wa, alpha).to(self.dtype)          # [B,D], bases in fp32
        if self.cuda_graphs and not raw and b <= GRAPH_BATCHES[-1]:
            return self._render_graphed(latent, feats, b)
        return self.decoder(latent, feats)

    def _render_graphed(self, latent: torch.Tensor, feats: tuple, b: int) -> torch.Tensor:
        """uint8 frames ``[B,S,S,3]`` on the device, from the CUDA graph captured for this batch (padded up)."""
        bp = next(n for n in GRAPH_BATCHES if n >= b)
        fb = feats[0].shape[0]
        if fb not in (1, b):
            raise AssertionError("source batch must be 1 or the frame batch")
        fbp = 1 if fb == 1 else bp
        if bp != b:
            latent = torch.cat([latent, latent[-1:].expand(bp - b, -1)])
            if fbp != 1:
                feats = tuple(torch.cat([f, f[-1:].expand(bp - b, *f.shape[1:])]) for f in feats)
        key = (bp, fbp)
        if key not in self._graphs:
            logger.info("capturing CUDA graph for batch %d (source batch %d)", bp, fbp)
            self._graphs[key] = _GraphedDecoder(self.decoder, latent, feats)
        out = self._graphs[key](latent, feats)
        return out[:b]

    def close(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
