"""Pipelines for DetCLIPv3.

The stock `pipeline("zero-shot-object-detection", model=folder)` already works with a DetCLIPv3 folder: it runs one
forward per candidate label (the model accepts the `(1, L)` `input_ids` it sends as "one concept per image").
`DetClipV3ZeroShotObjectDetectionPipeline` gives the same results in the same format with ONE forward per image:
all candidate labels go through `DetClipV3Processor` together, and their embeddings come from the model's concept
cache (`embed_concepts(..., cache_keys=labels)`), so a fixed vocabulary is encoded by the text tower only once.

    from transformers import pipeline
    from detclipv3_hf import DetClipV3ZeroShotObjectDetectionPipeline

    detector = pipeline(
        "zero-shot-object-detection", model=folder, pipeline_class=DetClipV3ZeroShotObjectDetectionPipeline
    )
    detector(image, candidate_labels=["cat", "remote control"], threshold=0.3)
    # [{"score": 0.71, "label": "cat", "box": {"xmin": 12, "ymin": 40, "xmax": 310, "ymax": 470}}, ...]
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from transformers.image_utils import load_image
from transformers.pipelines.base import Pipeline
from transformers.pipelines.zero_shot_object_detection import ZeroShotObjectDetectionPipeline

from .processing_detclipv3 import DetClipV3Processor

__all__ = [
    "DetClipV3ObjectCaptioningPipeline",
    "DetClipV3ZeroShotObjectDetectionPipeline",
    "register_pipelines",
]


class DetClipV3ZeroShotObjectDetectionPipeline(ZeroShotObjectDetectionPipeline):
    """Zero-shot detection with every candidate label of an image in one forward pass.

    Same call signature and output as transformers' `ZeroShotObjectDetectionPipeline` (one image, a list of images,
    `{"image", "candidate_labels"}` dicts, per-image label lists; `threshold`, `top_k`, `timeout`): a list, sorted by
    score, of `{"score": float, "label": str, "box": {"xmin", "ymin", "xmax", "ymax"}}` with boxes as int pixels of
    the original image (xyxy).

    Like the stock pipeline, a detection is a (query, label) pair whose sigmoid alignment score exceeds `threshold`,
    with at most 100 queries per label, so a box may be reported for several labels (sigmoid scores are not
    exclusive). What differs is the cost: one forward for all labels instead of one per label, and label embeddings
    are cached by string (the cache empties when the model goes back to training mode).

    Needs a `DetClipV3Processor` (loaded from the folder by `pipeline(...)`, or given as `processor=`); when only an
    image processor and a tokenizer are at hand one is assembled from them.
    """

    _load_processor = True
    _load_image_processor = True
    _load_tokenizer = True

    # At most this many detections per label, as the stock pipeline (the image processor's default `top_k`).
    max_detections_per_label = 100

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.processor is None or not hasattr(self.processor, "encode_concepts"):
            if self.image_processor is None or self.tokenizer is None:
                raise ValueError(
                    "DetClipV3ZeroShotObjectDetectionPipeline needs a DetClipV3Processor (processor=...) or both an "
                    "image processor and a tokenizer."
                )
            self.processor = DetClipV3Processor(
                self.image_processor,
                self.tokenizer,
                max_concept_tokens=self.model.config.max_concept_tokens,
            )

    def preprocess(
        self, inputs: dict[str, Any], timeout: float | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """One model input per image holding all its candidate labels (a comma-separated string is split)."""
        image = load_image(inputs["image"], timeout=timeout)
        candidate_labels = inputs["candidate_labels"]
        if isinstance(candidate_labels, str):
            candidate_labels = candidate_labels.split(",")
        if not isinstance(candidate_labels, (list, tuple)) or not candidate_labels:
            raise ValueError(
                f"candidate_labels must be a non-empty string or list of strings, got {candidate_labels!r}."
            )
        features = self.processor(images=image, text=[list(candidate_labels)], return_tensors="pt")
        features = features.to(self.dtype)
        yield {
            "is_last": True,
            "target_size": torch.tensor([[image.height, image.width]], dtype=torch.int32),
            "candidate_labels": list(candidate_labels),
            **features,
        }

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        target_size = model_inputs.pop("target_size")
        candidate_labels = model_inputs.pop("candidate_labels")
        is_last = model_inputs.pop("is_last")
        concept_embeds = self._embed_labels(model_inputs, candidate_labels)
        outputs = self.model(
            pixel_values=model_inputs["pixel_values"],
            pixel_mask=model_inputs.get("pixel_mask"),
            concept_embeds=concept_embeds,
            concept_mask=model_inputs["concept_mask"],
        )
        return {
            "target_size": target_size,
            "candidate_labels": candidate_labels,
            "is_last": is_last,
            "logits": outputs.logits,
            "pred_boxes": outputs.pred_boxes,
        }

    def _embed_labels(self, model_inputs: dict[str, Any], candidate_labels: list[str]) -> torch.Tensor:
        """`(1, M, D)` label embeddings, taken from (and added to) the model's concept cache."""
        return self.model.embed_concepts(
            model_inputs["input_ids"],
            model_inputs["attention_mask"],
            model_inputs["concept_mask"],
            cache_keys=[candidate_labels],
        )

    def postprocess(
        self, model_outputs: list[dict[str, Any]], threshold: float = 0.1, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """Detections of every label, sorted by score; see the class docstring for the format."""
        results = []
        for output in model_outputs:
            logits, pred_boxes = output["logits"], output["pred_boxes"]
            for index, label in enumerate(output["candidate_labels"]):
                # Label by label, exactly as the stock pipeline post-processes its per-label forwards.
                detections = self.image_processor.post_process_object_detection(
                    {"logits": logits[..., index : index + 1], "pred_boxes": pred_boxes},
                    threshold=threshold,
                    target_sizes=output["target_size"],
                    top_k=self.max_detections_per_label,
                )[0]
                for score, box in zip(detections["scores"].tolist(), detections["boxes"]):
                    results.append({"score": score, "label": label, "box": self._get_bounding_box(box)})
        results = sorted(results, key=lambda result: result["score"], reverse=True)
        return results[:top_k] if top_k else results


class DetClipV3ObjectCaptioningPipeline(Pipeline):
    """Vocabulary-free detection: finds objects and names each with `phrase|category|parent category`.

    Registered on `import detclipv3_hf` as the task `"object-captioning"`:

        captioner = pipeline("object-captioning", model=folder)
        captioner(image, threshold=0.3, top_k=100, num_beams=3)
        # [{"score", "box": [x0, y0, x1, y1] pixels, "label", "phrase", "category", "parent_category"}, ...]

    Takes one image (path, URL or PIL image) or a list; returns one list per image (a single list for one image).
    `threshold`, `top_k`, `nms_threshold` and any `generate` keyword (`num_beams`, `do_sample`, `max_new_tokens`, ...)
    are passed through.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not hasattr(self.model, "generate_object_labels"):
            raise ValueError(
                f"object-captioning needs a DetClipV3ForObjectCaptioning model, got {type(self.model).__name__}."
            )
        if self.processor is None or not hasattr(self.processor, "post_process_object_captioning"):
            if self.image_processor is None or self.tokenizer is None:
                raise ValueError(
                    "object-captioning needs a DetClipV3Processor or an image processor and a tokenizer."
                )
            self.processor = DetClipV3Processor(
                self.image_processor, self.tokenizer, max_concept_tokens=self.model.config.max_concept_tokens
            )

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        top_k: int | None = None,
        nms_threshold: float | None = None,
        timeout: float | None = None,
        **generate_kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"timeout": timeout} if timeout is not None else {}
        forward = {"generate_kwargs": generate_kwargs}
        if top_k is not None:
            forward["top_k"] = top_k
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = threshold
        if nms_threshold is not None:
            postprocess["nms_threshold"] = nms_threshold
        return preprocess, forward, postprocess

    def __call__(self, images: Any, **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        return super().__call__(images, **kwargs)

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        image = load_image(image, timeout=timeout)
        features = self.processor(images=image, return_tensors="pt").to(self.dtype)
        return {"target_size": (image.height, image.width), **features}

    def _forward(
        self, model_inputs: dict[str, Any], top_k: int = 100, generate_kwargs: dict | None = None
    ) -> dict:
        target_size = model_inputs.pop("target_size")
        outputs = self.model.generate_object_labels(
            model_inputs["pixel_values"],
            model_inputs.get("pixel_mask"),
            top_k=top_k,
            **(generate_kwargs or {}),
        )
        return {"target_size": target_size, "outputs": outputs}

    def postprocess(
        self, model_outputs: dict[str, Any], threshold: float = 0.3, nms_threshold: float = 0.5
    ) -> list[dict[str, Any]]:
        return self.processor.post_process_object_captioning(
            model_outputs["outputs"],
            threshold=threshold,
            target_sizes=[model_outputs["target_size"]],
            nms_threshold=nms_threshold,
        )[0]


def register_pipelines() -> None:
    """Registers the `"object-captioning"` task with transformers' pipeline registry (idempotent)."""
    from transformers import AutoModelForImageTextToText
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(
        "object-captioning",
        pipeline_class=DetClipV3ObjectCaptioningPipeline,
        pt_model=AutoModelForImageTextToText,
        type="multimodal",
    )
