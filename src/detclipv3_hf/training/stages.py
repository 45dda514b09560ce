"""What each of the three DetCLIPv3 training stages trains, on which data, at which size (ARCHITECTURE.md section 4).

A :class:`StageSpec` is a frozen description read by the one training loop (``trainer.py``); stage 2 and stage 3
are derived from stage 1 with ``dataclasses.replace`` so that a field changed in stage 1 (e.g. the LR multipliers)
changes the others unless they override it on purpose.

Parameter names are those of ``DetClipV3ForObjectDetection`` / ``DetClipV3ForObjectCaptioning``: the trunk lives
under ``model.`` (backbone at ``model.image_embedder.backbone.``, concept side at ``model.concept_encoder.`` and
``model.alignment_head.concept_proj.``) and the captioner under ``captioner.``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

ModelKind = Literal["detection", "captioning"]
DataKind = Literal["detection", "grounding", "captioned"]
DATA_KINDS: tuple[str, ...] = ("detection", "grounding", "captioned")
LOSS_TERMS: tuple[str, ...] = ("alignment", "bbox", "giou", "objectness", "caption", "image_caption")
DETECTION_LOSSES: tuple[str, ...] = ("alignment", "bbox", "giou", "objectness")
CAPTION_LOSSES: tuple[str, ...] = ("caption", "image_caption")

BACKBONE_PREFIXES: tuple[str, ...] = ("model.image_embedder.backbone.",)
# The concept side: the CLIP text tower and the alignment head's concept projection. At full LR a randomly
# initialised (tiny) text tower collapses every concept embedding onto one direction, so it trains slower.
CONCEPT_PREFIXES: tuple[str, ...] = ("model.concept_encoder.", "model.alignment_head.concept_proj.")
DETECTOR_PREFIX = "model."
CAPTIONER_PREFIX = "captioner."


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    Attributes:
        stage: 1, 2 or 3.
        name: short human-readable name (logged and written to the run folder).
        model_kind: ``"detection"`` builds ``DetClipV3ForObjectDetection``, ``"captioning"``
            ``DetClipV3ForObjectCaptioning``.
        trainable_prefixes: a parameter trains iff its name starts with one of these ...
        frozen_prefixes: ... and with none of these (frozen wins).
        losses: base loss terms summed into the training loss (subset of ``LOSS_TERMS``); every auxiliary /
            encoder / denoising variant of a term (``loss_bbox_0``, ``loss_bbox_enc``, ``loss_bbox_dn``) follows
            its base term. Weights come from the model config (``build_loss_weights``).
        data_mix: ``(kind, sampling ratio)`` pairs; each batch is drawn from one kind with these probabilities
            (kinds without a data source in a run are dropped and the ratios renormalised).
        max_concepts: ``(kind, max concepts per image)`` pairs (DetCLIPv2: 150 detection, 100 grounding).
        short_sides: multi-scale training short sides in pixels (one drawn per image).
        max_size: cap of the long side in pixels.
        random_crop: whether DETR's resize -> crop -> resize branch is used half of the time.
        horizontal_flip: flip probability.
        learning_rate_multipliers: ``(group, multiplier)`` for ``"backbone"``, ``"concept"`` (text encoder and
            concept projection) and ``"rest"``; each group's LR is the base LR times its multiplier.
        vocabulary_free_ratio: fraction of batches run without concepts (only boxes and objectness supervised,
            plus the captioner when it trains), so the objectness path learns vocabulary-free detection.
        caption_targets: whether batches carry captioner targets (``caption_ids``) at all.
    """

    stage: int
    name: str
    model_kind: ModelKind
    trainable_prefixes: tuple[str, ...]
    frozen_prefixes: tuple[str, ...]
    losses: tuple[str, ...]
    data_mix: tuple[tuple[str, float], ...]
    max_concepts: tuple[tuple[str, int], ...]
    short_sides: tuple[int, ...]
    max_size: int
    random_crop: bool
    horizontal_flip: float
    learning_rate_multipliers: tuple[tuple[str, float], ...]
    vocabulary_free_ratio: float
    caption_targets: bool

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.model_kind not in ("detection", "captioning"):
            raise ValueError(f"model_kind must be 'detection' or 'captioning', got {self.model_kind!r}")
        if not self.trainable_prefixes:
            raise ValueError("trainable_prefixes is empty: the stage would train nothing")
        unknown = set(self.losses) - set(LOSS_TERMS)
        if not self.losses or unknown:
            raise ValueError(f"losses must be a non-empty subset of {LOSS_TERMS}, got {self.losses!r}")
        if self.model_kind == "detection" and set(self.losses) & set(CAPTION_LOSSES):
            raise ValueError("a detection-only stage cannot use caption losses; use model_kind='captioning'")
        if not self.data_mix or any(k not in DATA_KINDS or r <= 0 for k, r in self.data_mix):
            raise ValueError(
                f"data_mix must be (kind in {DATA_KINDS}, ratio > 0) pairs, got {self.data_mix!r}"
            )
        if any(k not in DATA_KINDS or not isinstance(n, int) or n < 1 for k, n in self.max_concepts):
            raise ValueError(f"max_concepts must be (kind, int >= 1) pairs, got {self.max_concepts!r}")
        if not self.short_sides or any(not isinstance(s, int) or s < 1 for s in self.short_sides):
            raise ValueError(f"short_sides must be positive ints, got {self.short_sides!r}")
        if not isinstance(self.max_size, int) or self.max_size < max(self.short_sides):
            raise ValueError(f"max_size must be an int >= max(short_sides), got {self.max_size!r}")
        if not 0.0 <= self.horizontal_flip <= 1.0:
            raise ValueError(f"horizontal_flip must be in [0, 1], got {self.horizontal_flip!r}")
        groups = dict(self.learning_rate_multipliers)
        if set(groups) != {"backbone", "concept", "rest"} or any(m < 0 for m in groups.values()):
            raise ValueError(
                "learning_rate_multipliers must give a non-negative multiplier for exactly 'backbone', 'concept' "
                f"and 'rest', got {self.learning_rate_multipliers!r}"
            )
        if not 0.0 <= self.vocabulary_free_ratio < 1.0:
            raise ValueError(f"vocabulary_free_ratio must be in [0, 1), got {self.vocabulary_free_ratio!r}")

    def is_trainable(self, name: str) -> bool:
        """Whether the parameter called ``name`` (model-relative, e.g. ``model.decoder_layers.0...``) trains."""
        return name.startswith(self.trainable_prefixes) and not name.startswith(self.frozen_prefixes)

    def lr_group(self, name: str) -> str:
        """``"backbone"``, ``"concept"`` or ``"rest"``: which LR multiplier applies to parameter ``name``."""
        if name.startswith(BACKBONE_PREFIXES):
            return "backbone"
        if name.startswith(CONCEPT_PREFIXES):
            return "concept"
        return "rest"

    def lr_multiplier(self, group: str) -> float:
        return dict(self.learning_rate_multipliers)[group]

    def max_concepts_for(self, kind: str) -> int:
        return dict(self.max_concepts)[kind]

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> StageSpec:
        """A copy with some fields replaced; lists become tuples, dicts of ``data_mix`` / ``max_concepts`` /
        ``learning_rate_multipliers`` become pairs (and merge into the stage's own values).

        Raises:
            ValueError: for a field name that StageSpec does not have.
        """
        if not overrides:
            return self
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown StageSpec fields {sorted(unknown)}; known fields: {sorted(names)}")
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in ("max_concepts", "learning_rate_multipliers") and isinstance(value, Mapping):
                value = tuple({**dict(getattr(self, key)), **value}.items())
            elif key == "data_mix" and isinstance(value, Mapping):
                value = tuple(value.items())
            elif isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            values[key] = value
        return replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (pairs become dicts)."""
        out = dataclasses.asdict(self)
        for key in ("data_mix", "max_concepts", "learning_rate_multipliers"):
            out[key] = dict(getattr(self, key))
        out["short_sides"] = list(self.short_sides)
        return out


STAGE_1 = StageSpec(
    stage=1,
    name="open-vocabulary detector",
    model_kind="detection",
    trainable_prefixes=(DETECTOR_PREFIX,),
    frozen_prefixes=(),
    losses=DETECTION_LOSSES,
    data_mix=(("detection", 0.6), ("grounding", 0.4)),
    max_concepts=(("detection", 150), ("grounding", 100), ("captioned", 150)),
    short_sides=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    max_size=1333,
    random_crop=True,
    horizontal_flip=0.5,
    learning_rate_multipliers=(("backbone", 0.1), ("concept", 0.1), ("rest", 1.0)),
    vocabulary_free_ratio=0.1,
    caption_targets=False,
)

# Stage 2: detector frozen, the captioner learns at low resolution on captioned (pseudo-box) data.
STAGE_2 = replace(
    STAGE_1,
    stage=2,
    name="object captioner",
    model_kind="captioning",
    trainable_prefixes=(CAPTIONER_PREFIX,),
    frozen_prefixes=(DETECTOR_PREFIX,),
    losses=CAPTION_LOSSES,
    data_mix=(("captioned", 1.0),),
    short_sides=(320,),
    max_size=533,
    random_crop=False,
    vocabulary_free_ratio=0.0,
    caption_targets=True,
)

# Stage 3: everything jointly on detection + grounding + a small high-quality captioned subset, high resolution.
STAGE_3 = replace(
    STAGE_1,
    stage=3,
    name="joint detector and captioner",
    model_kind="captioning",
    trainable_prefixes=(DETECTOR_PREFIX, CAPTIONER_PREFIX),
    losses=LOSS_TERMS,
    data_mix=(("detection", 0.4), ("grounding", 0.4), ("captioned", 0.2)),
    caption_targets=True,
)

STAGES: dict[int, StageSpec] = {1: STAGE_1, 2: STAGE_2, 3: STAGE_3}


def get_stage(stage: int, overrides: Mapping[str, Any] | None = None) -> StageSpec:
    """The :class:`StageSpec` of ``stage`` (1, 2 or 3), with optional field overrides."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    return STAGES[stage].with_overrides(overrides)


def loss_base_term(name: str) -> str:
    """The base term of a ``loss_dict`` key: ``loss_bbox_dn_0`` -> ``bbox``, ``loss_image_caption`` ->
    ``image_caption``.

    Raises:
        ValueError: for a key that does not belong to any known term.
    """
    for term in sorted(LOSS_TERMS, key=len, reverse=True):
        if name == f"loss_{term}" or name.startswith(f"loss_{term}_"):
            return term
    raise ValueError(f"loss term {name!r} does not belong to any of {LOSS_TERMS}")
