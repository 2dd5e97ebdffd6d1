"""Small heads of LEGION: the projector (`model.mm_projector`), the [SEG] text projection
(`model.text_hidden_fcs.0`) and the real/fake detector (`prediction_head`)."""

from __future__ import annotations

from torch import nn


def build_projector(*, clip_hidden: int, hidden: int) -> nn.Sequential:
    """Linear(Cv, H) - GELU (exact erf form) - Linear(H, H): [.., Cv] -> [.., H]."""
    return nn.Sequential(
        nn.Linear(clip_hidden, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, hidden)
    )


def build_text_hidden_fcs(*, hidden: int, out_dim: int) -> nn.ModuleList:
    """ModuleList([Linear(H, H) - ReLU - Linear(H, out) - Dropout(0)]): [N, H] -> [N, 256]."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Dropout(0.0))]
    )


def build_detector(*, clip_hidden: int, detector_hidden: int) -> nn.Sequential:
    """Linear(Cv, 2Cv) - ReLU - Linear(2Cv, 2) on the penultimate-layer CLS token: [B, Cv] -> [B, 2]
    (label 1 = real, 0 = fake)."""
    return nn.Sequential(nn.Linear(clip_hidden, detector_hidden), nn.ReLU(), nn.Linear(detector_hidden, 2))
