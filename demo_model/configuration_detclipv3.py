"""DetCLIPv3 configuration.

One composite config: the detector's hyper-parameters live flat on `DetClipV3Config`, the three components
with their own width live in sub-configs (`backbone_config`, `text_config`, `captioner_config`). Training
knobs (stages, freezing, learning-rate multipliers, resolution) are not here: they live in
`detclipv3_hf.training.StageSpec`.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPTextConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

__all__ = ["DetClipV3CaptionerConfig", "DetClipV3Config"]


@strict
class DetClipV3CaptionerConfig(PreTrainedConfig):
    r"""Configuration of the object captioner (the Q-Former-like generative head of DetCLIPv3).

    Args:
        hidden_size (`int`, defaults to 256):
            Width of the captioner blocks, token embeddings and visual queries.
        num_hidden_layers (`int`, defaults to 6):
            Number of captioner blocks (masked self-attention, deformable cross-attention, FFN).
        num_attention_heads (`int`, defaults to 8):
            Heads of the self-attention and of the deformable cross-attention.
        intermediate_size (`int`, defaults to 1024):
            Hidden size of the FFN.
        num_image_queries (`int`, defaults to 16):
            Learned visual queries used for image-level captions (their reference box is the whole image).
        max_label_length (`int`, defaults to 24):
            Maximum number of generated tokens for an object label (`phrase|category|parent category`).
        max_caption_length (`int`, defaults to 64):
            Maximum number of generated tokens for an image caption.
        n_points (`int`, defaults to 4):
            Sampling points per head and level of the deformable cross-attention.
        dropout (`float`, defaults to 0.0):
            Dropout on residual branches.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms.
        max_position_embeddings (`int`, defaults to 128):
            Learned positions for text tokens (must cover `max_caption_length + 1`).
        vocab_size (`int`, *optional*):
            Size of the token embedding table; `None` means "the text encoder's vocabulary" and is filled in by
            `DetClipV3Config` (the processor adds `[OBJ]` / `[IMG]` and resizes it).
        obj_token_id / img_token_id / bos_token_id / eos_token_id / pad_token_id (`int`, *optional*):
            Special token ids; filled from the tokenizer by `DetClipV3Processor`.
        separator_token_id (`int`, *optional*):
            Id of the `|` token that separates phrase, category and parent category; the vocabulary-free OV score
            reads the generated category between the first two separators.
    """

    model_type = "detclipv3_captioner"
    base_config_key = "captioner_config"

    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    num_image_queries: int = 16
    max_label_length: int = 24
    max_caption_length: int = 64
    n_points: int = 4
    dropout: float | int = 0.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 128
    vocab_size: int | None = None
    obj_token_id: int | None = None
    img_token_id: int | None = None
    separator_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"captioner_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        for name in ("num_hidden_layers", "num_image_queries", "max_label_length", "n_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"captioner_config.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_position_embeddings < max(self.max_label_length, self.max_caption_length) + 1:
            raise ValueError(
                "captioner_config.max_position_embeddings must cover the task token plus the longest "
                f"generation (max({self.max_label_length}, {self.max_caption_length}) + 1), got "
                f"{self.max_position_embeddings}."
            )


@strict
class DetClipV3Config(PreTrainedConfig):
    r"""Configuration of DetCLIPv3 (Yao et al., CVPR 2024): an open-vocabulary detector with an object captioner.

    Defaults reproduce the Swin-T model of the paper. Every choice not fixed by the paper is a field here, with the
    default we picked (see ARCHITECTURE.md, "[decision]").

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Any `transformers` backbone config (Swin, ResNet, ConvNeXt, timm). Defaults to Swin-T (embed 96, depths
            2-2-6-2, heads 3-6-12-24, window 7) with stages 2-4 as outputs. Only its config is used here: building the
            model never downloads anything.
        freeze_backbone_batch_norm (`bool`, defaults to `False`):
            Replace the backbone's `BatchNorm2d` layers by frozen ones (`torchvision.ops.FrozenBatchNorm2d`: the
            running statistics and affine parameters of the checkpoint, never updated), as DETR-family detectors do
            with ImageNet ResNets trained at a few images per GPU. No effect on backbones without batch norm (Swin).
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower that encodes every concept on its own. Defaults to the ViT-B/32 CLIP text model
            (width 512, 12 layers, projection 512).
        captioner_config (`dict` or `DetClipV3CaptionerConfig`, *optional*):
            The object captioner (used by `DetClipV3ForObjectCaptioning`).
        d_model (`int`, defaults to 256):
            Width of the pixel encoder, fusion, decoder and heads. Concept embeddings are mapped to it.
        num_feature_levels (`int`, defaults to 4):
            Feature levels seen by the deformable attention: the backbone outputs plus extra stride-2 levels.
        encoder_layers / decoder_layers (`int`, defaults to 6):
            Depth of the pixel encoder and of the object decoder.
        encoder_attention_heads / decoder_attention_heads (`int`, defaults to 8):
            Attention heads (deformable and standard).
        encoder_ffn_dim / decoder_ffn_dim (`int`, defaults to 2048):
            FFN hidden sizes.
        encoder_n_points / decoder_n_points (`int`, defaults to 4):
            Sampling points per head and level of the multi-scale deformable attention.
        num_queries (`int`, defaults to 900):
            Queries kept by language-guided query selection (the most objects one image can yield).
        max_concept_tokens (`int`, defaults to 16):
            Maximum tokens of one concept (DetCLIPv2), including start and end tokens.
        fusion (`"bidirectional" | "image_only" | "none"`, defaults to `"bidirectional"`):
            Vision-language fusion after every encoder layer: image tokens attend to the concepts and (when
            bidirectional) the concepts attend back to the image tokens.
        fusion_drop_path (`float`, defaults to 0.1):
            Drop-path rate on the fusion residuals (Grounding DINO's feature enhancer).
        fusion_layer_scale_init (`float`, defaults to 1e-4):
            Initial value of the per-channel layer scale on the fusion residuals.
        decoder_concept_cross_attention (`bool`, defaults to `True`):
            Whether each decoder layer has a cross-attention from the queries to the concept embeddings.
        activation_function (`str`, defaults to `"relu"`):
            FFN activation.
        dropout / attention_dropout / activation_dropout (`float`):
            Dropout rates.
        layer_norm_eps (`float`, defaults to 1e-5):
            Layer-norm epsilon.
        norm_groups (`int`, defaults to 32):
            Groups of the GroupNorm in the input projections (must divide `d_model`).
        positional_embedding_temperature (`float`, defaults to 20):
            Temperature of the sine positional embeddings (DINO).
        init_std (`float`, defaults to 0.02):
            Standard deviation of the normal initialiser.
        prior_prob (`float`, defaults to 0.01):
            Prior probability that sets the initial bias of the alignment and objectness logits (focal-loss init).
        class_cost / bbox_cost / giou_cost (`float`, defaults to 2.0 / 5.0 / 2.0):
            Hungarian matching costs.
        alignment_loss_coefficient / bbox_loss_coefficient / giou_loss_coefficient / objectness_loss_coefficient
            (`float`, defaults to 1.0 / 5.0 / 2.0 / 1.0): loss weights.
        caption_loss_coefficient / image_caption_loss_coefficient (`float`, defaults to 1.0 / 1.0):
            Weights of the captioner's next-token losses.
        focal_alpha / focal_gamma (`float`, defaults to 0.25 / 2.0):
            Sigmoid focal loss parameters (alignment and objectness).
        auxiliary_loss (`bool`, defaults to `True`):
            Whether every decoder layer and the encoder proposals are supervised.
        use_denoising (`bool`, defaults to `True`):
            Contrastive denoising queries (DINO) during training.
        num_denoising (`int`, defaults to 100):
            Denoising queries per image budget (split into groups of positive + negative copies of every box).
        label_noise_ratio (`float`, defaults to 0.5):
            Probability that a denoising query carries another concept of the image as its content.
        box_noise_scale (`float`, defaults to 1.0):
            Scale of the box noise of denoising queries.
        ov_score_weights (`tuple[float, float, float]`, defaults to `(1.0, 0.5, 1.0)`):
            Exponents of objectness, generation likelihood and detector alignment in the vocabulary-free OV score
            `sigmoid(objectness)^a * likelihood^b * sigmoid(alignment)^c` (geometric combination).
        train_detector / train_captioner (`bool`, defaults to `True`):
            Which parts of `DetClipV3ForObjectCaptioning` receive gradients in its forward.
        caption_query_iou (`float`, *optional*, defaults to 0.5):
            The captioner learns from the Hungarian-matched queries and, when set, also from every other query whose
            predicted box overlaps a ground-truth box by at least this IoU (it writes that box's label; no gradient
            reaches the detector through these extra queries). At inference every query gets a label, and the best
            box of an object is often a query matching did not pick: on the learnability benchmark 0.5 raises
            vocabulary-free category accuracy from 0.707 to 0.772. `None`: matched queries only.
    """

    model_type = "detclipv3"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="swin",
            init_kwargs={
                "embed_dim": 96,
                "depths": [2, 2, 6, 2],
                "num_heads": [3, 6, 12, 24],
                "window_size": 7,
                "out_indices": [2, 3, 4],
            },
        ),
        "text_config": SubConfigSpec(config_class=CLIPTextConfig),
        "captioner_config": SubConfigSpec(config_class=DetClipV3CaptionerConfig),
    }
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    backbone_config: dict | PreTrainedConfig | None = None
    freeze_backbone_batch_norm: bool = False
    text_config: dict | PreTrainedConfig | None = None
    captioner_config: dict | PreTrainedConfig | None = None

    d_model: int = 256
    num_feature_levels: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    num_queries: int = 900
    max_concept_tokens: int = 16
    fusion: Literal["bidirectional", "image_only", "none"] = "bidirectional"
    fusion_drop_path: float | int = 0.1
    fusion_layer_scale_init: float = 1e-4
    decoder_concept_cross_attention: bool = True
    activation_function: str = "relu"
    dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    layer_norm_eps: float = 1e-5
    norm_groups: int = 32
    positional_embedding_temperature: float | int = 20
    init_std: float = 0.02
    prior_prob: float = 0.01

    class_cost: float | int = 2.0
    bbox_cost: float | int = 5.0
    giou_cost: float | int = 2.0
    alignment_loss_coefficient: float | int = 1.0
    bbox_loss_coefficient: float | int = 5.0
    giou_loss_coefficient: float | int = 2.0
    objectness_loss_coefficient: float | int = 1.0
    caption_loss_coefficient: float | int = 1.0
    image_caption_loss_coefficient: float | int = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    auxiliary_loss: bool = True

    use_denoising: bool = True
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0

    ov_score_weights: list[float] | tuple[float, ...] = (1.0, 0.5, 1.0)
    train_detector: bool = True
    train_captioner: bool = True
    caption_query_iou: float | None = 0.5

    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The captioner shares the CLIP tokenizer: its vocabulary defaults to the text encoder's.
        if self.captioner_config.vocab_size is None:
            self.captioner_config.vocab_size = self.text_config.vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.captioner_config, name) is None:
                setattr(self.captioner_config, name, getattr(self.text_config, name))

    @property
    def num_backbone_levels(self) -> int:
        """Number of feature maps the backbone returns (the rest of the levels are extra stride-2 convs)."""
        out_indices = getattr(self.backbone_config, "out_indices", None)
        if out_indices is not None:
            return len(out_indices)
        return len(getattr(self.backbone_config, "out_features", []) or [1])

    def validate_architecture(self):
        """Checks that the hyper-parameters fit together; raises `ValueError` naming the offending field."""
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if heads < 1 or self.d_model % heads != 0:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {name} ({heads}).")
        if self.d_model % 4 != 0:
            raise ValueError(
                f"d_model must be a multiple of 4 for the sine box embeddings, got {self.d_model}."
            )
        if self.norm_groups < 1 or self.d_model % self.norm_groups != 0:
            raise ValueError(f"norm_groups ({self.norm_groups}) must divide d_model ({self.d_model}).")
        for name in (
            "encoder_layers",
            "decoder_layers",
            "encoder_n_points",
            "decoder_n_points",
            "num_queries",
            "num_feature_levels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.fusion not in ("bidirectional", "image_only", "none"):
            raise ValueError(f"fusion must be 'bidirectional', 'image_only' or 'none', got {self.fusion!r}.")
        if self.max_concept_tokens < 3:
            raise ValueError(
                f"max_concept_tokens must leave room for start, one word and end tokens (>= 3), "
                f"got {self.max_concept_tokens}."
            )
        text_positions = getattr(self.text_config, "max_position_embeddings", None)
        if text_positions is not None and self.max_concept_tokens > text_positions:
            raise ValueError(
                f"max_concept_tokens ({self.max_concept_tokens}) exceeds the text encoder's "
                f"max_position_embeddings ({text_positions})."
            )
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {self.prior_prob}.")
        if not 0.0 <= self.label_noise_ratio <= 1.0:
            raise ValueError(f"label_noise_ratio must lie in [0, 1], got {self.label_noise_ratio}.")
        if self.num_denoising < 0:
            raise ValueError(f"num_denoising must be >= 0, got {self.num_denoising}.")
        if len(self.ov_score_weights) != 3 or any(w < 0 for w in self.ov_score_weights):
            raise ValueError(
                "ov_score_weights must be three non-negative exponents (objectness, likelihood, alignment), "
                f"got {self.ov_score_weights}."
            )
        backbone_levels = self.num_backbone_levels
        if backbone_levels > self.num_feature_levels:
            raise ValueError(
                f"The backbone returns {backbone_levels} feature maps but num_feature_levels is "
                f"{self.num_feature_levels}; set num_feature_levels >= the number of backbone outputs."
            )
        if not self.train_detector and not self.train_captioner:
            raise ValueError("At least one of train_detector / train_captioner must be True.")
        if self.caption_query_iou is not None and not 0.0 < self.caption_query_iou <= 1.0:
            raise ValueError(
                f"caption_query_iou must lie in (0, 1] or be None, got {self.caption_query_iou}."
            )
