"""The Gradio page at ``/`` of a replica's app: the same queries, batching and limits as the API, and
examples from ``--data-root``'s held-out test categories.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from capenext.cli import UsageError
from jobs.serving.app import Service, parse_form
from jobs.serving.limits import ApiError, BodyTooLarge

EXAMPLES = 3  # example images on the page: the first image of this many held-out test categories
PAGE_CACHE = (60, 600)  # the page's uploads and pictures: every 60 s, those older than 600 s are deleted
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never phones home


# --- the page ---------------------------------------------------------------------------------------


def mount_page(api, service: Service) -> None:
    """The Gradio page at ``/`` of ``api``: same queries, same batching, same limits as the API."""
    # uploads and the page's files stay in the replica's own temporary folder
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(service._tmp.name) / "gradio"))
    import gradio as gr

    info, page = service.info, service.page
    categories = {c["name"]: c for c in page.get("categories", [])}
    example_dir = Path(service._tmp.name) / "examples"
    example_dir.mkdir(exist_ok=True)
    examples = []
    for i, ex in enumerate(page.get("examples", [])):
        path = example_dir / f"{i}-{Path(ex['file']).name}"
        path.write_bytes(ex["data"])
        examples.append([str(path), ", ".join(ex["keypoints"]), ex["class"],
                         ",".join(f"{a}-{b}" for a, b in ex["skeleton"]),
                         ",".join(f"{v:g}" for v in ex["bbox"])])

    async def run(image_path, names_text, class_name, skeleton_text, bbox_text):
        if not image_path:
            raise gr.Error("Upload an image first.")
        try:
            path = Path(image_path)
            if not path.is_file():
                raise ApiError(400, "the upload is gone (uploads are kept for ten minutes): upload the image again")
            if path.stat().st_size > service.max_upload:
                raise BodyTooLarge(service.max_upload)
            data = path.read_bytes()
            names, skeleton, bbox = parse_form(names_text, skeleton_text, bbox_text)
            class_name = service.check_fields(names, skeleton, class_name)
            async with service.decoded(data) as rgb:
                query = await service.check(rgb, names, class_name, skeleton, bbox)
                points = await service.answer(query)
                picture = await service.cpu(service.picture, query, points)
        except ApiError as err:
            raise gr.Error(err.message) from None
        return picture, service.record(query, points)

    def fill(name):
        c = categories.get(name)
        if c is None:
            return gr.update(), gr.update(), gr.update()
        return ", ".join(c["keypoints"]), c["name"].replace("_", " "), ",".join(f"{a}-{b}" for a, b in c["skeleton"])

    described = (f"**Model:** `{info['checkpoint']}` · {info['ablation']} ablation · {info['backbone']} backbone · "
                 f"CLIP {info['clip_model']} · crop {info['image_size']} px · up to {info['max_keypoints']} "
                 "keypoints")
    with gr.Blocks(title="CapeNext", delete_cache=PAGE_CACHE) as blocks:  # uploads and pictures go after 10 min
        gr.Markdown("## CapeNext: keypoints from their names\nUpload an image, name the keypoints you want "
                    "(any words), say what the object is, and run. The model never needs an example of "
                    "the category.")
        gr.Markdown(described, elem_id="model-info")
        with gr.Row():
            with gr.Column():
                # image_mode None: the component hands over the uploaded file as is (PIL only reads its
                # header), and the replica decodes it as the API does
                image = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="Image",
                                 elem_id="image")
                if categories:
                    category = gr.Dropdown(sorted(categories), value=None, label="Start from a training category",
                                           elem_id="category")
                names = gr.Textbox(label="Keypoint names (comma-separated)", placeholder="nose, left eye, right eye",
                                   elem_id="names")
                class_name = gr.Textbox(label="Class", placeholder="cat", elem_id="class")
                with gr.Row():
                    skeleton = gr.Textbox(label="Skeleton (optional)", placeholder="0-1,0-2", elem_id="skeleton")
                    bbox = gr.Textbox(label="Box x,y,w,h in pixels (optional, default the whole image)",
                                      placeholder="10,20,200,150", elem_id="bbox")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                picture = gr.Image(type="pil", format="png", label="Prediction", interactive=False,
                                   elem_id="picture")
                result = gr.JSON(label="JSON (as POST /v1/predict answers)", elem_id="result")
        if examples:
            gr.Examples(examples, [image, names, class_name, skeleton, bbox],
                        label="Examples: held-out categories of the synthetic set")
        button.click(run, [image, names, class_name, skeleton, bbox], [picture, result], api_name=False)
        if categories:
            category.change(fill, category, [names, class_name, skeleton], api_name=False)
    # the page's runs: as many at once as make one forward, a bounded line behind them ("queue full" past it)
    blocks.queue(default_concurrency_limit=service.options.max_batch_size, max_size=service.options.queued)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing fetched
    gr.mount_gradio_app(api, blocks, path="/", ssr_mode=False, footer_links=[], max_file_size=service.max_upload,
                        allowed_paths=[str(example_dir)], theme=theme, mcp_server=False)


def read_page(data_root: str | None, split: int) -> dict[str, Any]:
    """The page's training categories (the split's train file) and a few examples (the first image of the
    first held-out test categories, with their names, class, skeleton and box), read once where the
    application is built."""
    if not data_root:
        return {}
    from capenext.data.mp100 import DataError, load_split

    root = Path(data_root)
    try:
        train = load_split(root, split, "train", missing="ignore")
        test = load_split(root, split, "test", missing="skip")
    except (DataError, FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data-root {root}: {' '.join(str(err).split())}") from None
    cats = [{"name": c.name, "keypoints": list(c.keypoints), "skeleton": [list(e) for e in c.skeleton]}
            for c in sorted(train.categories.values(), key=lambda c: c.name)]
    examples = []
    for cid, idx in sorted(test.by_category().items()):
        if not idx or len(examples) >= EXAMPLES:
            continue
        s, c = test.samples[idx[0]], test.categories[cid]
        examples.append({"file": s.file_name, "data": test.image_path(s).read_bytes(), "class": c.class_text,
                         "keypoints": list(c.keypoints), "skeleton": [list(e) for e in c.skeleton],
                         "bbox": list(s.bbox)})
    return {"categories": cats, "examples": examples}
