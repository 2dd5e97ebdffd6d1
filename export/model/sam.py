"""SAM's image encoder (ViT with windowed attention and decomposed relative positions), prompt encoder and mask
decoder, with segment-anything's module and state-dict names (so the released
`model.grounding_encoder.*` tensors load unchanged). Written for this project; checked against the
`segment-anything` package in tests/test_sam.py.

Only the paths LEGION uses run: the prompt is one [SEG] vector per mask (a sparse token), no points, boxes or
mask inputs, and a single mask (mask token 0, `multimask_output=False`). The unused parameters (point
embeddings, mask downscaling, the other mask tokens' MLPs, the IoU head) still exist so loading stays strict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W] (SAM's, eps 1e-6)."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """lin1 - act - lin2 (GELU in the image encoder, ReLU in the two-way transformer)."""

    def __init__(self, *, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# ---------------------------------------------------------------------------------------------------------------
# Image encoder


def relative_positions(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Rows of the relative-position table for every (query, key) pair along one axis: [q_size, k_size, C].

    SAM stores one table of 2*S-1 rows per axis; row (q - k) + (S - 1) holds the embedding of offset q - k.
    Query and key spans are equal here (windowed or global attention over a square grid)."""
    if q_size != k_size or rel_pos.shape[0] != 2 * q_size - 1:
        raise ValueError(f"relative position table {tuple(rel_pos.shape)} does not fit a span of {q_size}")
    q = torch.arange(q_size, device=rel_pos.device)[:, None]
    k = torch.arange(k_size, device=rel_pos.device)[None, :]
    return rel_pos[q - k + (k_size - 1)]


class Attention(nn.Module):
    """Multi-head attention over a [B, H, W, C] grid with decomposed relative positions."""

    def __init__(self, *, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = self.num_heads
        # [3, B*n, h*w, d]
        qkv = self.qkv(x).reshape(b, h * w, 3, n, -1).permute(2, 0, 3, 1, 4).reshape(3, b * n, h * w, -1)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*n, hw, hw]
        # Decomposed relative positions: attn[(qh,qw),(kh,kw)] += <q, Rh[qh,kh]> + <q, Rw[qw,kw]>
        rh = relative_positions(self.rel_pos_h, h, h)  # [h, h, d]
        rw = relative_positions(self.rel_pos_w, w, w)  # [w, w, d]
        rq = q.reshape(b * n, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)  # [B*n, h, w, kh]
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)  # [B*n, h, w, kw]
        attn = attn.view(b * n, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        attn = attn.view(b * n, h * w, h * w).softmax(dim=-1)
        x = (attn @ v).view(b, n, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> windows [B*nw, window, window, C] after zero-padding H, W up to multiples of window."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of window_partition, dropping the padding: -> [B, H, W, C]."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Block(nn.Module):
    """Pre-norm transformer block; window > 0 attends inside non-overlapping windows, 0 attends globally."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, window: int, grid: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        span = (window, window) if window > 0 else grid
        self.attn = Attention(dim=dim, num_heads=num_heads, input_size=span)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=mlp_dim, act=nn.GELU)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window)
            x = self.attn(x)
            x = window_unpartition(x, self.window, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, *, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, C, g, g] -> [B, g, g, C]


class ImageEncoderViT(nn.Module):
    """[B, 3, 1024, 1024] normalized, padded pixels -> image embedding [B, out_chans, 64, 64]."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        window_size: int,
        global_attn_indexes: tuple[int, ...],
        out_chans: int = 256,
    ):
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch=patch_size, in_chans=3, dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))  # absolute positions
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                window=0 if i in global_attn_indexes else window_size,
                grid=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # [B, g, g, C]
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # [B, out, g, g]


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Fourier features with a fixed random Gaussian matrix (a persistent buffer in the checkpoint)."""

    def __init__(self, *, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the cell centres of an h x w grid: [C, h, w]."""
        h, w = size
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        coords = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # [h, w, 2] (x, y)
        proj = 2 * math.pi * ((2 * coords - 1) @ g)  # [h, w, C/2]
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder. LEGION prompts with text embeddings only: sparse = the [SEG] vectors as one
    token each [N, 1, C], dense = no_mask_embed broadcast to [N, C, 64, 64]."""

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=embed_dim // 2)
        # Point/box embeddings and mask downscaling are unused by LEGION but are part of the checkpoint.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)  # [1, C, 64, 64]

    def forward(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_embeds [N, 1, C] -> (sparse [N, 1, C], dense [N, C, 64, 64])."""
        n = text_embeds.shape[0]
        h, w = self.image_embedding_size
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        return text_embeds, dense


# ---------------------------------------------------------------------------------------------------------------
# Mask decoder


class DecoderAttention(nn.Module):
    """Attention with an optional down-projection of the internal dimension (q/k/v/out_proj)."""

    def __init__(self, *, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.num_heads = num_heads
        internal = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.reshape(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, n, T, d]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = attn.softmax(dim=-1) @ v  # [B, n, Tq, d]
        b, n, t, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, n * d))


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, tokens attend to the image, MLP on tokens, the image attends to the tokens."""

    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim=embedding_dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=2
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim=embedding_dim, mlp_dim=mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=2
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=2
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        """image_embedding, image_pe [B, C, h, w]; point_embedding [B, T, C] -> (tokens [B, T, C], image [B, hw, C])."""
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """Linear layers with ReLU between them (`layers.0 ... layers.{n-1}`)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder, single-mask output (mask token 0; `multimask_output=False`)."""

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ):
        super().__init__()
        self.transformer = TwoWayTransformer(
            depth=depth, embedding_dim=transformer_dim, num_heads=num_heads, mlp_dim=mlp_dim
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(
                input_dim=transformer_dim,
                hidden_dim=transformer_dim,
                output_dim=transformer_dim // 8,
                num_layers=3,
            )
            for _ in range(self.num_mask_tokens)
        )
        # IoU predictions are never used by LEGION (kept for strict loading).
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

    def forward(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
    ) -> torch.Tensor:
        """image_embeddings [1, C, h, w] (shared by all N prompts), image_pe [1, C, h, w],
        sparse [N, T, C], dense [N, C, h, w] -> low-res mask logits of mask token 0: [N, 1, 4h, 4w]."""
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # [1 + M, C]
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        # SAM repeats the image embedding once per prompt (repeat_interleave over a batch of 1 = expand).
        src = image_embeddings.expand(n, -1, -1, -1) + dense_prompt_embeddings  # [N, C, h, w]
        pos = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        mask_token_0 = hs[:, 1, :]  # [N, C]: token 0 is the IoU token
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # [N, C/8, 4h, 4w]
        hyper = self.output_hypernetworks_mlps[0](mask_token_0)  # [N, C/8]
        _, c8, h4, w4 = upscaled.shape
        masks = (hyper.unsqueeze(1) @ upscaled.reshape(b, c8, h4 * w4)).reshape(b, 1, h4, w4)
        return masks


class GroundingEncoder(nn.Module):
    """`model.grounding_encoder`: the three SAM parts (SAM's pixel mean/std are not in the checkpoint and are
    applied by preprocessing)."""

    def __init__(
        self, *, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def build_grounding_encoder(cfg) -> GroundingEncoder:
    """The SAM modules of a LegionConfig."""
    grid = cfg.sam_embedding_hw
    return GroundingEncoder(
        image_encoder=ImageEncoderViT(
            img_size=cfg.sam_image_size,
            patch_size=cfg.sam_patch_size,
            embed_dim=cfg.sam_embed_dim,
            depth=cfg.sam_depth,
            num_heads=cfg.sam_num_heads,
            mlp_dim=cfg.sam_mlp,
            window_size=cfg.sam_window_size,
            global_attn_indexes=tuple(cfg.sam_global_attn_indexes),
            out_chans=cfg.sam_out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=grid,
            input_image_size=(cfg.sam_image_size, cfg.sam_image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
            mlp_dim=cfg.decoder_mlp_dim,
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    )


def postprocess_masks_torch(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    *,
    image_size: int = 1024,
) -> torch.Tensor:
    """Torch reference of SAM's postprocess_masks + threshold: low-res logits [N, 256, 256] (or [N, 1, 256, 256])
    -> bool [N, H, W]. Bilinear (align_corners=False) to 1024x1024, crop to input_size (h', w'), bilinear to
    original_size (H, W), logit > 0. Sizes are (height, width)."""
    x = low_res.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : int(input_size[0]), : int(input_size[1])]
    x = F.interpolate(x, (int(original_size[0]), int(original_size[1])), mode="bilinear", align_corners=False)
    return x[:, 0] > 0
