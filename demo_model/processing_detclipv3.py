"""Processor of DetCLIPv3: concept tokenization, captioning targets, hierarchical labels and post-processing.

Text handling follows DetCLIP / DetCLIPv2: every concept ("cat", "red double-decker bus") is tokenized on its
own as one short CLIP sentence (start token, words, end token), so any number of concepts fits one forward pass
(Grounding DINO instead packs all names into one 256-token prompt). Concepts may differ per image; the batch is
padded to `(batch, max_concepts, max_concept_tokens)` with a `concept_mask`.

The object captioner generates hierarchical labels `phrase|category|parent category` after an `[OBJ]` task token
(image captions after `[IMG]`); this module owns those special tokens, the target encoding, the decoding that
undoes CLIP's detokenization spaces, the label parser and the captioning post-processing (class-aware NMS on the
generated category).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torchvision.ops import batched_nms, box_convert
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_detclipv3 import get_output_field, post_process_detection_outputs, scale_boxes_to_sizes

__all__ = [
    "IMG_TOKEN",
    "OBJ_TOKEN",
    "DetClipV3Processor",
    "add_captioning_tokens",
    "clean_decoded_label",
    "normalize_hierarchical_label",
    "parse_hierarchical_label",
]

OBJ_TOKEN = "[OBJ]"
IMG_TOKEN = "[IMG]"
LABEL_SEPARATOR = "|"

# CLIP's BPE gives every punctuation run its own word, and its decoder then puts a space between words, so
# "double-decker bus|bus" comes back as "double - decker bus | bus". Hierarchical labels only use these
# characters as glue inside a field or between fields, hence removing the spaces around them restores the text.
_GLUE_AROUND = re.compile(r"\s*([|\-/_])\s*")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]}%]|'(?:s|t|re|ve|m|ll|d)\b)")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")


def add_captioning_tokens(tokenizer: Any) -> None:
    """Adds the captioner's task tokens `[OBJ]` and `[IMG]` to `tokenizer` (in place) when they are missing.

    They are added as special tokens that the normalizer does not touch (CLIP lowercases text), so they are skipped
    by `decode(..., skip_special_tokens=True)` and survive `save_pretrained` / `from_pretrained`.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in (OBJ_TOKEN, IMG_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True
        )


def normalize_hierarchical_label(text: str) -> str:
    """Strips every `|`-separated field and collapses inner whitespace: `" red  bus |bus| vehicle"` -> `"red bus|bus|vehicle"`."""
    return LABEL_SEPARATOR.join(" ".join(field.split()) for field in text.split(LABEL_SEPARATOR))


def parse_hierarchical_label(text: Any) -> dict[str, str]:
    """Parses a generated hierarchical label `phrase|category|parent category`; never raises.

    Rules for malformed input:
    - `None` or empty text gives four empty strings; a non-string is converted with `str()`.
    - Missing fields are empty strings: `"bus"` -> phrase "bus", category "", parent "".
    - Extra separators: the first field is the phrase, the second the category and all remaining fields, joined
      with `|`, the parent category (`"a|b|c|d"` -> parent "c|d"), so no generated text is lost.
    - `label` is the whole normalized text (see `normalize_hierarchical_label`), kept as generated otherwise.

    Returns:
        `{"label", "phrase", "category", "parent_category"}`, all `str`.
    """
    if text is None:
        text = ""
    elif not isinstance(text, str):
        text = str(text)
    label = normalize_hierarchical_label(text)
    fields = label.split(LABEL_SEPARATOR) if label else []
    return {
        "label": label,
        "phrase": fields[0] if len(fields) > 0 else "",
        "category": fields[1] if len(fields) > 1 else "",
        "parent_category": LABEL_SEPARATOR.join(fields[2:]) if len(fields) > 2 else "",
    }


def clean_decoded_label(text: str) -> str:
    """Undoes CLIP's detokenization spaces around `|`, `-`, `/`, `_`, before `, . ; : ! ? ) 's` and after `(`.

    Since CLIP's tokenizer lowercases and collapses whitespace, `clean_decoded_label(decode(encode(s))) == s` for
    lowercase labels whose punctuation follows these usual spacing rules (e.g. `double-decker bus|bus|vehicle`).
    """
    text = _GLUE_AROUND.sub(r"\1", text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    return normalize_hierarchical_label(text)


def _concept_lists(text: Any, num_images: int | None) -> list[list[str]]:
    """Normalizes `text` to one concept list per image (see `DetClipV3Processor.__call__`)."""
    if isinstance(text, str):
        return [[text] for _ in range(num_images or 1)]
    if not isinstance(text, (list, tuple)):
        raise TypeError(
            f"`text` must be a string, a list of concept strings or a list of concept lists, got {type(text).__name__}."
        )
    if len(text) == 0:
        raise ValueError("`text` is an empty list: every image needs at least one concept.")
    if all(isinstance(concept, str) for concept in text):
        return [list(text) for _ in range(num_images or 1)]
    if all(isinstance(concepts, (list, tuple)) for concepts in text):
        if num_images is not None and len(text) != num_images:
            raise ValueError(
                f"Got {num_images} images but {len(text)} concept lists; give one list per image."
            )
        return [list(concepts) for concepts in text]
    kinds = sorted({type(item).__name__ for item in text})
    raise TypeError(
        f"`text` must be a list of strings (shared by all images) or a list of lists of strings (one per image); "
        f"got a list mixing {kinds}."
    )


def _check_concepts(concept_lists: list[list[str]]) -> None:
    for image_index, concepts in enumerate(concept_lists):
        if len(concepts) == 0:
            raise ValueError(f"Image {image_index} has no concepts; every image needs at least one.")
        for concept_index, concept in enumerate(concepts):
            if not isinstance(concept, str):
                raise TypeError(
                    f"Concept {concept_index} of image {image_index} must be a string, got {type(concept).__name__} "
                    f"({concept!r})."
                )
            if not concept.strip():
                raise ValueError(f"Concept {concept_index} of image {image_index} is empty: {concept!r}.")


class DetClipV3Processor(ProcessorMixin):
    r"""Wraps a DetCLIPv3 image processor (either backend) and a CLIP tokenizer.

    Args:
        image_processor (`DetClipV3ImageProcessor` or `DetClipV3ImageProcessorPil`): Image preprocessing.
        tokenizer (`CLIPTokenizer`): Tokenizer of the text encoder and the captioner; `[OBJ]` / `[IMG]` are added
            to it when missing (so resize the model's token embeddings to `len(tokenizer)`).
        max_concept_tokens (`int`, defaults to 16): Tokens per concept including start and end tokens; longer
            concepts are truncated (the end token is kept). Saved in the processor config.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_concept_tokens: int = 16) -> None:
        if (
            isinstance(max_concept_tokens, bool)
            or not isinstance(max_concept_tokens, int)
            or max_concept_tokens < 3
        ):
            raise ValueError(
                f"`max_concept_tokens` must be an int >= 3 (start, one word, end), got {max_concept_tokens!r}."
            )
        super().__init__(image_processor, tokenizer)
        self.max_concept_tokens = max_concept_tokens
        add_captioning_tokens(self.tokenizer)

    # ------------------------------------------------------------------ special tokens

    @property
    def obj_token_id(self) -> int:
        """Id of the `[OBJ]` task token (hierarchical object labels)."""
        return self.tokenizer.convert_tokens_to_ids(OBJ_TOKEN)

    @property
    def img_token_id(self) -> int:
        """Id of the `[IMG]` task token (image captions)."""
        return self.tokenizer.convert_tokens_to_ids(IMG_TOKEN)

    @property
    def separator_token_id(self) -> int:
        """Id of the token the tokenizer gives a lone `|` (the field separator of hierarchical labels)."""
        ids = self.tokenizer(LABEL_SEPARATOR, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"The tokenizer splits {LABEL_SEPARATOR!r} into {len(ids)} tokens; expected one."
            )
        return ids[0]

    def captioner_token_ids(self) -> dict[str, int]:
        """Token ids the captioner needs, to pass into `DetClipV3Config(captioner_config={...})`:
        vocabulary size (with the task tokens), task tokens, separator and start / end / pad."""
        tok = self.tokenizer
        return {
            "vocab_size": len(tok),
            "obj_token_id": self.obj_token_id,
            "img_token_id": self.img_token_id,
            "separator_token_id": self.separator_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }

    @property
    def model_input_names(self) -> list[str]:
        """Inputs the model takes from this processor: the image processor's, the tokenizer's and `concept_mask`."""
        return [*super().model_input_names, "concept_mask"]

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ inputs

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | list[list[str]] | None = None,
        annotations: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Prepares images (and annotations) and concept vocabularies for the model.

        Args:
            images: Images accepted by the image processor; `**kwargs` are forwarded to it.
            text: One string (one concept, for every image), a list of concepts shared by every image, or one list
                of concepts per image (lists may differ in length).
            annotations: COCO-detection annotations, one per image (requires `images`).
            return_tensors: "pt" (default) or "np".

        Returns:
            `BatchFeature` with the image processor outputs (`pixel_values`, `pixel_mask`, `labels`) and, when `text`
            is given, `input_ids` (B, M, L) long, `attention_mask` (B, M, L) long and `concept_mask` (B, M) bool,
            where M is the longest concept list and L = `max_concept_tokens`; padded concept slots hold pad ids
            with attention 0 and `concept_mask` False.

        Raises:
            ValueError / TypeError: no input, an image without concepts, an empty or whitespace-only concept,
                as many concept lists as images expected, wrong types.
        """
        if images is None and text is None:
            raise ValueError("Give `images`, `text` or both.")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
        if annotations is not None and images is None:
            raise ValueError("`annotations` were given without `images`.")
        if kwargs and images is None:
            raise TypeError(f"Image processor options {sorted(kwargs)} were given without `images`.")

        data: dict[str, Any] = {}
        num_images = None
        if images is not None:
            image_features = self.image_processor(
                images, annotations=annotations, return_tensors="pt", **kwargs
            )
            data.update(image_features)
            num_images = int(image_features["pixel_values"].shape[0])
        if text is not None:
            data.update(self.encode_concepts(_concept_lists(text, num_images)))
        if return_tensors == "np":
            data = {
                key: value.numpy() if isinstance(value, torch.Tensor) else value
                for key, value in data.items()
            }
        return BatchFeature(data)

    def encode_concepts(self, concept_lists: list[list[str]]) -> dict[str, torch.Tensor]:
        """Tokenizes each concept on its own and pads the batch of concept lists.

        Args:
            concept_lists: One non-empty list of concept strings per image.

        Returns:
            `input_ids` (B, M, L) long, `attention_mask` (B, M, L) long, `concept_mask` (B, M) bool.
        """
        _check_concepts(concept_lists)
        flat = [concept for concepts in concept_lists for concept in concepts]
        length = self.max_concept_tokens
        encoded = self.tokenizer(
            flat, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        # A concept made only of characters the normalizer drops would leave start + end tokens only.
        words = encoded["attention_mask"].sum(-1) - 2
        offsets = [0]
        for concepts in concept_lists:
            offsets.append(offsets[-1] + len(concepts))
        for image_index, concepts in enumerate(concept_lists):
            for concept_index, concept in enumerate(concepts):
                if words[offsets[image_index] + concept_index] <= 0:
                    raise ValueError(
                        f"Concept {concept_index} of image {image_index} tokenizes to nothing: {concept!r}."
                    )

        batch, max_concepts = len(concept_lists), max(len(concepts) for concepts in concept_lists)
        input_ids = torch.full((batch, max_concepts, length), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, max_concepts, length), dtype=torch.long)
        concept_mask = torch.zeros((batch, max_concepts), dtype=torch.bool)
        for image_index, concepts in enumerate(concept_lists):
            start, count = offsets[image_index], len(concepts)
            input_ids[image_index, :count] = encoded["input_ids"][start : start + count]
            attention_mask[image_index, :count] = encoded["attention_mask"][start : start + count]
            concept_mask[image_index, :count] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "concept_mask": concept_mask}

    # ------------------------------------------------------------------ captioning targets / decoding

    def encode_caption_targets(
        self, labels: list[list[str]], task: Literal["object", "image"], max_length: int
    ) -> BatchFeature:
        """Encodes captioner targets with the layout `[task token] tokens... [eos]` (no CLIP start token).

        Args:
            labels: One list of strings per image (hierarchical labels for `task="object"`, captions for "image");
                all strings are flattened in order. Each is normalized with `normalize_hierarchical_label` first.
            task: "object" uses `[OBJ]`, "image" uses `[IMG]`.
            max_length: Longest sequence including the task and end tokens; longer text is truncated (the end
                token is kept).

        Returns:
            `BatchFeature` with `input_ids` (N, L) long and `attention_mask` (N, L) long, L = the longest encoded
            sequence (<= max_length), padded with the pad id and attention 0.
        """
        task_ids = {"object": self.obj_token_id, "image": self.img_token_id}
        if task not in task_ids:
            raise ValueError(f"`task` must be 'object' or 'image', got {task!r}.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise ValueError(
                f"`max_length` must be an int >= 3 (task token, one token, end), got {max_length!r}."
            )
        if not isinstance(labels, (list, tuple)) or not all(
            isinstance(items, (list, tuple)) for items in labels
        ):
            raise TypeError("`labels` must be a list (one per image) of lists of strings.")
        flat = []
        for image_index, items in enumerate(labels):
            for item_index, item in enumerate(items):
                if not isinstance(item, str):
                    raise TypeError(
                        f"Label {item_index} of image {image_index} must be a string, got {type(item).__name__}."
                    )
                normalized = normalize_hierarchical_label(item)
                if not normalized.replace(LABEL_SEPARATOR, ""):
                    raise ValueError(f"Label {item_index} of image {image_index} is empty: {item!r}.")
                flat.append(normalized)

        token_lists = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        sequences = [
            [task_ids[task], *tokens[: max_length - 2], self.tokenizer.eos_token_id] for tokens in token_lists
        ]
        length = max((len(seq) for seq in sequences), default=2)
        input_ids = torch.full((len(sequences), length), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask})

    def batch_decode_labels(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decodes generated label ids (N, T) into normalized label strings.

        Leading task / start tokens are dropped, the text stops at the first end token, special tokens are skipped
        and CLIP's detokenization spaces are undone (`clean_decoded_label`), so that
        `parse_hierarchical_label(decode(encode(s)))["label"] == s` for normalized lowercase labels.
        """
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(row) for row in sequences]
        if isinstance(sequences, torch.Tensor) and sequences.ndim != 2:
            raise ValueError(f"`sequences` must have shape (N, T), got {tuple(sequences.shape)}.")
        eos = self.tokenizer.eos_token_id
        leading = {self.obj_token_id, self.img_token_id, self.tokenizer.bos_token_id}
        if self._pad_id != eos:  # CLIP pads with its end token: that one must still end the text
            leading.add(self._pad_id)
        texts = []
        for row in rows:
            start = 0
            while start < len(row) and row[start] in leading:
                start += 1
            end = row.index(eos, start) if eos in row[start:] else len(row)
            text = self.tokenizer.decode(row[start:end], skip_special_tokens=True)
            texts.append(clean_decoded_label(text))
        return texts

    # ------------------------------------------------------------------ post-processing

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.3,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        text_labels: list[str] | list[list[str]] | None = None,
        top_k: int = 100,
        multi_label: bool = False,
    ) -> list[dict[str, Any]]:
        """Detections with the vocabulary given by the user.

        Args:
            outputs: Detector outputs with `logits` (B, Q, M), `pred_boxes` (B, Q, 4) cxcywh normalized and optional
                `concept_mask` (B, M).
            threshold: Minimum score (sigmoid of the best real concept's logit), exclusive.
            target_sizes: (B, 2) (height, width) per image; boxes are returned in those pixels (else normalized).
            text_labels: The concepts, shared (`list[str]`) or per image (`list[list[str]]`); adds `text_labels`.
            top_k: At most this many detections per image.
            multi_label: One detection per (box, concept) pair instead of per box (the COCO evaluation protocol of
                Deformable DETR / DINO); see `post_process_detection_outputs`.

        Returns:
            One dict per image: `scores` (N,) descending, `labels` (N,) long index into that image's concepts,
            `boxes` (N, 4) xyxy, and `text_labels` (list[str]) when `text_labels` was given.
        """
        results = post_process_detection_outputs(
            outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k, multi_label=multi_label
        )
        if text_labels is None:
            return results
        concept_lists = _concept_lists(text_labels, len(results))
        for image_index, (result, concepts) in enumerate(zip(results, concept_lists)):
            indices = result["labels"].tolist()
            if indices and max(indices) >= len(concepts):
                raise ValueError(
                    f"Image {image_index} has a detection for concept {max(indices)} but only {len(concepts)} "
                    "text labels were given."
                )
            result["text_labels"] = [concepts[index] for index in indices]
        return results

    def post_process_object_captioning(
        self,
        outputs: Any,
        threshold: float = 0.3,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        nms_threshold: float = 0.5,
    ) -> list[list[dict[str, Any]]]:
        """Vocabulary-free detections with generated hierarchical labels.

        Args:
            outputs: `pred_boxes` (B, K, 4) cxcywh normalized, `scores` (B, K) in [0, 1] (open-vocabulary score),
                `sequences` (B, K, T) or (B*K, T) generated ids, optional `sequences_scores` (B, K) or (B*K,).
            threshold: Keep objects with score > threshold.
            target_sizes: (B, 2) (height, width); boxes in those pixels, else normalized.
            nms_threshold: IoU above which a lower-scored box of the same generated category is removed
                (class-aware NMS, `torchvision.ops.batched_nms`; an empty category is a class of its own).

        Returns:
            Per image, a list sorted by score of `{"score": float, "box": [x0, y0, x1, y1] (list of floats),
            "label", "phrase", "category", "parent_category"}` (+ `"sequence_score"` when given). Malformed
            generations give empty fields, never an exception.
        """
        boxes = get_output_field(outputs, "pred_boxes")
        scores = get_output_field(outputs, "scores")
        sequences = get_output_field(outputs, "sequences")
        sequence_scores = get_output_field(outputs, "sequences_scores", required=False)
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"`pred_boxes` must have shape (batch, objects, 4), got {tuple(boxes.shape)}.")
        batch, num_objects = boxes.shape[:2]
        if tuple(scores.shape) != (batch, num_objects):
            raise ValueError(f"`scores` must have shape ({batch}, {num_objects}), got {tuple(scores.shape)}.")
        sequences = torch.as_tensor(sequences)
        if sequences.ndim == 2 and sequences.shape[0] == batch * num_objects:
            sequences = sequences.reshape(batch, num_objects, -1)
        if sequences.ndim != 3 or tuple(sequences.shape[:2]) != (batch, num_objects):
            raise ValueError(
                f"`sequences` must have shape ({batch}, {num_objects}, T) or ({batch * num_objects}, T), got "
                f"{tuple(sequences.shape)}."
            )
        if sequence_scores is not None:
            sequence_scores = torch.as_tensor(sequence_scores).reshape(batch, num_objects)

        boxes = scale_boxes_to_sizes(box_convert(boxes.float(), "cxcywh", "xyxy"), target_sizes, batch)
        results = []
        for i in range(batch):
            keep = (scores[i] > threshold).nonzero().flatten()
            if keep.numel() == 0:
                results.append([])
                continue
            parsed = [parse_hierarchical_label(text) for text in self.batch_decode_labels(sequences[i][keep])]
            categories = {}
            class_ids = torch.tensor(
                [categories.setdefault(p["category"], len(categories)) for p in parsed], device=boxes.device
            )
            kept_boxes, kept_scores = boxes[i][keep], scores[i][keep].float()
            survivors = batched_nms(kept_boxes, kept_scores, class_ids, nms_threshold).tolist()
            image_results = []
            for j in survivors:
                entry = {
                    "score": float(kept_scores[j]),
                    "box": [float(v) for v in kept_boxes[j]],
                    **parsed[j],
                }
                if sequence_scores is not None:
                    entry["sequence_score"] = float(sequence_scores[i][keep[j]])
                image_results.append(entry)
            results.append(image_results)
        return results
