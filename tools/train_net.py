#!/usr/bin/env python
"""Train or evaluate dinov2od with Detectron2.

Lazy configs (``.py``) and yacs configs (``.yaml``) are both accepted::

    python tools/train_net.py --config-file configs/shapes.py                      # CPU demo
    python tools/train_net.py --config-file configs/coco.py --num-gpus 8           # COCO
    python tools/train_net.py --config-file configs/coco.py --num-gpus 8 --resume   # continue
    python tools/train_net.py --config-file configs/coco.py --eval-only train.init_checkpoint=model_final.pth
    python tools/train_net.py --config-file configs/yaml/shapes.yaml SOLVER.MAX_ITER 100

Trailing ``key=value`` (lazy) or ``KEY VALUE`` (yacs) pairs override the config. Outputs
(checkpoints, ``log.txt``, ``metrics.json``, TensorBoard events, ``inference/`` with
``coco_instances_results.json``, and ``predictions/`` with drawn detections) go to the
config's output directory.
"""
import logging
import os
import sys

# OpenMP threads that sleep instead of spinning while idle: on a shared CPU (this project's
# 2-core machines run tests beside the demo) spinning threads slow training several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import LazyConfig, get_cfg  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import dinov2od.d2  # noqa: E402,F401  (registers the meta-architecture and the shapes dataset)
from dinov2od.d2.config import add_dinov2od_config  # noqa: E402
from dinov2od.d2.training import (  # noqa: E402
    Trainer,
    build_lazy_model,
    do_train_lazy,
    lazy_eval_only,
)
from dinov2od.d2.visualize import draw_dataset_predictions  # noqa: E402

logger = logging.getLogger("dinov2od")


def _report(output_dir: str, vis_dir: str = "") -> None:
    if not comm.is_main_process():
        return
    lines = [f"Outputs are in {os.path.abspath(output_dir)}:"]
    for name, what in (
        ("model_final.pth", "final checkpoint (resume / fine-tune from it)"),
        ("model_final_ema.pth", "EMA weights, for DefaultPredictor / tools/predict.py"),
        ("metrics.json", "training metrics"),
        ("log.txt", "log"),
        ("inference/coco_instances_results.json", "COCO-format detections"),
    ):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            lines.append(f"  {path}  ({what})")
    if vis_dir and os.path.isdir(vis_dir):
        lines.append(f"  {vis_dir}/  (prediction images drawn with Detectron2's Visualizer)")
    logger.info("\n".join(lines))


def main_lazy(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="dinov2od")
    model = build_lazy_model(cfg)
    if args.eval_only:
        return lazy_eval_only(cfg, model)
    model, ema = do_train_lazy(cfg, model, resume=args.resume)
    vis = cfg.train.get("visualize", {})
    vis_dir = ""
    if vis.get("num_images", 0) > 0 and comm.is_main_process():
        vis_dir = os.path.join(cfg.train.output_dir, "predictions")
        draw_dataset_predictions(
            model,
            cfg.dataloader.test,
            vis_dir,
            num_images=vis.num_images,
            score_threshold=vis.get("score_threshold", 0.5),
            ema=ema,
        )
    _report(cfg.train.output_dir, vis_dir)
    return None


def main_yacs(args):
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dinov2od")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        from detectron2.checkpoint import DetectionCheckpointer

        from dinov2od.d2.engine import ModelEMA

        ema = ModelEMA(model, cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        DetectionCheckpointer(model, **({"ema": ema} if ema else {})).load(cfg.MODEL.WEIGHTS)
        if ema is not None and ema.num_updates == 0:  # the checkpoint had no EMA weights
            ema = None
        return Trainer.test(cfg, model, ema=ema)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    _report(cfg.OUTPUT_DIR)
    return None


def main(args):
    if args.config_file.endswith(".py"):
        return main_lazy(args)
    if args.config_file.endswith((".yaml", ".yml")):
        return main_yacs(args)
    raise SystemExit(f"--config-file must be a lazy config (.py) or a yacs config (.yaml), got {args.config_file!r}")


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    if not args.config_file:
        raise SystemExit("--config-file is required (e.g. configs/shapes.py)")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
