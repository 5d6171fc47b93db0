"""Write `datasets/coco_sample/`: 6 tiny images with COCO-format instance annotations
(`instances.json`) and reference captions (`captions.json`), for tests and the README flow
of `mmalign eval chair|pope` and `mmalign build-pairs inject`.

Rerun from the repository root:

    .venv/bin/python datasets/coco_sample/make_sample.py

Images are 64x64 PNGs with one filled box per annotated object (a colour per category);
they only need to exist and load. Category ids and names are COCO's. Some captions name an
object that is not annotated (image 1's bench), as real COCO captions do: CHAIR counts it
as present (ground truth = annotations ∪ caption objects).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent
CATEGORIES = {1: "person", 2: "bicycle", 3: "car", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
              19: "horse", 34: "frisbee", 47: "cup", 53: "pizza", 57: "couch", 67: "dining table"}
# image id -> (annotated category ids, reference captions)
IMAGES = {
    1: ([1, 19], ["A man riding a horse in a field.", "A person on a brown horse next to a bench."]),
    2: ([18, 17, 57], ["A dog and a cat sleeping on a couch.", "Two pets resting on a sofa."]),
    3: ([53, 67, 47], ["A pizza on a table next to a cup.", "A pizza and a mug on a wooden table."]),
    4: ([3, 2, 1], ["A man rides a bike past a parked car.", "A bicycle and a car on the street."]),
    5: ([16, 15], ["A bird sitting on a park bench.", "A small bird perched on a bench."]),
    6: ([1, 18, 34], ["A woman throwing a frisbee to her dog.", "A dog catching a frisbee in the park."]),
}


def colour(category_id: int) -> tuple[int, int, int]:
    return ((category_id * 67) % 256, (category_id * 131) % 256, (category_id * 197) % 256)


def main() -> None:
    (OUT / "images").mkdir(exist_ok=True)
    images, annotations, captions = [], [], []
    for image_id, (cats, texts) in IMAGES.items():
        name = f"{image_id:012d}.png"
        image = Image.new("RGB", (64, 64), (200, 200, 200))
        pen = ImageDraw.Draw(image)
        for k, cat in enumerate(cats):
            box = [4 + 18 * k, 8 + 6 * k, 22 + 18 * k, 40 + 6 * k]
            pen.rectangle(box, fill=colour(cat))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        image.save(OUT / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
        captions += [{"id": len(captions) + 1, "image_id": image_id, "caption": t} for t in texts]
    categories = [{"id": i, "name": n, "supercategory": "object"} for i, n in CATEGORIES.items()]
    (OUT / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}, indent=1) + "\n")
    (OUT / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}, indent=1) + "\n")


if __name__ == "__main__":
    main()
