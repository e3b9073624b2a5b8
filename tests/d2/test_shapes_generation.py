"""The shapes split written by parallel workers is the one a single process writes."""
import io
import json
import os

from PIL import Image

from dinov2od.d2.data.datasets.shapes import SHAPES_SPLITS, ensure_shapes_split, generate_shapes_image


def test_parallel_generation_writes_the_serial_images_and_annotations(tmp_path):
    json_file, image_root = ensure_shapes_split("val", root=str(tmp_path), num_images=130)  # 2 workers
    coco = json.load(open(json_file))
    seed = SHAPES_SPLITS["val"][1]
    assert [im["file_name"] for im in coco["images"]] == [f"{i:06d}.jpg" for i in range(130)]
    for i in (0, 64, 129):  # one image per chunk of work
        image, annos = generate_shapes_image(seed + i)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        assert open(os.path.join(image_root, f"{i:06d}.jpg"), "rb").read() == buf.getvalue()
        got = [{k: a[k] for k in ("bbox", "area", "category_id")} for a in coco["annotations"] if a["image_id"] == i + 1]
        assert got == [{k: a[k] for k in ("bbox", "area", "category_id")} for a in annos]
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
