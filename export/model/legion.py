"""LegionModel: every inference component of LEGION as plain PyTorch modules (the API of docs/FORMAT.md).

Parameter names (this module's state_dict) and where they come from (export/checkpoint.py maps them):

    clip.*                          CLIP directory, `vision_model.*` (layers past the selected one are skipped)
    mm_projector.{0,2}.*            checkpoint `model.mm_projector.*`
    llm.*                           checkpoint `model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`
    text_hidden_fcs.0.{0,2}.*       checkpoint `model.text_hidden_fcs.0.*`
    grounding_encoder.*             checkpoint `model.grounding_encoder.{image_encoder,prompt_encoder,mask_decoder}.*`
    prediction_head.{0,2}.*         detector file (optional)
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import build_clip_vision, clip_penultimate
from .heads import build_detector, build_projector, build_text_hidden_fcs
from .llm import build_llm
from .sam import build_grounding_encoder


class LegionModel(nn.Module):
    """All methods take and return float32 tensors (inputs are cast to the weights' dtype inside)."""

    def __init__(self, cfg, *, with_detector: bool = False, attn_implementation: str = "eager"):
        super().__init__()
        self.cfg = cfg
        self.clip = build_clip_vision(cfg, attn_implementation=attn_implementation)
        self.mm_projector = build_projector(clip_hidden=cfg.clip_hidden_size, hidden=cfg.hidden_size)
        self.llm = build_llm(cfg, attn_implementation=attn_implementation)
        self.text_hidden_fcs = build_text_hidden_fcs(hidden=cfg.hidden_size, out_dim=cfg.out_dim)
        self.grounding_encoder = build_grounding_encoder(cfg)
        self.prediction_head = (
            build_detector(clip_hidden=cfg.clip_hidden_size, detector_hidden=cfg.detector_hidden)
            if with_detector
            else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    @staticmethod
    def _in(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """x in ``module``'s weight dtype: each part casts its own input, so the parts may differ in dtype (the
        export's float64 references cast one graph's modules at a time)."""
        return x.to(next(module.parameters()).dtype)

    def clip_features(self, clip_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, 336, 336] -> (patches [B, 576, Cv], cls [B, Cv]) of hidden_states[-2]."""
        h = clip_penultimate(self.clip, self._in(clip_pixels, self.clip))  # [B, 577, Cv]
        return h[:, 1:].float(), h[:, 0].float()

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, 576, Cv] -> image embeddings [B, 576, H] (mm_projector)."""
        return self.mm_projector(self._in(patches, self.mm_projector)).float()

    def detect(self, cls: torch.Tensor) -> torch.Tensor | None:
        """[B, Cv] -> real/fake logits [B, 2] (index 1 = real), or None when no detector was loaded."""
        if self.prediction_head is None:
            return None
        return self.prediction_head(self._in(cls, self.prediction_head)).float()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> input embeddings [B, S, H] (float32)."""
        return self.llm.model.embed_tokens(ids).float()

    def sam_encode(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """Normalized, padded pixels [B, 3, 1024, 1024] -> image embedding [B, 256, 64, 64]."""
        return self.grounding_encoder.image_encoder(
            self._in(sam_pixels, self.grounding_encoder.image_encoder)
        ).float()

    def seg_prompts(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states [N, H] (final norm, last layer) -> SAM prompt vectors [N, 256] (text_hidden_fcs)."""
        return self.text_hidden_fcs[0](self._in(seg_hidden, self.text_hidden_fcs))

    def mask_head(self, seg_hidden: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """seg_hidden [N, H], image_embedding [1, 256, 64, 64] -> low-res mask logits [N, 256, 256].

        The [SEG] vector is the only (sparse) prompt token, the dense prompt is no_mask_embed, the image
        embedding is shared by the N prompts, and only mask token 0 is read (multimask_output=False)."""
        ge = self.grounding_encoder
        text = self.seg_prompts(seg_hidden)  # [N, 256]
        sparse, dense = ge.prompt_encoder(text.unsqueeze(1))  # [N, 1, 256], [N, 256, 64, 64]
        low_res = ge.mask_decoder(
            image_embeddings=self._in(image_embedding, ge.mask_decoder),
            image_pe=ge.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )  # [N, 1, 256, 256]
        return low_res[:, 0].float()
