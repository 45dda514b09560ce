"""The four annotation steps. Each maps a batch of records to the same records, enriched, in order.

A record that a step cannot use (missing image, empty answer, unparsable JSON, upstream failure) keeps
flowing with a `status` other than ``ok`` and a `reason`; no step drops a record.

Record fields by step (all steps keep `id`, `image`, `raw_caption`, `caption`, `status`, `reason`,
`provenance`):
    recaption: `caption` (clean description), `width`, `height`.
    extract:   `facts` (observable-only description or None), `entities` (list of {phrase, category,
               parent_category}), `filter_answer`, `extract_answer` (raw model texts, for auditing).
    instruct:  `conversations` (LLaVA style: [{"from": "human", ...}, {"from": "gpt", ...}]).
    boxes:     `objects` (GranuCap: bbox [x, y, w, h] pixels, phrase, category, parent_category, score),
               `box_stats`, `width`, `height`.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from PIL import Image

from .labelling import AssignmentStats, BoxLabeller, as_detections, assign_entities, build_vocabulary
from .models import Recaptioner, TextGenerator, check_answers, describe_model
from .parsing import NO_ENTITIES, NO_FACTS, OK, PARSE_FAILED, Entity, parse_entities, parse_filter_answer
from .prompts import PromptTemplates
from .storage import load_image

IMAGE_ERROR = "image_error"
RECAPTION_FAILED = "recaption_failed"
NO_BOXES = "no_boxes"
# Extraction outcomes that are a usable, definitive answer (an empty entity list is one).
EXTRACTED = (OK, NO_FACTS, NO_ENTITIES)


class AnnotationStep(Protocol):
    """One stage of the pipeline as the engine sees it."""

    name: str

    def provenance(self) -> dict[str, Any]:
        """Flat, JSON-able description of how this step ran (models, prompts, thresholds)."""
        ...

    def process(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The same records, in the same order, with this step's fields set."""
        ...


def _usable(record: dict[str, Any]) -> bool:
    return record.get("status", OK) == OK


def _open_images(records: list[dict[str, Any]]) -> list[Image.Image | None]:
    """Opens each record's image; a failure marks the record (status `image_error`) instead of raising."""
    images: list[Image.Image | None] = []
    for record in records:
        try:
            image = load_image(record["image"])
        except (OSError, ValueError, TypeError) as error:
            record.update(status=IMAGE_ERROR, reason=f"cannot open image {record.get('image')!r}: {error}")
            image = None
        else:
            record.update(width=image.width, height=image.height)
        images.append(image)
    return images


class RecaptionStep:
    """Step 1: a vision-language model rewrites the noisy caption into a clean, detailed description."""

    name = "recaption"

    def __init__(self, recaptioner: Recaptioner, prompts: PromptTemplates) -> None:
        self.recaptioner = recaptioner
        self.prompts = prompts

    def provenance(self) -> dict[str, Any]:
        return {"model": describe_model(self.recaptioner), "prompt": self.prompts.recaption}

    def process(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [{**r, "status": OK, "reason": None, "width": None, "height": None} for r in records]
        images = _open_images(out)
        todo = [i for i, image in enumerate(images) if image is not None]
        if not todo:
            return out
        prompts = [self.prompts.recaption_prompt(out[i]["raw_caption"]) for i in todo]
        answers = check_answers(
            self.recaptioner.generate([images[i] for i in todo], prompts), len(todo), "recaptioner"
        )
        for i, answer in zip(todo, answers):
            caption = " ".join(answer.split())
            if caption:
                out[i]["caption"] = caption
            else:
                out[i].update(status=RECAPTION_FAILED, reason="the recaptioning model returned an empty answer")
        return out


class ExtractStep:
    """Step 2: a language model keeps the observable facts, then lists the entities as JSON."""

    name = "extract"

    def __init__(self, llm: TextGenerator, prompts: PromptTemplates) -> None:
        self.llm = llm
        self.prompts = prompts

    def provenance(self) -> dict[str, Any]:
        return {
            "model": describe_model(self.llm),
            "filter_prompt": self.prompts.filter,
            "extract_prompt": self.prompts.extract,
        }

    def process(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [
            {**r, "status": r.get("status", OK), "reason": r.get("reason"), "facts": None, "entities": [],
             "filter_answer": None, "extract_answer": None}
            for r in records
        ]
        todo = [i for i, r in enumerate(out) if _usable(r)]
        for i in [i for i in todo if not out[i]["caption"]]:
            out[i].update(status=NO_FACTS, reason="empty caption")
        todo = [i for i in todo if out[i]["caption"]]
        if not todo:
            return out
        answers = check_answers(
            self.llm.generate([self.prompts.filter_prompt(out[i]["caption"]) for i in todo]), len(todo), "llm"
        )
        with_facts = []
        for i, answer in zip(todo, answers):
            parsed = parse_filter_answer(answer)
            out[i].update(filter_answer=answer, facts=parsed.facts, status=parsed.status, reason=parsed.reason)
            if parsed.status == OK:
                with_facts.append(i)
        if not with_facts:
            return out
        answers = check_answers(
            self.llm.generate([self.prompts.extract_prompt(out[i]["facts"]) for i in with_facts]),
            len(with_facts),
            "llm",
        )
        for i, answer in zip(with_facts, answers):
            parsed = parse_entities(answer)
            out[i].update(
                extract_answer=answer,
                entities=[e.to_record() for e in parsed.entities],
                status=parsed.status,
                reason=parsed.reason,
            )
        return out


def instruction_answer(caption: str, entities: list[dict[str, Any]]) -> str:
    """The assistant turn of an instruction pair: JSON with the clean caption and the entity list.

    Entities use the prompts' key spelling (``parent category``) so `parse_entities` reads them back.
    """
    listed = [Entity(e["phrase"], e["category"], e["parent_category"]).to_prompt_json() for e in entities]
    return json.dumps({"caption": caption, "entities": listed}, ensure_ascii=False)


class InstructionStep:
    """Step 3: LLaVA-style conversation pairs that teach one VLLM to do steps 1 and 2 in a single pass.

    Records whose extraction gave a definitive answer (entities, or none) become a pair; the rest keep
    their status and an empty `conversations` list (`export_llava_json` leaves them out).
    """

    name = "instruct"

    def __init__(self, prompts: PromptTemplates) -> None:
        self.prompts = prompts

    def provenance(self) -> dict[str, Any]:
        return {"prompt": self.prompts.instruction, "answer_format": "json:{caption, entities}"}

    def process(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for record in records:
            record = {**record, "conversations": []}
            if "entities" not in record:
                raise ValueError(f"record {record.get('id')!r} has no 'entities': run the extract step first")
            if record.get("status") in EXTRACTED:
                record["conversations"] = [
                    {"from": "human", "value": self.prompts.instruction_prompt(record["raw_caption"])},
                    {"from": "gpt", "value": instruction_answer(record["caption"], record["entities"])},
                ]
                record["status"] = OK
            out.append(record)
        return out


class BoxLabelStep:
    """Step 4: DetCLIPv3 boxes for each entity; the output records are GranuCap-style (stage-2 ready)."""

    name = "boxes"

    def __init__(self, labeller: BoxLabeller, *, threshold: float = 0.3, nms_iou: float = 0.5) -> None:
        if not hasattr(labeller, "label"):
            raise TypeError(f"box labeller must have a label(images, vocabularies) method, got {type(labeller).__name__}")
        self.labeller = labeller
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)

    def provenance(self) -> dict[str, Any]:
        return {"detector": describe_model(self.labeller), "threshold": self.threshold, "nms_iou": self.nms_iou}

    def process(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for record in records:
            if "entities" not in record:
                raise ValueError(f"record {record.get('id')!r} has no 'entities': run the extract step first")
            out.append({**record, "objects": [], "box_stats": AssignmentStats().to_record(),
                        "width": record.get("width"), "height": record.get("height")})
        todo = [i for i, r in enumerate(out) if _usable(r) and r["entities"]]
        images = _open_images([out[i] for i in todo])
        todo = [i for i, image in zip(todo, images) if image is not None]
        images = [image for image in images if image is not None]
        if not todo:
            return out
        entities = [[Entity(e["phrase"], e["category"], e["parent_category"]) for e in out[i]["entities"]] for i in todo]
        vocabularies = [build_vocabulary(ents) for ents in entities]
        raw = self.labeller.label(images, [list(v.concepts) for v in vocabularies])
        if len(raw) != len(todo):
            raise ValueError(f"box labeller returned {len(raw)} results for {len(todo)} images")
        for i, ents, vocab, dets in zip(todo, entities, vocabularies, raw):
            objects, stats = assign_entities(
                ents, vocab, as_detections(dets, len(vocab.concepts)), threshold=self.threshold, nms_iou=self.nms_iou
            )
            out[i].update(objects=[o.to_record() for o in objects], box_stats=stats.to_record())
            if not objects:
                out[i].update(status=NO_BOXES, reason=f"no box kept at threshold {self.threshold} ({stats.to_record()})")
        return out


__all__ = [
    "AnnotationStep",
    "BoxLabelStep",
    "ExtractStep",
    "InstructionStep",
    "RecaptionStep",
    "instruction_answer",
    "IMAGE_ERROR",
    "RECAPTION_FAILED",
    "NO_BOXES",
    "PARSE_FAILED",
]
