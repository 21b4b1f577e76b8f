"""Object tags per image (SynTIC Eq. 4: O = {o_1..o_m}) and the CLIP text features of the tag vocabulary."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from pipeline.models.detector import Detection, Detector, processor_input_size
from pipeline.data.images import FULL_SIZE_KEY, ImageError, decode_image, skip_reason
from pipeline.data.shards import feature_array

if TYPE_CHECKING:  # a type only: tagging images loads no CLIP (open_clip)
    from pipeline.models.clip import ClipEncoder

TAG_SCHEMA_FIELDS = [("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                     ("boxes", pa.list_(pa.list_(pa.float32(), 4)))]


def distinct_tags(detection: Detection, max_tags: int) -> Detection:
    """Keep each label once, at its most confident box, most confident labels first."""
    best: dict[str, int] = {}
    for i, (label, score) in enumerate(zip(detection.labels, detection.scores)):
        if label not in best or score > detection.scores[best[label]]:
            best[label] = i
    order = sorted(best.values(), key=lambda i: (-detection.scores[i], detection.labels[i]))[:max_tags]
    return Detection([detection.labels[i] for i in order], [detection.scores[i] for i in order],
                     [detection.boxes[i] for i in order])


def detector_input_size(detector) -> tuple[int, int] | None:
    """(s, s) for the shortest edge s the detector's processor resizes images to, or None."""
    return processor_input_size(getattr(detector, "processor", None))


def _decode_for_detector(blob: bytes, item: str, min_size: tuple[int, int] | None) -> Image.Image:
    """The one decoder every stage uses, keeping no more pixels than the detector looks at: a JPEG is
    decoded at the smallest DCT scale still covering ``min_size``, and any image is then reduced (box
    filter) by the largest integer factor that keeps both sides >= ``min_size``, so a batch holds small
    images only (a non-JPEG is decoded at full size once, within the decoder's ``max_pixels``). An image
    of our own stages that cannot be decoded is an error naming it, never a skip."""
    try:
        image = decode_image(blob, draft_size=min_size)
    except ImageError as err:
        raise ValueError(f"image {item!r} cannot be decoded: {skip_reason(err)}") from err
    factor = min(image.width // min_size[0], image.height // min_size[1]) if min_size else 1
    if factor >= 2:
        info, image = image.info, image.reduce(factor)
        image.info = info
    return image


def _to_full_scale(detection: Detection, image: Image.Image) -> Detection:
    """Boxes measured on a JPEG decoded at reduced scale, in pixels of the full-size image."""
    full_width, full_height = image.info.get(FULL_SIZE_KEY, image.size)
    if (full_width, full_height) == image.size:
        return detection
    sx, sy = full_width / image.width, full_height / image.height
    boxes = [[min(x0 * sx, full_width), min(y0 * sy, full_height),
              min(x1 * sx, full_width), min(y1 * sy, full_height)] for x0, y0, x1, y1 in detection.boxes]
    return Detection(detection.labels, detection.scores, boxes)


def tag_table(images: pa.Table, detector: Detector, id_column: str, threshold: float, max_tags: int,
              batch_size: int, draft_size: tuple[int, int] | None = None) -> pa.Table:
    """images (id, image bytes) -> id, labels, scores, boxes (pixels of the full-size, upright image).

    ``draft_size``: the ``(width, height)`` the detector needs at least (None: its processor's shortest
    input edge on both sides, ``detector_input_size``; full size if it has none). JPEGs are decoded at
    reduced DCT scale and every image reduced to about that size before it reaches the detector
    (``_decode_for_detector``), so a huge photo is never held at full size; the boxes are mapped back
    to full-size pixels."""
    min_size = draft_size if draft_size is not None else detector_input_size(detector)
    ids = images.column(id_column).to_pylist()
    blobs = images.column("image").to_pylist()
    detections: list[Detection] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="  tags", unit="batch", leave=False):
        batch = [_decode_for_detector(b, item, min_size)
                 for b, item in zip(blobs[start:start + batch_size], ids[start:start + batch_size])]
        detections += [distinct_tags(_to_full_scale(d, im), max_tags)
                       for d, im in zip(detector.detect(batch, threshold), batch)]
    return pa.table({id_column: ids,
                     "labels": pa.array([d.labels for d in detections], TAG_SCHEMA_FIELDS[0][1]),
                     "scores": pa.array([d.scores for d in detections], TAG_SCHEMA_FIELDS[1][1]),
                     "boxes": pa.array([d.boxes for d in detections], TAG_SCHEMA_FIELDS[2][1])})


def vocabulary_table(labels: list[str], clip: ClipEncoder, dtype: str) -> pa.Table:
    """Every detector label with its CLIP text feature o^t = CLIP_t(o) (Eq. 4)."""
    features = clip.encode_texts(labels) if labels else np.zeros((0, clip.dim), np.float32)
    return pa.table({"label": labels, "text_feature": feature_array(features, dtype)})
