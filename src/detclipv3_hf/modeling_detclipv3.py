"""DetCLIPv3: an open-vocabulary detector (this file) with an object captioner (see `DetClipV3ForObjectCaptioning`).

The forward pass reads top to bottom like the architecture figure (ARCHITECTURE.md section 2):

    image  -> backbone -> 4-level projection ---------------------------.
                                                                        v
    concepts -> CLIP text tower (one sentence per concept) -> pixel encoder (deformable self-attention + fusion)
                                                                        v
                                           language-guided query selection (top-k tokens by best concept score)
                                                                        v
                                     object decoder (self-attn, concept cross-attn, deformable cross-attn, FFN)
                                                                        v
                               heads: alignment logits per concept, box deltas (iterative refinement), objectness

Box convention inside the model: `cxcywh` normalised to the un-padded image, in [0, 1].
This file holds modules and outputs only: no tokenisation, no matching, no dataset knowledge.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_convert, box_iou
from transformers import CLIPTextModelWithProjection
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import load_backbone
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_detclipv3 import DetClipV3CaptionerConfig, DetClipV3Config
from .loss_detclipv3 import DetClipV3Criterion, prepare_targets

__all__ = [
    "DetClipV3Captioner",
    "DetClipV3CaptioningOutput",
    "DetClipV3DetectionOutput",
    "DetClipV3ForObjectCaptioning",
    "DetClipV3ObjectLabelsOutput",
    "DetClipV3ForObjectDetection",
    "DetClipV3Model",
    "DetClipV3ModelOutput",
    "DetClipV3PreTrainedModel",
]

# Logit given to padded concept slots: far below any real logit, yet finite in float16 (sigmoid -> 0).
PADDED_CONCEPT_LOGIT = -1e4


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetClipV3DenoisingMeta:
    """Book-keeping of the contrastive denoising queries (DINO) of one training forward.

    Args:
        num_groups: number of denoising groups; each group holds a positive and a negative copy of every box.
        pad_size: boxes per group and polarity (the most boxes any image of the batch has).
        num_queries: total denoising queries, `2 * num_groups * pad_size`, placed before the matching queries.
    """

    num_groups: int = 0
    pad_size: int = 0
    num_queries: int = 0


@dataclass
class DetClipV3ModelOutput(ModelOutput):
    """Outputs of the DetCLIPv3 trunk (`DetClipV3Model`).

    Shapes use B images, Q queries, M concepts (padded), N flattened encoder tokens, D = `config.d_model`,
    L = decoder layers. Boxes are `cxcywh` normalised to the un-padded image.

    Args:
        logits: `(B, Q, M)` alignment logits of the last decoder layer; padded concepts hold `PADDED_CONCEPT_LOGIT`.
            `None` in vocabulary-free mode (no concepts given).
        pred_boxes: `(B, Q, 4)` boxes of the last decoder layer.
        objectness_logits: `(B, Q)` "is an object" logits of the last decoder layer.
        concept_mask: `(B, M)` bool, True for real concepts. `None` in vocabulary-free mode.
        concept_embeds: `(B, M, D)` concept embeddings after the encoder's fusion (what the heads compare against).
        last_hidden_state: `(B, Q, D)` normalised decoder states of the last layer (the captioner's object queries).
        intermediate_logits / intermediate_boxes / intermediate_objectness: every decoder layer's predictions,
            `(L, B, Q, M)`, `(L, B, Q, 4)`, `(L, B, Q)` (the last entry equals the final outputs).
        intermediate_hidden_states: `(L, B, Q, D)` normalised decoder states of every layer.
        encoder_last_hidden_state: `(B, N, D)` pixel-encoder memory (input of every deformable cross-attention).
        encoder_mask: `(B, N)` bool, True for tokens on real pixels.
        spatial_shapes: `(levels, 2)` long, (height, width) of every feature level.
        level_start_index: `(levels,)` long, where each level starts in the flattened memory.
        valid_ratios: `(B, levels, 2)` fraction (width, height) of every level covered by real pixels.
        enc_logits / enc_boxes / enc_objectness: predictions of the encoder proposals that were selected as queries
            (`(B, Q, M)`, `(B, Q, 4)`, `(B, Q)`), supervised in training as DINO's two-stage loss.
        selected_indices: `(B, Q)` long, which encoder tokens were selected as queries.
        denoising_logits / denoising_boxes / denoising_objectness: predictions of every decoder layer for the
            denoising queries (training only), `(L, B, Qdn, M)`, `(L, B, Qdn, 4)`, `(L, B, Qdn)`.
        denoising_meta: how the denoising queries are laid out.
    """

    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    objectness_logits: torch.FloatTensor | None = None
    concept_mask: torch.BoolTensor | None = None
    concept_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    intermediate_logits: torch.FloatTensor | None = None
    intermediate_boxes: torch.FloatTensor | None = None
    intermediate_objectness: torch.FloatTensor | None = None
    intermediate_hidden_states: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_mask: torch.BoolTensor | None = None
    spatial_shapes: torch.LongTensor | None = None
    level_start_index: torch.LongTensor | None = None
    valid_ratios: torch.FloatTensor | None = None
    enc_logits: torch.FloatTensor | None = None
    enc_boxes: torch.FloatTensor | None = None
    enc_objectness: torch.FloatTensor | None = None
    selected_indices: torch.LongTensor | None = None
    denoising_logits: torch.FloatTensor | None = None
    denoising_boxes: torch.FloatTensor | None = None
    denoising_objectness: torch.FloatTensor | None = None
    denoising_meta: DetClipV3DenoisingMeta | None = None


@dataclass
class DetClipV3DetectionOutput(DetClipV3ModelOutput):
    """`DetClipV3ModelOutput` plus the training losses.

    Args:
        loss: weighted sum of every term of `loss_dict` (only when `labels` are given).
        loss_dict: every unweighted loss term by name (`loss_alignment`, `loss_bbox`, `loss_giou`, `loss_objectness`,
            with suffixes `_{i}` for decoder layer i, `_enc` for the encoder proposals, `_dn` for denoising).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Small generic blocks (explicit sizes)
# ----------------------------------------------------------------------------------------------------------------------


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of a probability tensor, clamped so that 0 and 1 stay finite."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of every coordinate of `boxes` (`(..., C)` in [0, 1]) into `(..., C * num_feats)`.

    As DINO's `gen_sineembed_for_position`, with the coordinates kept in their input order.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes.float()[..., None] * scale / dim_t  # (..., C, num_feats)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2).to(boxes.dtype)


class DetClipV3MLP(nn.Module):
    """A plain MLP with ReLU between layers (DETR's `MLP(in, hidden, out, layers)`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DetClipV3DropPath(nn.Module):
    """Stochastic depth on a residual branch (drop the whole branch per sample)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _key_padding_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, K)` bool keep-mask -> additive bias `(B, 1, 1, K)`: 0 where kept, a very negative finite value elsewhere.

    A finite value (not -inf) keeps a fully masked row from turning into NaN.
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class DetClipV3Attention(nn.Module):
    """Multi-head attention on `scaled_dot_product_attention` with separate query / key / value inputs."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim if kv_dim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(kv_dim, embed_dim)
        self.v_proj = nn.Linear(kv_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`query` (B, Lq, E), `key`/`value` (B, Lk, kv_dim); `attention_bias` additive, broadcastable to
        (B, heads, Lq, Lk). Returns (B, Lq, E)."""
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        q = self.q_proj(query).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        if attention_bias is not None:
            attention_bias = attention_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, q_len, -1))


def multi_scale_deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention core (Deformable DETR, Zhu et al. 2021).

    Args:
        value: `(B, N, heads, head_dim)` flattened multi-level values.
        spatial_shapes: (height, width) of each level, in the order they are flattened in `value`.
        sampling_locations: `(B, Q, heads, levels, points, 2)` (x, y) in [0, 1].
        attention_weights: `(B, Q, heads, levels, points)`, normalised over levels x points.

    Returns:
        `(B, Q, heads * head_dim)`.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, h*w, heads, dh) -> (B*heads, dh, h, w)
        level_value = (
            value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        )
        # (B, Q, heads, points, 2) -> (B*heads, Q, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*heads, dh, Q, points)
    # (B, Q, heads, levels, points) -> (B*heads, 1, Q, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2)


class DetClipV3MultiscaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with 2-d (point) or 4-d (box) reference points."""

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(B, Q, D)` queries (position embedding already added).
            reference_points: `(B, Q, levels, 2)` points (x, y) or `(B, Q, levels, 4)` boxes (cx, cy, w, h), in [0, 1]
                of each level's padded extent (i.e. already scaled by the valid ratios).
            value: `(B, N, D)` flattened multi-level memory.
            value_mask: `(B, N)` bool, True on real pixels; padded tokens contribute zeros.
            spatial_shapes: (height, width) of each level.
        """
        batch, num_queries, _ = hidden_states.shape
        value = self.value_proj(value).masked_fill(~value_mask[..., None], 0.0)
        value = value.view(batch, -1, self.num_heads, self.head_dim)
        offsets = self.sampling_offsets(hidden_states).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(hidden_states).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide x by the level's width and y by its height. Dividing by the
            # sizes (instead of building a tensor of them) keeps them symbolic for `torch.export` with dynamic H, W.
            scaled = [
                torch.stack(
                    [offsets[:, :, :, level, :, 0] / width, offsets[:, :, :, level, :, 1] / height], -1
                )
                for level, (height, width) in enumerate(spatial_shapes)
            ]
            locations = reference_points[:, :, None, :, None, :] + torch.stack(scaled, dim=3)
        elif reference_points.shape[-1] == 4:
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / self.num_points * sizes * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}"
            )
        output = multi_scale_deformable_sampling(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class DetClipV3FeedForward(nn.Module):
    """Transformer FFN: linear, activation, dropout, linear."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation = ACT2FN[activation]
        self.activation_dropout = activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.fc1(x))
        x = F.dropout(x, p=self.activation_dropout, training=self.training)
        return self.fc2(x)


# ----------------------------------------------------------------------------------------------------------------------
# Image path: backbone, positions, multi-level projection
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3SinePositionEmbedding(nn.Module):
    """2-d sine position embedding normalised by the real (un-padded) extent of each image (DETR)."""

    def __init__(self, embed_dim: int, temperature: float):
        super().__init__()
        self.num_feats = embed_dim // 2
        self.temperature = temperature

    def forward(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`mask` `(B, H, W)` bool (True = real pixel) -> `(B, D, H, W)`."""
        y_embed = mask.cumsum(1, dtype=torch.float32)
        x_embed = mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * 2 * math.pi
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * 2 * math.pi
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


def freeze_batch_norm(module: nn.Module) -> None:
    """Replaces every `BatchNorm2d` under `module` by a `FrozenBatchNorm2d` with its statistics and affine values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


class DetClipV3ImageEmbedder(nn.Module):
    """Backbone (any `transformers` backbone) + projection of every level to `d_model` + extra stride-2 levels."""

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        self.backbone = load_backbone(config)
        if config.freeze_backbone_batch_norm:
            freeze_batch_norm(self.backbone)
        channels = list(self.backbone.channels)
        d_model = config.d_model
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(config.norm_groups, d_model))
            for c in channels
        )
        extra_in = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            self.input_proj.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, d_model, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(config.norm_groups, d_model),
                )
            )
            extra_in = d_model
        self.num_backbone_levels = len(channels)
        self.position_embedding = DetClipV3SinePositionEmbedding(
            d_model, config.positional_embedding_temperature
        )

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Returns per level: features `(B, D, h, w)`, masks `(B, h, w)` bool, position embeddings `(B, D, h, w)`."""
        feature_maps = list(self.backbone(pixel_values).feature_maps)
        features, masks, positions = [], [], []
        source = None
        for level, proj in enumerate(self.input_proj):
            if level < self.num_backbone_levels:
                source = feature_maps[level]
                feature = proj(source)
            else:
                feature = proj(source)
                source = feature
            mask = F.interpolate(pixel_mask[:, None].float(), size=feature.shape[-2:]).to(torch.bool)[:, 0]
            features.append(feature)
            masks.append(mask)
            positions.append(self.position_embedding(mask, feature.dtype))
        return features, masks, positions


# ----------------------------------------------------------------------------------------------------------------------
# Text path: one embedding per concept
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3ConceptEncoder(nn.Module):
    """CLIP text tower: every concept is one short sentence pooled at its end token, projected, mapped to `d_model`."""

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        self.text_model = CLIPTextModelWithProjection(config.text_config)
        # No bias: a shared offset would add the same vector to every concept and blur them together.
        self.concept_proj = nn.Linear(config.text_config.projection_dim, config.d_model, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`input_ids` `(N, L)` -> `(N, D)`, one row per concept.

        CLIP's text embeddings are compared by cosine: they are L2-normalised (times sqrt(D) so the result has unit
        scale per channel) before the linear map to `d_model`.
        """
        if attention_mask is not None and input_ids.shape[0] > 0:
            # Padding is trailing and the text tower is causal: dropping the columns no concept uses changes nothing
            # but the cost (a 16-token budget is mostly padding for typical 3-6 token concepts).
            length = int(attention_mask.sum(-1).max())
            if not attention_mask[:, length:].any():  # right padding only (left padding is left untouched)
                input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        text_embeds = self.text_model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        text_embeds = F.normalize(text_embeds, dim=-1) * math.sqrt(text_embeds.shape[-1])
        return self.concept_proj(text_embeds)


# ----------------------------------------------------------------------------------------------------------------------
# Pixel encoder: deformable self-attention + vision-language fusion
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3FusionLayer(nn.Module):
    """Vision-language fusion: image tokens attend to the concepts; concepts attend back (when bidirectional).

    As Grounding DINO's feature-enhancer fusion (pre-norm cross-attention, per-channel layer scale, drop-path), but
    over one embedding per concept instead of every prompt token.
    """

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        d_model = config.d_model
        self.bidirectional = config.fusion == "bidirectional"
        self.image_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.concept_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.image_to_concept = DetClipV3Attention(
            d_model, config.encoder_attention_heads, config.attention_dropout
        )
        self.image_scale = nn.Parameter(torch.full((d_model,), config.fusion_layer_scale_init))
        if self.bidirectional:
            self.concept_to_image = DetClipV3Attention(
                d_model, config.encoder_attention_heads, config.attention_dropout
            )
            self.concept_scale = nn.Parameter(torch.full((d_model,), config.fusion_layer_scale_init))
        self.drop_path = DetClipV3DropPath(config.fusion_drop_path)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor,
        concepts: torch.Tensor,
        concept_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`image_tokens` (B, N, D), `image_mask` (B, N), `concepts` (B, M, D), `concept_mask` (B, M)."""
        image_normed = self.image_norm(image_tokens)
        concepts_normed = self.concept_norm(concepts)
        to_concepts = self.image_to_concept(
            image_normed,
            concepts_normed,
            concepts_normed,
            _key_padding_bias(concept_mask, image_tokens.dtype),
        )
        new_image = image_tokens + self.drop_path(self.image_scale * to_concepts)
        if not self.bidirectional:
            return new_image, concepts
        to_image = self.concept_to_image(
            concepts_normed, image_normed, image_normed, _key_padding_bias(image_mask, concepts.dtype)
        )
        return new_image, concepts + self.drop_path(self.concept_scale * to_image)


class DetClipV3EncoderLayer(GradientCheckpointingLayer):
    """Multi-scale deformable self-attention + FFN (post-norm), then vision-language fusion."""

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        d_model = config.d_model
        self.self_attn = DetClipV3MultiscaleDeformableAttention(
            d_model, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points
        )
        self.self_attn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.ffn = DetClipV3FeedForward(
            d_model, config.encoder_ffn_dim, config.activation_function, config.activation_dropout
        )
        self.ffn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.dropout = config.dropout
        self.fusion = DetClipV3FusionLayer(config) if config.fusion != "none" else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        concepts: torch.Tensor | None,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        token_mask: torch.Tensor,
        concept_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended = self.self_attn(
            hidden_states + position_embeddings, reference_points, hidden_states, token_mask, spatial_shapes
        )
        hidden_states = self.self_attn_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden_states = self.ffn_norm(
            hidden_states + F.dropout(self.ffn(hidden_states), self.dropout, self.training)
        )
        if self.fusion is not None and concepts is not None:
            hidden_states, concepts = self.fusion(hidden_states, token_mask, concepts, concept_mask)
        return hidden_states, concepts


# ----------------------------------------------------------------------------------------------------------------------
# Object decoder
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3DecoderLayer(GradientCheckpointingLayer):
    """DINO decoder layer: query self-attention, concept cross-attention, deformable cross-attention, FFN (post-norm)."""

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        d_model = config.d_model
        heads = config.decoder_attention_heads
        self.dropout = config.dropout
        self.self_attn = DetClipV3Attention(d_model, heads, config.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        if config.decoder_concept_cross_attention:
            self.concept_attn = DetClipV3Attention(d_model, heads, config.attention_dropout)
            self.concept_attn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        else:
            self.concept_attn = None
        self.image_attn = DetClipV3MultiscaleDeformableAttention(
            d_model, heads, config.num_feature_levels, config.decoder_n_points
        )
        self.image_attn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.ffn = DetClipV3FeedForward(
            d_model, config.decoder_ffn_dim, config.activation_function, config.activation_dropout
        )
        self.ffn_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)

    def _residual(self, x: torch.Tensor, update: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x + F.dropout(update, self.dropout, self.training))

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        concepts: torch.Tensor | None,
        concept_bias: torch.Tensor | None,
        self_attn_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        q = hidden_states + query_pos
        hidden_states = self._residual(
            hidden_states, self.self_attn(q, q, hidden_states, self_attn_bias), self.self_attn_norm
        )
        if self.concept_attn is not None and concepts is not None:
            update = self.concept_attn(hidden_states + query_pos, concepts, concepts, concept_bias)
            hidden_states = self._residual(hidden_states, update, self.concept_attn_norm)
        update = self.image_attn(
            hidden_states + query_pos, reference_points, memory, memory_mask, spatial_shapes
        )
        hidden_states = self._residual(hidden_states, update, self.image_attn_norm)
        return self._residual(hidden_states, self.ffn(hidden_states), self.ffn_norm)


class DetClipV3AlignmentHead(nn.Module):
    """Contrastive alignment between queries and concepts (GLIP / Grounding DINO style).

    `logits = <W_q q, W_c c> / sqrt(D) * exp(log_scale) + bias`; `bias` starts at the focal-loss prior.
    """

    def __init__(self, d_model: int, prior_prob: float):
        super().__init__()
        self.query_proj = nn.Linear(d_model, d_model)
        self.concept_proj = nn.Linear(d_model, d_model)
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.full((), -math.log((1 - prior_prob) / prior_prob)))
        self.prior_prob = prior_prob

    def forward(
        self, queries: torch.Tensor, concepts: torch.Tensor, concept_mask: torch.Tensor
    ) -> torch.Tensor:
        """`queries` (B, Q, D), `concepts` (B, M, D), `concept_mask` (B, M) -> `(B, Q, M)`; padded -> very negative."""
        q = self.query_proj(queries)
        c = self.concept_proj(concepts)
        logits = (
            torch.einsum("bqd,bmd->bqm", q, c) / math.sqrt(q.shape[-1]) * self.log_scale.exp() + self.bias
        )
        return logits.masked_fill(~concept_mask[:, None, :], PADDED_CONCEPT_LOGIT)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------------


def init_deformable_attention(module: DetClipV3MultiscaleDeformableAttention) -> None:
    """Deformable DETR's initialisation: sampling offsets start on rays around the reference point, uniform
    attention weights, Xavier value / output projections."""
    init.constant_(module.sampling_offsets.weight, 0.0)
    thetas = torch.arange(module.num_heads, dtype=torch.float32) * (2.0 * math.pi / module.num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.num_heads, 1, 1, 2)
    grid = grid.repeat(1, module.num_levels, module.num_points, 1)
    for i in range(module.num_points):
        grid[:, :, i, :] *= i + 1
    init.copy_(module.sampling_offsets.bias, grid.flatten())
    init.constant_(module.attention_weights.weight, 0.0)
    init.constant_(module.attention_weights.bias, 0.0)
    init.xavier_uniform_(module.value_proj.weight)
    init.constant_(module.value_proj.bias, 0.0)
    init.xavier_uniform_(module.output_proj.weight)
    init.constant_(module.output_proj.bias, 0.0)


class DetClipV3InitMixin:
    """Initialises every module of a DetCLIPv3 model, also when it is loaded as Hub remote code.

    `_init_weights` only uses `transformers.initialization`, which already leaves loaded parameters alone. The
    custom-code shortcut of transformers would instead skip every module without parameters of its own (the
    deformable attention, the attention blocks, the input projections) and leave them at PyTorch defaults.
    """

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        super()._initialize_weights(module, is_custom_code=False)


class DetClipV3PreTrainedModel(DetClipV3InitMixin, PreTrainedModel):
    config_class = DetClipV3Config
    config: DetClipV3Config
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = [r"DetClipV3EncoderLayer", r"DetClipV3DecoderLayer"]
    # Every Auto class a saved folder answers to with `trust_remote_code=True` (class names of this file).
    # transformers only writes the saved class's own entry; `save_pretrained` writes them all.
    remote_code_auto_map = {
        "AutoModel": "DetClipV3Model",
        "AutoModelForZeroShotObjectDetection": "DetClipV3ForObjectDetection",
        "AutoModelForImageTextToText": "DetClipV3ForObjectCaptioning",
    }

    # Set by `import detclipv3_hf` to `detclipv3_hf.hub.write_model_card`: this file cannot import the Hub helpers
    # itself (a saved folder ships the model files only, as remote code).
    model_card_writer: Callable[..., Any] | None = None

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, model_card: bool | dict = False, **kwargs
    ) -> None:
        """`PreTrainedModel.save_pretrained`, with the full `auto_map` in `config.json` when saving remote code.

        The package registers the classes with `register_for_auto_class`, so transformers copies the model files
        (configuration, modeling, loss) next to the weights; the folder then loads with `trust_remote_code=True`
        where this package is not installed.

        Args:
            model_card: also write `README.md` (a model card, see `detclipv3_hf.hub.build_model_card`); a dict is
                passed to the card writer as keyword arguments (`eval_results`, `training_info`, `license`, ...).
                Save the processor first so the card can describe it.
        """
        if self.is_remote_code():
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({auto: f"{module}.{name}" for auto, name in self.remote_code_auto_map.items()})
            self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if model_card:
            if self.model_card_writer is None:
                raise RuntimeError(
                    "Writing a model card needs the detclipv3-hf package (`pip install detclipv3-hf`, then "
                    "`import detclipv3_hf`); this model was loaded as remote code without it."
                )
            self.model_card_writer(save_directory, **(model_card if isinstance(model_card, dict) else {}))
        return result

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.init_std
        if isinstance(module, DetClipV3MultiscaleDeformableAttention):
            init_deformable_attention(module)
        elif isinstance(module, DetClipV3Attention):
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.xavier_uniform_(proj.weight)
                init.zeros_(proj.bias)
        elif isinstance(module, DetClipV3FusionLayer):
            init.constant_(module.image_scale, self.config.fusion_layer_scale_init)
            if module.bidirectional:
                init.constant_(module.concept_scale, self.config.fusion_layer_scale_init)
        elif isinstance(module, DetClipV3AlignmentHead):
            # Xavier, not N(0, init_std): with std 0.02 the projected concepts shrink ~100x, their differences vanish
            # from the logits and training stalls in a saddle where every concept scores alike.
            for proj in (module.query_proj, module.concept_proj):
                init.xavier_uniform_(proj.weight)
                init.zeros_(proj.bias)
            init.zeros_(module.log_scale)
            init.constant_(module.bias, -math.log((1 - module.prior_prob) / module.prior_prob))
        elif isinstance(module, DetClipV3Model):
            init.normal_(module.level_embed, std=std)
            init.normal_(module.query_embed.weight, std=std)
            prior_bias = -math.log((1 - self.config.prior_prob) / self.config.prior_prob)
            for head in (module.objectness_head, module.enc_objectness_head):
                init.constant_(head.bias, prior_bias)
            for box_head in list(module.box_heads) + [module.enc_box_head]:
                # Boxes start as their reference box: the refinement deltas begin at zero.
                init.constant_(box_head.layers[-1].weight, 0.0)
                init.constant_(box_head.layers[-1].bias, 0.0)
        elif isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d):
            # Input projections (conv + GroupNorm) as Deformable DETR.
            init.xavier_uniform_(module[0].weight, gain=1.0)
            init.constant_(module[0].bias, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# The trunk
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3Model(DetClipV3PreTrainedModel):
    """The DetCLIPv3 detector trunk: image path, text path, pixel encoder, query selection, decoder and heads."""

    def __init__(self, config: DetClipV3Config):
        super().__init__(config)
        d_model = config.d_model
        self.image_embedder = DetClipV3ImageEmbedder(config)
        self.concept_encoder = DetClipV3ConceptEncoder(config)
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, d_model))
        self.encoder_layers = nn.ModuleList(
            DetClipV3EncoderLayer(config) for _ in range(config.encoder_layers)
        )
        # Query selection (two-stage): encoder tokens -> proposal features, boxes, scores.
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.enc_box_head = DetClipV3MLP(d_model, d_model, 4, 3)
        self.enc_objectness_head = nn.Linear(d_model, 1)
        self.query_embed = nn.Embedding(config.num_queries, d_model)
        # Decoder.
        self.decoder_layers = nn.ModuleList(
            DetClipV3DecoderLayer(config) for _ in range(config.decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)
        self.ref_point_head = DetClipV3MLP(2 * d_model, d_model, d_model, 2)
        self.box_heads = nn.ModuleList(
            DetClipV3MLP(d_model, d_model, 4, 3) for _ in range(config.decoder_layers)
        )
        # Heads shared by every decoder layer and the encoder proposals.
        self.alignment_head = DetClipV3AlignmentHead(d_model, config.prior_prob)
        self.objectness_head = nn.Linear(d_model, 1)
        self.post_init()

    # ------------------------------------------------------------------ concepts
    def embed_concepts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
    ) -> torch.FloatTensor:
        """Encodes concepts one by one.

        Args:
            input_ids: `(B, M, L)` one tokenised concept per row, or `(B, L)` meaning one concept per image.
            attention_mask: same shape as `input_ids`.
            concept_mask: `(B, M)` bool, True for real concepts (padded rows are not encoded and come back as zeros).

        Returns:
            `(B, M, D)` concept embeddings, usable as `concept_embeds` in `forward`.
        """
        input_ids, attention_mask, concept_mask = self._check_concept_ids(
            input_ids, attention_mask, concept_mask
        )
        batch, num_concepts, length = input_ids.shape
        embeds = self.concept_encoder(
            input_ids[concept_mask], attention_mask[concept_mask] if attention_mask is not None else None
        )
        out = embeds.new_zeros(batch, num_concepts, embeds.shape[-1])
        out[concept_mask] = embeds
        return out

    def _check_concept_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        concept_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.LongTensor, got {type(input_ids).__name__}.")
        if input_ids.ndim == 2:  # (B, L): one concept per image, as the stock zero-shot pipeline sends.
            input_ids = input_ids[:, None]
            attention_mask = attention_mask[:, None] if attention_mask is not None else None
        if input_ids.ndim != 3:
            raise ValueError(
                f"input_ids must have shape (batch, concepts, tokens) or (batch, tokens), got {tuple(input_ids.shape)}."
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}."
            )
        max_tokens = self.config.text_config.max_position_embeddings
        if input_ids.shape[-1] > max_tokens:
            raise ValueError(
                f"Concepts of {input_ids.shape[-1]} tokens exceed the text encoder's {max_tokens} positions; "
                f"tokenise each concept on its own (DetClipV3Processor truncates to max_concept_tokens)."
            )
        if concept_mask is None:
            concept_mask = torch.ones(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
        concept_mask = concept_mask.to(torch.bool)
        if concept_mask.shape != input_ids.shape[:2]:
            raise ValueError(
                f"concept_mask shape {tuple(concept_mask.shape)} must be {tuple(input_ids.shape[:2])}."
            )
        self._check_every_image_has_concepts(concept_mask)
        if attention_mask is not None:
            empty = concept_mask & (attention_mask.sum(-1) == 0)
            if empty.any():
                image, concept = empty.nonzero()[0].tolist()
                raise ValueError(
                    f"Concept {concept} of image {image} has no tokens (its attention_mask is all zero)."
                )
        return input_ids, attention_mask, concept_mask

    @staticmethod
    def _check_every_image_has_concepts(concept_mask: torch.Tensor) -> None:
        missing = (~concept_mask.any(-1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"Image(s) {missing} have no concepts; give at least one concept per image.")

    def _resolve_concepts(
        self,
        batch_size: int,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        concept_mask: torch.Tensor | None,
        concept_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Returns `(concepts (B, M, D), concept_mask (B, M))`, or `(None, None)` in vocabulary-free mode."""
        if input_ids is not None and concept_embeds is not None:
            raise ValueError("Give either input_ids or concept_embeds, not both.")
        if concept_embeds is not None:
            if concept_embeds.ndim == 2:  # (M, D): one vocabulary shared by every image.
                concept_embeds = concept_embeds[None].expand(batch_size, -1, -1)
            if concept_embeds.ndim != 3 or concept_embeds.shape[-1] != self.config.d_model:
                raise ValueError(
                    f"concept_embeds must be (batch, concepts, {self.config.d_model}) or (concepts, "
                    f"{self.config.d_model}), got {tuple(concept_embeds.shape)}."
                )
            if concept_mask is None:
                concept_mask = torch.ones(
                    concept_embeds.shape[:2], dtype=torch.bool, device=concept_embeds.device
                )
            concept_mask = concept_mask.to(torch.bool)
            self._check_every_image_has_concepts(concept_mask)
        elif input_ids is not None:
            input_ids, attention_mask, concept_mask = self._check_concept_ids(
                input_ids, attention_mask, concept_mask
            )
            concept_embeds = self.embed_concepts(input_ids, attention_mask, concept_mask)
        else:
            return None, None
        if concept_embeds.shape[0] != batch_size:
            raise ValueError(
                f"Got {batch_size} images but concepts for {concept_embeds.shape[0]}; give one concept list per image."
            )
        return concept_embeds, concept_mask

    # ------------------------------------------------------------------ image path
    def _check_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.FloatTensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}."
            )
        if pixel_values.shape[-1] == 0 or pixel_values.shape[-2] == 0:
            raise ValueError(f"pixel_values has an empty image: shape {tuple(pixel_values.shape)}.")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values.")
        if pixel_mask is None:
            return torch.ones(
                pixel_values.shape[:1] + pixel_values.shape[2:], dtype=torch.bool, device=pixel_values.device
            )
        if pixel_mask.shape != pixel_values.shape[:1] + pixel_values.shape[2:]:
            raise ValueError(
                f"pixel_mask shape {tuple(pixel_mask.shape)} must be (batch, height, width) = "
                f"{tuple(pixel_values.shape[:1] + pixel_values.shape[2:])}."
            )
        return pixel_mask.to(torch.bool)

    def _embed_image(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]], torch.Tensor]:
        """Backbone + projections, flattened: tokens `(B, N, D)`, mask `(B, N)`, positions `(B, N, D)`, the spatial
        shapes and the valid ratios `(B, levels, 2)` (width, height)."""
        features, masks, positions = self.image_embedder(pixel_values, pixel_mask)
        spatial_shapes = [tuple(f.shape[-2:]) for f in features]
        tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
        token_mask = torch.cat([m.flatten(1) for m in masks], dim=1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(positions)], dim=1
        )
        valid_ratios = torch.stack(
            [
                torch.stack([m[:, 0, :].sum(1) / m.shape[2], m[:, :, 0].sum(1) / m.shape[1]], dim=-1)
                for m in masks
            ],
            dim=1,
        ).to(tokens.dtype)
        return tokens, token_mask, pos, spatial_shapes, valid_ratios

    @staticmethod
    def _encoder_reference_points(
        spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor
    ) -> torch.Tensor:
        """Centre of every token, normalised by the real extent of its level: `(B, N, levels, 2)` (Deformable DETR)."""
        points = []
        device, dtype = valid_ratios.device, valid_ratios.dtype
        for level, (height, width) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(
                torch.arange(height, dtype=dtype, device=device) + 0.5,
                torch.arange(width, dtype=dtype, device=device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((xs, ys), -1))
        points = torch.cat(points, 1)
        return points[:, :, None] * valid_ratios[:, None]

    # ------------------------------------------------------------------ encoder
    def _encode(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        concepts: torch.Tensor | None,
        concept_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        reference_points = self._encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.encoder_layers:
            tokens, concepts = layer(
                tokens, concepts, pos, reference_points, token_mask, concept_mask, spatial_shapes
            )
        return tokens, concepts

    # ------------------------------------------------------------------ query selection
    @staticmethod
    def _proposal_anchors(
        token_mask: torch.Tensor, spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One anchor box per token (its cell centre, size 0.05 * 2^level), in logit space, and a validity mask.

        As DINO's `gen_encoder_output_proposals`; anchors of padded tokens or near the border are invalid.
        """
        anchors = []
        device, dtype = valid_ratios.device, valid_ratios.dtype
        for level, (height, width) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(
                torch.arange(height, dtype=dtype, device=device),
                torch.arange(width, dtype=dtype, device=device),
                indexing="ij",
            )
            scale = torch.stack([valid_ratios[:, level, 0] * width, valid_ratios[:, level, 1] * height], -1)
            centers = (torch.stack([xs, ys], -1).reshape(1, -1, 2) + 0.5) / scale[:, None, :]
            sizes = torch.full_like(centers, 0.05 * (2.0**level))
            anchors.append(torch.cat([centers, sizes], -1))
        anchors = torch.cat(anchors, 1)
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & token_mask
        return inverse_sigmoid(anchors), valid

    def _select_queries(
        self,
        memory: torch.Tensor,
        token_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        concepts: torch.Tensor | None,
        concept_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """Language-guided query selection: score every encoder token against every concept, keep the top-k tokens
        by their best concept score (by objectness without concepts). Their boxes become the decoder's anchors."""
        anchors, valid = self._proposal_anchors(token_mask, spatial_shapes, valid_ratios)
        proposals = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        objectness = self.enc_objectness_head(proposals)[..., 0]
        boxes_unact = self.enc_box_head(proposals) + anchors.masked_fill(~valid[..., None], float("inf"))
        logits = None
        if concepts is not None:
            logits = self.alignment_head(proposals, concepts, concept_mask)  # (B, N, M)
            best = logits.max(-1).values
        else:
            best = objectness
        best = best.masked_fill(~valid, float("-inf"))
        num_queries = min(self.config.num_queries, memory.shape[1])
        topk = best.topk(num_queries, dim=1).indices  # (B, Q)

        def gather(x: torch.Tensor) -> torch.Tensor:
            index = topk.view(topk.shape + (1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
            return torch.gather(x, 1, index)

        enc_boxes_unact = gather(boxes_unact)
        return {
            "indices": topk,
            "reference_boxes": enc_boxes_unact.detach().sigmoid(),
            "enc_boxes": enc_boxes_unact.sigmoid(),
            "enc_logits": gather(logits) if logits is not None else None,
            "enc_objectness": gather(objectness[..., None])[..., 0],
        }

    # ------------------------------------------------------------------ denoising (training only)
    def _denoising_queries(
        self,
        labels: list[dict[str, torch.Tensor]],
        concepts: torch.Tensor,
        concept_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, DetClipV3DenoisingMeta] | None:
        """Contrastive denoising queries (DINO, Zhang et al. 2023) built from the ground-truth boxes.

        Each group holds a positive copy (small box noise, should reconstruct the box and its concepts) and a negative
        copy (larger noise, should predict "no object") of every box. The content of a query is the embedding of its
        box's concept, swapped for another concept of the same image with probability `label_noise_ratio / 2`.

        Returns `(content (B, Qdn, D), reference boxes (B, Qdn, 4) cxcywh, meta)` or None when there is no box.
        """
        counts = [int(t["boxes"].shape[0]) for t in labels]
        pad_size = max(counts) if counts else 0
        if pad_size == 0 or self.config.num_denoising == 0:
            return None
        num_groups = max(1, self.config.num_denoising // pad_size)
        batch, _, d_model = concepts.shape
        device, dtype = concepts.device, concepts.dtype
        boxes = torch.zeros(batch, pad_size, 4, device=device, dtype=dtype)
        classes = torch.zeros(batch, pad_size, dtype=torch.long, device=device)
        for i, target in enumerate(labels):
            boxes[i, : counts[i]] = target["boxes"].to(dtype)
            classes[i, : counts[i]] = target["class_labels"]
        # (B, groups, 2, pad, ...): polarity 0 = positive, 1 = negative.
        boxes = boxes[:, None, None].expand(batch, num_groups, 2, pad_size, 4)
        classes = classes[:, None, None].expand(batch, num_groups, 2, pad_size).clone()
        if self.config.label_noise_ratio > 0:
            flip = torch.rand(classes.shape, device=device) < self.config.label_noise_ratio * 0.5
            num_real = concept_mask.sum(-1).clamp(min=1)
            random_classes = (torch.rand(classes.shape, device=device) * num_real[:, None, None, None]).long()
            classes = torch.where(flip, random_classes, classes)
        content = torch.gather(concepts, 1, classes.reshape(batch, -1, 1).expand(-1, -1, d_model))
        # Box noise in corner space: positives move by < half their size, negatives by 1-2x half their size.
        half = boxes[..., 2:] / 2
        corners = torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], -1)
        rand_sign = torch.randint(0, 2, corners.shape, device=device).to(dtype) * 2 - 1
        rand_part = torch.rand(corners.shape, device=device, dtype=dtype)
        rand_part[:, :, 1] += 1.0
        corners = corners + rand_sign * rand_part * torch.cat([half, half], -1) * self.config.box_noise_scale
        corners = corners.clamp(0.0, 1.0)
        noisy = torch.cat(
            [(corners[..., :2] + corners[..., 2:]) / 2, corners[..., 2:] - corners[..., :2]], -1
        )
        noisy = noisy.clamp(min=1e-4)
        meta = DetClipV3DenoisingMeta(
            num_groups=num_groups, pad_size=pad_size, num_queries=2 * num_groups * pad_size
        )
        return content, noisy.reshape(batch, -1, 4), meta

    def _self_attention_bias(
        self, num_queries: int, meta: DetClipV3DenoisingMeta | None, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """Matching queries never see denoising queries; a denoising group sees only itself."""
        if meta is None:
            return None
        dn = meta.num_queries
        total = dn + num_queries
        blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
        blocked[dn:, :dn] = True
        group = 2 * meta.pad_size
        for g in range(meta.num_groups):
            start, end = g * group, (g + 1) * group
            blocked[start:end, :start] = True
            blocked[start:end, end:dn] = True
        bias = torch.zeros(total, total, dtype=dtype, device=device).masked_fill(
            blocked, torch.finfo(dtype).min
        )
        return bias[None, None]

    # ------------------------------------------------------------------ decoder + heads
    def _decode(
        self,
        content: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        token_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        concepts: torch.Tensor | None,
        concept_mask: torch.Tensor | None,
        self_attn_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the decoder with iterative box refinement. Returns normalised hidden states `(L, B, Q, D)` and boxes
        `(L, B, Q, 4)` of every layer."""
        concept_bias = _key_padding_bias(concept_mask, memory.dtype) if concepts is not None else None
        hidden = content
        all_hidden, all_boxes = [], []
        for layer, box_head in zip(self.decoder_layers, self.box_heads):
            ref_input = reference_boxes[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(box_sine_embedding(ref_input[:, :, 0], self.config.d_model // 2))
            hidden = layer(
                hidden,
                query_pos,
                ref_input,
                memory,
                token_mask,
                spatial_shapes,
                concepts,
                concept_bias,
                self_attn_bias,
            )
            normed = self.decoder_norm(hidden)
            boxes = (box_head(normed) + inverse_sigmoid(reference_boxes)).sigmoid()
            all_hidden.append(normed)
            all_boxes.append(boxes)
            reference_boxes = boxes.detach()
        return torch.stack(all_hidden), torch.stack(all_boxes)

    def _predict(
        self, hidden: torch.Tensor, concepts: torch.Tensor | None, concept_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Alignment logits `(..., Q, M)` (None without concepts) and objectness `(..., Q)` for hidden `(..., Q, D)`."""
        objectness = self.objectness_head(hidden)[..., 0]
        if concepts is None:
            return None, objectness
        lead = hidden.shape[:-3]
        flat = hidden.reshape(-1, *hidden.shape[-2:])
        repeat = flat.shape[0] // concepts.shape[0]
        logits = self.alignment_head(flat, concepts.repeat(repeat, 1, 1), concept_mask.repeat(repeat, 1))
        return logits.reshape(*lead, -1, *logits.shape[-2:]), objectness

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
        concept_embeds: torch.FloatTensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetClipV3ModelOutput | tuple:
        """
        Args:
            pixel_values: `(B, 3, H, W)` normalised images (see `DetClipV3ImageProcessor`).
            pixel_mask: `(B, H, W)`, 1 on real pixels, 0 on padding. Defaults to all ones.
            input_ids / attention_mask: `(B, M, L)` one tokenised concept per row, or `(B, L)` for one concept per
                image. Leave out (and `concept_embeds`) for vocabulary-free mode.
            concept_mask: `(B, M)` True for real concepts.
            concept_embeds: `(B, M, D)` or `(M, D)` precomputed `embed_concepts` output, instead of `input_ids`.
            labels: only used to build denoising queries in training (see `DetClipV3ForObjectDetection`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_mask = self._check_pixels(pixel_values, pixel_mask)
        concepts, concept_mask = self._resolve_concepts(
            pixel_values.shape[0], input_ids, attention_mask, concept_mask, concept_embeds
        )
        tokens, token_mask, pos, spatial_shapes, valid_ratios = self._embed_image(pixel_values, pixel_mask)
        memory, concepts = self._encode(
            tokens, token_mask, pos, spatial_shapes, valid_ratios, concepts, concept_mask
        )
        selection = self._select_queries(
            memory, token_mask, spatial_shapes, valid_ratios, concepts, concept_mask
        )

        reference_boxes = selection["reference_boxes"]
        content = self.query_embed.weight[None, : reference_boxes.shape[1]].expand(memory.shape[0], -1, -1)
        denoising = None
        if self.training and self.config.use_denoising and labels is not None and concepts is not None:
            # Validated first (clear errors for malformed boxes / labels instead of a deep traceback here).
            targets = prepare_targets(labels, concepts.shape[1], concepts.device)
            denoising = self._denoising_queries(targets, concepts, concept_mask)
        meta = denoising[2] if denoising is not None else None
        if denoising is not None:
            content = torch.cat([denoising[0], content], 1)
            reference_boxes = torch.cat([denoising[1], reference_boxes], 1)
        self_attn_bias = self._self_attention_bias(
            reference_boxes.shape[1] - (meta.num_queries if meta else 0), meta, memory.dtype, memory.device
        )

        hidden, boxes = self._decode(
            content,
            reference_boxes,
            memory,
            token_mask,
            spatial_shapes,
            valid_ratios,
            concepts,
            concept_mask,
            self_attn_bias,
        )
        logits, objectness = self._predict(hidden, concepts, concept_mask)
        num_dn = meta.num_queries if meta is not None else 0
        output = DetClipV3ModelOutput(
            logits=logits[-1, :, num_dn:] if logits is not None else None,
            pred_boxes=boxes[-1, :, num_dn:],
            objectness_logits=objectness[-1, :, num_dn:],
            concept_mask=concept_mask,
            concept_embeds=concepts,
            last_hidden_state=hidden[-1, :, num_dn:],
            intermediate_logits=logits[:, :, num_dn:] if logits is not None else None,
            intermediate_boxes=boxes[:, :, num_dn:],
            intermediate_objectness=objectness[:, :, num_dn:],
            intermediate_hidden_states=hidden[:, :, num_dn:],
            encoder_last_hidden_state=memory,
            encoder_mask=token_mask,
            spatial_shapes=torch.tensor(spatial_shapes, dtype=torch.long, device=memory.device),
            level_start_index=self._level_start_index(spatial_shapes, memory.device),
            valid_ratios=valid_ratios,
            enc_logits=selection["enc_logits"],
            enc_boxes=selection["enc_boxes"],
            enc_objectness=selection["enc_objectness"],
            selected_indices=selection["indices"],
            denoising_logits=logits[:, :, :num_dn] if (meta is not None and logits is not None) else None,
            denoising_boxes=boxes[:, :, :num_dn] if meta is not None else None,
            denoising_objectness=objectness[:, :, :num_dn] if meta is not None else None,
            denoising_meta=meta,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _level_start_index(spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        sizes = torch.tensor([h * w for h, w in spatial_shapes], dtype=torch.long, device=device)
        return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


# ----------------------------------------------------------------------------------------------------------------------
# Detection head model
# ----------------------------------------------------------------------------------------------------------------------


class DetClipV3ForObjectDetection(DetClipV3PreTrainedModel):
    """DetCLIPv3 open-vocabulary detector: `DetClipV3Model` plus its training losses and a concept cache.

    Give it concepts and it returns, for every query, alignment logits against each concept, a box and an objectness
    logit. Post-process with `DetClipV3Processor.post_process_grounded_object_detection`.
    """

    _keys_to_ignore_on_load_unexpected = [r"^captioner\."]

    def __init__(self, config: DetClipV3Config):
        super().__init__(config)
        self.model = DetClipV3Model(config)
        self.criterion = DetClipV3Criterion(config)
        self._concept_cache: dict[str, torch.Tensor] = {}
        self.post_init()

    # ------------------------------------------------------------------ concept cache
    def embed_concepts(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
        cache_keys: list[list[str]] | list[str] | None = None,
    ) -> torch.FloatTensor:
        """Concept embeddings `(B, M, D)` to pass back as `concept_embeds`.

        Args:
            input_ids / attention_mask / concept_mask: as in `forward`.
            cache_keys: the concept strings, one list per image (or one flat list when B == 1), aligned with the
                real concepts. When given, embeddings are looked up in (and added to) an in-memory cache keyed by the
                string, so a fixed vocabulary is encoded once. The cache is emptied whenever the model is put in
                training mode (its weights may change).
        """
        if cache_keys is None:
            return self.model.embed_concepts(input_ids, attention_mask, concept_mask)
        input_ids, attention_mask, concept_mask = self.model._check_concept_ids(
            input_ids, attention_mask, concept_mask
        )
        if cache_keys and isinstance(cache_keys[0], str):
            cache_keys = [cache_keys]
        flat_keys = [key for keys in cache_keys for key in keys]
        if len(cache_keys) != input_ids.shape[0] or len(flat_keys) != int(concept_mask.sum()):
            raise ValueError(
                f"cache_keys must hold one string per real concept of every image: got {len(flat_keys)} strings for "
                f"{int(concept_mask.sum())} concepts in {input_ids.shape[0]} images."
            )
        rows = concept_mask.nonzero()
        missing = [i for i, key in enumerate(flat_keys) if key not in self._concept_cache]
        if missing:
            miss_rows = rows[missing]
            ids = input_ids[miss_rows[:, 0], miss_rows[:, 1]]
            mask = attention_mask[miss_rows[:, 0], miss_rows[:, 1]] if attention_mask is not None else None
            embeds = self.model.concept_encoder(ids, mask)
            for i, embed in zip(missing, embeds):
                self._concept_cache[flat_keys[i]] = embed.detach()
        out = torch.zeros(*concept_mask.shape, self.config.d_model, dtype=self.dtype, device=input_ids.device)
        out[rows[:, 0], rows[:, 1]] = torch.stack([self._concept_cache[key] for key in flat_keys]).to(
            out.dtype
        )
        return out

    def clear_concept_cache(self) -> None:
        """Forgets every cached concept embedding."""
        self._concept_cache.clear()

    def train(self, mode: bool = True) -> DetClipV3ForObjectDetection:
        if mode:
            self._concept_cache.clear()
        return super().train(mode)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
        concept_embeds: torch.FloatTensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetClipV3DetectionOutput | tuple:
        """
        Args:
            pixel_values, pixel_mask, input_ids, attention_mask, concept_mask, concept_embeds: see `DetClipV3Model`.
            labels: one dict per image with `boxes` `(T, 4)` cxcywh normalised and `class_labels` `(T,)` indexing that
                image's concepts; optionally `positive_map` `(T, M)` bool/float marking every concept positive for each
                box (multi-positive, e.g. a box positive for its phrase and its category). Without concepts
                (vocabulary-free training) only boxes and objectness are supervised.

        Returns:
            `DetClipV3DetectionOutput` (or a tuple with `return_dict=False`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            concept_mask=concept_mask,
            concept_embeds=concept_embeds,
            labels=labels,
            return_dict=True,
        )
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self.criterion(outputs, labels)
        output = DetClipV3DetectionOutput(loss=loss, loss_dict=loss_dict, **outputs)
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# The object captioner (ARCHITECTURE.md section 3)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DetClipV3CaptioningOutput(DetClipV3DetectionOutput):
    """`DetClipV3DetectionOutput` plus what the captioner produced.

    Args:
        caption_logits: `(num_objects, T, vocab)` next-token logits of the object captions of a training forward.
        image_caption_logits: `(B, T, vocab)` next-token logits of the image captions of a training forward.
    """

    caption_logits: torch.FloatTensor | None = None
    image_caption_logits: torch.FloatTensor | None = None


@dataclass
class DetClipV3ObjectLabelsOutput(ModelOutput):
    """Result of `DetClipV3ForObjectCaptioning.generate_object_labels`; post-process with
    `DetClipV3Processor.post_process_object_captioning`.

    Shapes use B images, K selected objects per image, R = `num_return_sequences`, T generated tokens.

    Args:
        pred_boxes: `(B, K, 4)` cxcywh normalised boxes of the selected objects.
        scores: `(B, K)` final score of each object: the OV score in vocabulary-free mode, the detection score (best
            concept probability) with a vocabulary.
        sequences: `(B * K * R, T)` generated token ids (first token = the `[OBJ]` task token), object-major.
        sequences_scores: `(B * K * R,)` mean log-probability per generated token of each sequence.
        objectness: `(B, K)` sigmoid objectness of each object.
        label_likelihood: `(B, K)` exp(mean token log-probability) of the first returned label.
        alignment_scores: `(B, K)` sigmoid alignment between the object and its generated category (vocabulary-free).
        concept_labels: `(B, K)` index of the best concept (with a vocabulary), else None.
        query_indices: `(B, K)` which decoder queries were selected.
    """

    pred_boxes: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    objectness: torch.FloatTensor | None = None
    label_likelihood: torch.FloatTensor | None = None
    alignment_scores: torch.FloatTensor | None = None
    concept_labels: torch.LongTensor | None = None
    query_indices: torch.LongTensor | None = None


class DetClipV3CaptionerLayer(GradientCheckpointingLayer):
    """One captioner block over `[visual queries | text tokens]` (pre-norm).

    Self-attention with a mask where visual queries see only visual queries and text tokens see every visual query
    and the earlier text (causal); deformable cross-attention from the visual queries into the pixel-encoder memory at
    their reference boxes; FFN. Because visual queries never see text, the block runs as two calls that compute exactly
    the masked joint attention: `forward_visual` (text-independent, run once per object) and `forward_text` (which
    reads the visual queries' keys / values and a KV cache of the earlier text).
    """

    def __init__(self, config: DetClipV3CaptionerConfig, num_levels: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.dropout = config.dropout
        self.self_attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.cross_attn = DetClipV3MultiscaleDeformableAttention(
            hidden, config.num_attention_heads, num_levels, config.n_points
        )
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn = DetClipV3FeedForward(hidden, config.intermediate_size, "gelu", 0.0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(q), k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward_visual(
        self,
        visual: torch.Tensor,
        visual_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        image_index: torch.Tensor,
        slot_index: torch.Tensor,
        num_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            visual: `(S, P, H)` P visual queries of each of S sequences; `visual_pos` the same shape.
            reference_boxes: `(S, P, levels, 4)` cxcywh boxes already scaled by the valid ratios.
            memory: `(B, N, H)` projected pixel-encoder memory; `memory_mask` `(B, N)`.
            image_index / slot_index: `(S,)` image of each sequence and its slot among that image's sequences.
            num_slots: most sequences of one image.

        Returns:
            The updated visual queries and the normalised input of the self-attention (the keys / values source that
            text tokens read at this layer).
        """
        normed = self.self_attn_norm(visual)
        q = normed + visual_pos
        attended = self._attend(
            self.q_proj(q), self._heads(self.k_proj(q)), self._heads(self.v_proj(normed)), None
        )
        visual = visual + self._drop(attended)
        # Deformable cross-attention runs per image: scatter sequences into (B, slots * P, H), then gather back.
        seq, points, hidden = visual.shape
        grid = visual.new_zeros(memory.shape[0], num_slots, points, hidden)
        grid[image_index, slot_index] = self.cross_attn_norm(visual) + visual_pos
        refs = reference_boxes.new_full((memory.shape[0], num_slots, points) + reference_boxes.shape[2:], 0.5)
        refs[image_index, slot_index] = reference_boxes
        sampled = self.cross_attn(
            grid.flatten(1, 2), refs.flatten(1, 2), memory, memory_mask, spatial_shapes
        ).view(memory.shape[0], num_slots, points, hidden)
        visual = visual + self._drop(sampled[image_index, slot_index])
        visual = visual + self._drop(self.ffn(self.ffn_norm(visual)))
        return visual, q

    def forward_text(
        self,
        text: torch.Tensor,
        visual_keys_source: torch.Tensor,
        visual_values_source: torch.Tensor,
        text_bias: torch.Tensor,
        cache: Cache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        """`text` `(S, t, H)` new text tokens; `visual_*_source` `(S, P, H)` this layer's visual query inputs;
        `text_bias` additive mask over `[visual | cached text | new text]`."""
        normed = self.self_attn_norm(text)
        k_text, v_text = self._heads(self.k_proj(normed)), self._heads(self.v_proj(normed))
        if cache is not None:
            k_text, v_text = cache.update(k_text, v_text, layer_idx)
        k = torch.cat([self._heads(self.k_proj(visual_keys_source)), k_text], 2)
        v = torch.cat([self._heads(self.v_proj(visual_values_source)), v_text], 2)
        text = text + self._drop(self._attend(self.q_proj(normed), k, v, text_bias))
        return text + self._drop(self.ffn(self.ffn_norm(text)))


class DetClipV3Captioner(DetClipV3InitMixin, PreTrainedModel, GenerationMixin):
    """The object captioner: a Q-Former-like multimodal transformer that writes `phrase|category|parent category` for
    an object (or a caption for an image) from visual queries that read the pixel-encoder memory.

    Generation goes through `GenerationMixin.generate` (greedy, beam search, sampling, KV cache): the visual part is
    computed once by `encode_visual` and passed to `generate` as `visual_states`; the cache holds text keys / values.
    """

    config_class = DetClipV3CaptionerConfig
    config: DetClipV3CaptionerConfig
    base_model_prefix = "captioner"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = [r"DetClipV3CaptionerLayer"]

    def __init__(self, config: DetClipV3CaptionerConfig, memory_dim: int = 256, num_levels: int = 4):
        super().__init__(config)
        hidden = config.hidden_size
        self.memory_proj = nn.Linear(memory_dim, hidden)
        self.object_proj = nn.Linear(memory_dim, hidden)
        self.box_embed = DetClipV3MLP(2 * hidden, hidden, hidden, 2)
        self.image_queries = nn.Embedding(config.num_image_queries, hidden)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, hidden)
        self.layers = nn.ModuleList(
            DetClipV3CaptionerLayer(config, num_levels) for _ in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DetClipV3MultiscaleDeformableAttention):
            init_deformable_attention(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ------------------------------------------------------------------ visual path
    def encode_visual(
        self,
        queries: torch.Tensor | None,
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the visual queries through every layer.

        Args:
            queries: `(S, D)` decoder states of S objects (object captions), or None for the learned image queries
                (image captions, one sequence per entry of `image_index`).
            boxes: `(S, 4)` cxcywh reference box of each sequence (the whole image for image captions).
            image_index: `(S,)` long, the image each sequence belongs to.
            memory / memory_mask / spatial_shapes / valid_ratios: the trunk's pixel-encoder outputs.

        Returns:
            `visual_states` `(S, 2 * layers, P, H)`: per layer the keys source and the values source of the visual
            queries, which is everything text tokens need (pass it to `forward` / `generate`).
        """
        seq = image_index.shape[0]
        if queries is not None:
            visual = self.object_proj(queries)[:, None]  # P = 1
        else:
            visual = self.image_queries.weight[None].expand(seq, -1, -1)
        points = visual.shape[1]
        boxes = boxes[:, None].expand(seq, points, 4)
        visual_pos = self.box_embed(box_sine_embedding(boxes, self.config.hidden_size // 2))
        refs = boxes[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[image_index][:, None]
        slot_index = self._slot_index(image_index, memory.shape[0])
        num_slots = int(slot_index.max()) + 1 if seq else 1
        projected = self.memory_proj(memory)
        sources = []
        for layer in self.layers:
            normed = layer.self_attn_norm(visual)
            visual, keys_source = layer.forward_visual(
                visual,
                visual_pos,
                refs,
                projected,
                memory_mask,
                spatial_shapes,
                image_index,
                slot_index,
                num_slots,
            )
            sources += [keys_source, normed]
        return torch.stack(sources, 1)

    @staticmethod
    def _slot_index(image_index: torch.Tensor, num_images: int) -> torch.Tensor:
        """Position of every sequence among the sequences of its image."""
        one_hot = F.one_hot(image_index, num_images)
        return ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)

    # ------------------------------------------------------------------ text path
    def _text_bias(
        self, num_visual: int, past: int, new: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Text token i (absolute position past + i) sees every visual query and text positions <= past + i."""
        text_pos = torch.arange(past + new, device=device)
        query_pos = torch.arange(past, past + new, device=device)
        blocked = text_pos[None, :] > query_pos[:, None]
        blocked = torch.cat([torch.zeros(new, num_visual, dtype=torch.bool, device=device), blocked], 1)
        return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(
            blocked, torch.finfo(dtype).min
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        visual_states: torch.FloatTensor,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits for `input_ids` `(S, t)` given `visual_states` from `encode_visual`.

        `attention_mask` is accepted for `generate` and unused: the sequences of one call never contain padding before
        their last real token (all start with the task token), and padding after it is ignored by the loss.
        """
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        new = input_ids.shape[1]
        if past + new > self.config.max_position_embeddings:
            raise ValueError(
                f"Captions of {past + new} tokens exceed captioner_config.max_position_embeddings "
                f"({self.config.max_position_embeddings})."
            )
        positions = torch.arange(past, past + new, device=input_ids.device)
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)[None]
        bias = self._text_bias(visual_states.shape[2], past, new, hidden.dtype, hidden.device)
        for i, layer in enumerate(self.layers):
            hidden = layer.forward_text(
                hidden, visual_states[:, 2 * i], visual_states[:, 2 * i + 1], bias, cache, i
            )
        logits = F.linear(self.final_norm(hidden), self.embed_tokens.weight)  # LM head tied to the embeddings
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def caption_loss(
        self, visual_states: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy of `input_ids` `(S, L)` (`[task] tokens... [eos] pad...`). Returns (loss, logits)."""
        logits = self(input_ids[:, :-1], visual_states).logits
        target = input_ids[:, 1:]
        if attention_mask is not None:
            target = target.masked_fill(attention_mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        return loss, logits


def caption_query_assignment(
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    matched_queries: torch.Tensor,
    matched_targets: torch.Tensor,
    iou_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries of one image the captioner learns from, and the ground-truth box whose label each one writes.

    Every Hungarian-matched query writes its box's label. With `iou_threshold`, every other query whose predicted box
    overlaps a ground-truth box by at least that IoU also writes the label of the box it overlaps most: at inference
    every query gets a label, and the one that covers an object best is often not the one matching picked.

    Args:
        pred_boxes: `(Q, 4)` cxcywh predicted boxes; `gt_boxes`: `(T, 4)` cxcywh ground-truth boxes.
        matched_queries / matched_targets: the Hungarian matching of the image (same length).
        iou_threshold: IoU from which an unmatched query counts, or None for matched queries only.

    Returns:
        `(queries, targets)`, matched pairs first, then the extra pairs in query order.
    """
    if iou_threshold is None or gt_boxes.shape[0] == 0:
        return matched_queries, matched_targets
    iou = box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
    best_iou, best_target = iou.max(-1)
    extra = best_iou >= iou_threshold
    extra[matched_queries] = False
    queries = extra.nonzero()[:, 0]
    return torch.cat([matched_queries, queries]), torch.cat([matched_targets, best_target[queries]])


class DetClipV3ForObjectCaptioning(DetClipV3PreTrainedModel, GenerationMixin):
    """DetCLIPv3 with its object captioner: detects objects (with or without a vocabulary) and names each one with a
    hierarchical label `phrase|category|parent category`; also writes image captions.

    The detector part (`model.*`) has exactly the parameter names of `DetClipV3ForObjectDetection`, so a detector
    checkpoint loads here (the captioner is newly initialised) and this checkpoint loads into the detector class (the
    captioner weights are skipped).
    """

    def __init__(self, config: DetClipV3Config):
        super().__init__(config)
        self.model = DetClipV3Model(config)
        self.captioner = DetClipV3Captioner(
            config.captioner_config, config.d_model, config.num_feature_levels
        )
        self.criterion = DetClipV3Criterion(config)
        cap = config.captioner_config
        self.generation_config = GenerationConfig(
            max_new_tokens=cap.max_label_length,
            eos_token_id=cap.eos_token_id,
            pad_token_id=cap.pad_token_id,
            bos_token_id=cap.obj_token_id,
        )
        self.post_init()

    def can_generate(
        self,
    ) -> bool:  # generation runs through `generate_object_labels` / `generate_image_captions`
        return True

    # ------------------------------------------------------------------ helpers
    def _trunk(self, **inputs) -> DetClipV3ModelOutput:
        if self.config.train_detector:
            return self.model(**inputs, return_dict=True)
        with torch.no_grad():
            return self.model(**inputs, return_dict=True)

    def _memory_args(self, outputs: DetClipV3ModelOutput) -> dict:
        return {
            "memory": outputs.encoder_last_hidden_state,
            "memory_mask": outputs.encoder_mask,
            "spatial_shapes": [tuple(s) for s in outputs.spatial_shapes.tolist()],
            "valid_ratios": outputs.valid_ratios,
        }

    def _task_token(self, name: str) -> int:
        token = getattr(self.config.captioner_config, f"{name}_token_id")
        if token is None:
            raise ValueError(
                f"captioner_config.{name}_token_id is not set; build the config with the processor's tokenizer "
                "(see DetClipV3Processor.captioner_token_ids)."
            )
        return token

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
        concept_embeds: torch.FloatTensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetClipV3CaptioningOutput | tuple:
        """Detection forward plus, with `labels`, the captioner's losses.

        Args:
            labels: as `DetClipV3ForObjectDetection`, and per image optionally `caption_ids` `(T, Lc)` (the target
                `[OBJ] phrase|category|parent [eos]` of box t, from `DetClipV3Processor.encode_caption_targets`) with
                `caption_attention_mask`, and `image_caption_ids` `(1, Lc)` with `image_caption_attention_mask`. The
                captioner is fed the decoder states of the queries Hungarian-matched to the boxes.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self._trunk(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            concept_mask=concept_mask,
            concept_embeds=concept_embeds,
            # A frozen detector builds no denoising queries: nothing would learn from them.
            labels=labels if self.config.train_detector else None,
        )
        loss, loss_dict = None, None
        caption_logits = image_caption_logits = None
        if labels is not None:
            loss_dict = {}
            if self.config.train_detector:
                _, loss_dict = self.criterion(outputs, labels)
            if self.config.train_captioner:
                caption_losses, caption_logits, image_caption_logits = self._caption_losses(outputs, labels)
                loss_dict.update(caption_losses)
            weights = self.criterion.weights
            loss = sum(weights[name] * value for name, value in loss_dict.items())
        output = DetClipV3CaptioningOutput(
            loss=loss,
            loss_dict=loss_dict,
            caption_logits=caption_logits,
            image_caption_logits=image_caption_logits,
            **outputs,
        )
        return output if return_dict else output.to_tuple()

    def _caption_losses(
        self, outputs: DetClipV3ModelOutput, labels: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        device = outputs.pred_boxes.device
        num_concepts = outputs.logits.shape[-1] if outputs.logits is not None else None
        targets = prepare_targets(labels, num_concepts, device)
        losses, caption_logits, image_logits = {}, None, None
        memory = self._memory_args(outputs)
        if any("caption_ids" in t for t in labels):
            indices = self.criterion.matcher(
                outputs.pred_boxes, targets, outputs.logits, outputs.objectness_logits
            )
            states, boxes, image_index, ids, masks = [], [], [], [], []
            for b, (src, tgt) in enumerate(indices):
                if "caption_ids" not in labels[b] or len(src) == 0:
                    continue
                matched = len(src)
                src, tgt = caption_query_assignment(
                    outputs.pred_boxes[b].detach(),
                    targets[b]["boxes"],
                    src.to(device),
                    tgt.to(device),
                    self.config.caption_query_iou,
                )
                # The extra queries teach the captioner only: the detector's one-to-one matching trains them to be
                # duplicates that score low, and caption gradients through their states would fight that.
                state = outputs.last_hidden_state[b, src]
                states.append(torch.cat([state[:matched], state[matched:].detach()]))
                boxes.append(outputs.pred_boxes[b, src].detach())
                image_index.append(torch.full_like(src, b))
                ids.append(labels[b]["caption_ids"].to(device)[tgt])
                mask = labels[b].get("caption_attention_mask")
                masks.append(mask.to(device)[tgt] if mask is not None else torch.ones_like(ids[-1]))
            if states:
                visual = self.captioner.encode_visual(
                    torch.cat(states), torch.cat(boxes), torch.cat(image_index), **memory
                )
                losses["loss_caption"], caption_logits = self.captioner.caption_loss(
                    visual, _pad_cat(ids, self.config.captioner_config.pad_token_id), _pad_cat(masks, 0)
                )
        with_image = [b for b, t in enumerate(labels) if "image_caption_ids" in t]
        if with_image:
            image_index = torch.tensor(with_image, dtype=torch.long, device=device)
            full = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).expand(len(with_image), 4)
            visual = self.captioner.encode_visual(None, full, image_index, **memory)
            ids = [labels[b]["image_caption_ids"].to(device).reshape(1, -1) for b in with_image]
            masks = [
                labels[b]
                .get("image_caption_attention_mask", torch.ones_like(ids[i]))
                .to(device)
                .reshape(1, -1)
                for i, b in enumerate(with_image)
            ]
            losses["loss_image_caption"], image_logits = self.captioner.caption_loss(
                visual, _pad_cat(ids, self.config.captioner_config.pad_token_id), _pad_cat(masks, 0)
            )
        return losses, caption_logits, image_logits

    # ------------------------------------------------------------------ inference
    def _generate(
        self,
        visual: torch.Tensor,
        task: str,
        generate_kwargs: dict,
        default_max_new_tokens: int | None = None,
    ) -> Any:
        start = torch.full(
            (visual.shape[0], 1), self._task_token(task), dtype=torch.long, device=visual.device
        )
        config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        if (
            default_max_new_tokens is not None
            and config.max_new_tokens is None
            and config.max_length == GenerationConfig().max_length
        ):
            # No length anywhere: a generation config rebuilt from config.json (a captioning model loaded from a
            # detector folder, as stage 2 does, saves it on) would cut labels at transformers' 20-token default.
            config.max_new_tokens = default_max_new_tokens
        config.update(**generate_kwargs, return_dict_in_generate=True, output_scores=True)
        return self.captioner.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            visual_states=visual,
            generation_config=config,
        )

    @staticmethod
    def _sequence_log_likelihood(generated: Any, eos_token_id: int | None) -> torch.Tensor:
        """Mean log-probability per generated token (up to and including the first end token)."""
        if getattr(generated, "sequences_scores", None) is not None:
            return generated.sequences_scores
        new_tokens = generated.sequences[:, 1:]
        log_probs = torch.stack(generated.scores, 1).float().log_softmax(-1)
        token_lp = log_probs.gather(-1, new_tokens[:, : log_probs.shape[1], None])[..., 0]
        valid = torch.ones_like(token_lp, dtype=torch.bool)
        if eos_token_id is not None:
            is_eos = new_tokens[:, : token_lp.shape[1]] == eos_token_id
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            valid = ~after_eos
        return (token_lp * valid).sum(1) / valid.sum(1).clamp(min=1)

    def _category_alignment(self, sequences: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Sigmoid alignment between each object state `(S, D)` and the text embedding of the category it generated
        (the tokens between the first two `|` separators). Objects without a category get 0."""
        cap = self.config.captioner_config
        text = self.config.text_config
        sep = cap.separator_token_id
        length = self.config.max_concept_tokens
        ids = torch.full(
            (sequences.shape[0], length), text.pad_token_id, dtype=torch.long, device=sequences.device
        )
        mask = torch.zeros_like(ids)
        has_category = torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        if sep is not None:
            for row, seq in enumerate(sequences.tolist()):
                seq = seq[1 : seq.index(cap.eos_token_id) if cap.eos_token_id in seq else len(seq)]
                marks = [i for i, token in enumerate(seq) if token == sep]
                if not marks:
                    continue
                end = marks[1] if len(marks) > 1 else len(seq)
                category = seq[marks[0] + 1 : end][: length - 2]
                if not category:
                    continue
                tokens = [text.bos_token_id, *category, text.eos_token_id]
                ids[row, : len(tokens)] = torch.tensor(tokens, device=ids.device)
                mask[row, : len(tokens)] = 1
                has_category[row] = True
        scores = torch.zeros(sequences.shape[0], device=queries.device, dtype=queries.dtype)
        if has_category.any():
            concept = self.model.concept_encoder(ids[has_category], mask[has_category])
            keep = torch.ones(int(has_category.sum()), 1, dtype=torch.bool, device=ids.device)
            logits = self.model.alignment_head(queries[has_category][:, None], concept[:, None], keep)
            scores[has_category] = logits[:, 0, 0].sigmoid()
        return scores

    @torch.no_grad()
    def generate_object_labels(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        concept_mask: torch.BoolTensor | None = None,
        concept_embeds: torch.FloatTensor | None = None,
        top_k: int = 100,
        **generate_kwargs,
    ) -> DetClipV3ObjectLabelsOutput:
        """Finds objects and generates a hierarchical label for each.

        Without concepts (vocabulary-free): the top-k queries by objectness get a label each, scored by the OV score
        `sigmoid(objectness)^a * likelihood^b * sigmoid(alignment with the generated category)^c` with
        `(a, b, c) = config.ov_score_weights`. With concepts: the top-k detections by best concept probability get a
        label each and keep their detection score. `generate_kwargs` go to `GenerationMixin.generate` (`num_beams`,
        `do_sample`, `use_cache`, `max_new_tokens`, `num_return_sequences`, ...).
        """
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            concept_mask=concept_mask,
            concept_embeds=concept_embeds,
            return_dict=True,
        )
        objectness = outputs.objectness_logits.sigmoid()
        if outputs.logits is not None:
            probs = outputs.logits.sigmoid()
            rank, concept_labels = probs.max(-1)
        else:
            rank, concept_labels = objectness, None
        k = min(top_k, rank.shape[1])
        top = rank.topk(k, dim=1).indices  # (B, K)
        batch = pixel_values.shape[0]
        image_index = torch.arange(batch, device=top.device).repeat_interleave(k)
        states = outputs.last_hidden_state.gather(
            1, top[..., None].expand(-1, -1, outputs.last_hidden_state.shape[-1])
        )
        boxes = outputs.pred_boxes.gather(1, top[..., None].expand(-1, -1, 4))
        visual = self.captioner.encode_visual(
            states.flatten(0, 1), boxes.flatten(0, 1), image_index, **self._memory_args(outputs)
        )
        generated = self._generate(
            visual, "obj", generate_kwargs, self.config.captioner_config.max_label_length
        )
        returns = generated.sequences.shape[0] // visual.shape[0]
        log_likelihood = self._sequence_log_likelihood(generated, self.config.captioner_config.eos_token_id)
        likelihood = log_likelihood.view(batch, k, returns)[..., 0].exp()
        first = generated.sequences.view(batch * k, returns, -1)[:, 0]
        alignment = self._category_alignment(first, states.flatten(0, 1)).view(batch, k)
        top_objectness = objectness.gather(1, top)
        if concept_labels is not None:
            scores = rank.gather(1, top)
            concept_labels = concept_labels.gather(1, top)
        else:
            a, b, c = self.config.ov_score_weights
            scores = top_objectness.pow(a) * likelihood.clamp(0, 1).pow(b) * alignment.pow(c)
        return DetClipV3ObjectLabelsOutput(
            pred_boxes=boxes,
            scores=scores,
            sequences=generated.sequences,
            sequences_scores=log_likelihood,
            objectness=top_objectness,
            label_likelihood=likelihood,
            alignment_scores=alignment,
            concept_labels=concept_labels,
            query_indices=top,
        )

    @torch.no_grad()
    def generate_image_captions(
        self, pixel_values: torch.FloatTensor, pixel_mask: torch.LongTensor | None = None, **generate_kwargs
    ) -> torch.LongTensor:
        """Image-level captions: `(B * num_return_sequences, T)` token ids starting with the `[IMG]` task token.
        Decode with `DetClipV3Processor.batch_decode_labels` (or the tokenizer's `batch_decode`)."""
        outputs = self.model(pixel_values, pixel_mask=pixel_mask, return_dict=True)
        batch = pixel_values.shape[0]
        image_index = torch.arange(batch, device=pixel_values.device)
        full = torch.tensor([0.5, 0.5, 1.0, 1.0], device=pixel_values.device).expand(batch, 4)
        visual = self.captioner.encode_visual(None, full, image_index, **self._memory_args(outputs))
        # Always set: the generation config's own length is the (shorter) label budget.
        generate_kwargs.setdefault("max_new_tokens", self.config.captioner_config.max_caption_length)
        return self._generate(visual, "img", generate_kwargs).sequences


def _pad_cat(rows: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """Concatenates `(n_i, L_i)` tensors along dim 0, right-padding to the longest L."""
    length = max(r.shape[1] for r in rows)
    return torch.cat([F.pad(r, (0, length - r.shape[1]), value=pad_value) for r in rows])
