#!/usr/bin/env python
"""Train or evaluate dinov2od with Detectron2.

Lazy configs (``.py``) and yacs configs (``.yaml``) are both accepted::

    python tools/train_net.py --config-file configs/shapes.py                      # CPU demo
    python tools/train_net.py --config-file configs/coco.py --num-gpus 8           # COCO
    python tools/train_net.py --config-file configs/coco.py --num-gpus 8 --resume   # continue
    python tools/train_net.py --config-file configs/coco.py --eval-only train.init_checkpoint=model_final.pth
    python tools/train_net.py --config-file configs/yaml/shapes.yaml SOLVER.MAX_ITER 100
    torchrun --nproc_per_node=8 tools/train_net.py --config-file configs/coco.py         # torchrun
    srun --ntasks-per-node=8 python tools/train_net.py --config-file configs/coco.py     # SLURM

Under torchrun or srun the processes they started join one job (no ``--num-gpus``); otherwise
Detectron2's ``launch()`` spawns ``--num-gpus`` workers per machine. ``--dist-timeout SECONDS``
(default 1800) ends the job when a rank stalls or dies; a worker exits when its launcher dies.
See docs/distributed.md.

Trailing ``key=value`` (lazy) or ``KEY VALUE`` (yacs) pairs override the config. Outputs
(checkpoints, ``log.txt``, ``metrics.json``, TensorBoard events, ``inference/`` with
``coco_instances_results.json``, ``predictions/`` with drawn detections, and the pictures of
``dinov2od/d2/evaluation/plots.py``: ``results.png``, ``pr_curves.png``, ``per_class_ap.csv``,
``confusion_matrix.png``/``.csv``, ``val_examples.jpg``) go to the config's output directory.

One output folder takes one run at a time: a run holds a lock on ``train_net.lock`` in it (released
when the process exits, even by a crash or ``kill -9``), and another training or ``--eval-only`` into
it meanwhile is refused, naming the holder. A new training (no ``--resume``) into a folder that holds
one (``last_checkpoint``, ``model_*.pth``, ``metrics.json``) is refused with the choices: ``--resume``,
another folder, or ``--overwrite`` (removes that run's checkpoints, tag, metrics, events,
``inference/``, ``predictions/`` and result plots; nothing else). ``--eval-only`` may use such a
folder. See docs/training.md.

On a CPU shared with other work, ``OMP_WAIT_POLICY=PASSIVE python tools/train_net.py ...`` makes
idle OpenMP threads sleep instead of spinning (``make demo`` sets it); the tool itself leaves
OpenMP's settings to the user.
"""
import contextlib
import logging
import logging.handlers
import os
import sys
import time

STARTED = time.time()  # the summary's wall time counts from here (dataset generation included)
PARENT_PID = os.getppid()  # the launcher (torchrun), seen before the slow imports: a worker dies with it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import dinov2od.d2  # noqa: E402,F401  (registers the meta-architecture and the shapes dataset)
from dinov2od.d2.config import is_lazy, load_config  # noqa: E402
from dinov2od.d2.checkpoint.run_folder import RunFolderError, claim_output_folder  # noqa: E402
from dinov2od.d2.engine.launch import add_launch_arguments, launch_main  # noqa: E402
from dinov2od.d2.engine.trainer import LazyTrainer, Trainer  # noqa: E402
from dinov2od.d2.evaluation.plots import plot_inputs_from_config, write_result_plots  # noqa: E402
from dinov2od.d2.evaluation.report import run_summary  # noqa: E402
from dinov2od.d2.evaluation.visualize import draw_dataset_predictions  # noqa: E402

logger = logging.getLogger("dinov2od")


def _report(output_dir: str, vis_dir: str = "", curve_rows: int = 0) -> None:
    if comm.is_main_process():
        logger.info(run_summary(output_dir, STARTED, vis_dir, curve_rows))


def _plots(cfg) -> None:
    """The run's pictures in its output folder (``results.png``, ``pr_curves.png``, ``per_class_ap.csv``,
    ``confusion_matrix.png``/``.csv``, ``val_examples.jpg``: :mod:`dinov2od.d2.evaluation.plots`), main process
    only; a picture that cannot be drawn is a warning, never a failed run."""
    if not comm.is_main_process():
        return
    try:
        write_result_plots(**plot_inputs_from_config(cfg), since=STARTED)
    except Exception as e:  # noqa: BLE001
        logger.warning("Could not write the result plots: %s: %s", type(e).__name__, e)


def claim_folder(args, output_dir: str):
    """Claim the output folder for this run before anything is written into it
    (:func:`~dinov2od.d2.checkpoint.run_folder.claim_output_folder`: its lock; a new run into a folder holding a
    training is refused unless ``--resume`` or ``--overwrite``).

    The main process (global rank 0, which writes the checkpoints, metrics and config) claims it; in a
    distributed job every rank then learns its verdict, so a refused job stops on every rank at once with
    that message (not a lost peer's error, nor a wait for the timeout where a lost peer goes unnoticed),
    and the job's own ranks never refuse each other.

    Returns:
        the claim on the main process (release it when the run ends), else None.
    """
    claim, refusal, error = None, "", None
    if comm.is_main_process():
        try:
            claim = claim_output_folder(output_dir, resume=args.resume, eval_only=args.eval_only,
                                        overwrite=getattr(args, "overwrite", False))
        except RunFolderError as e:
            refusal = str(e)
        except Exception as e:  # noqa: BLE001  (e.g. a folder that cannot be created: every rank stops)
            refusal, error = f"{type(e).__name__}: {e}", e
    if comm.get_world_size() > 1:
        refusal = comm.all_gather(refusal)[0]
    if error is not None:
        raise error
    if refusal:
        raise RunFolderError(refusal if comm.is_main_process() else
                             f"rank {comm.get_rank()} stops: rank 0 refused the output folder {output_dir}.")
    return claim


def setup(args, hold=None):
    """The config (lazy or yacs, :func:`~dinov2od.d2.config.load_config`) with the command line's
    overrides applied and its own data registered, once the output folder is claimed for this run
    (:func:`claim_folder`; its lock is released when ``hold``, an ``ExitStack``, closes, else when the
    process ends)."""
    early = logging.handlers.BufferingHandler(capacity=10000)  # what load_config logs, shown once the
    logger.addHandler(early)                                     # logger is set up below
    logger.setLevel(logging.DEBUG)
    try:
        cfg = load_config(args.config_file, args.opts, batch=not args.eval_only,  # batch: per GPU x GPUs
                          check_weights=True)  # a hub id that cannot be had here: stop first
    finally:
        logger.removeHandler(early)
    if is_lazy(cfg):
        output_dir = cfg.train.output_dir
    else:
        cfg.freeze()
        output_dir = cfg.OUTPUT_DIR
    claim = claim_folder(args, output_dir)  # before default_setup writes config.yaml and log.txt
    if claim is not None and hold is not None:
        hold.callback(claim.release)
    default_setup(cfg, args)
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="dinov2od")
    for record in early.buffer:
        logger.handle(record)
    if claim is not None and claim.removed:
        logger.info("--overwrite: removed the earlier run's %s from %s", ", ".join(claim.removed), output_dir)
    return cfg


def main(args):
    """Train (or with ``--eval-only``, evaluate); returns the last evaluation results. The output
    folder is this run's until it returns (:func:`claim_folder`)."""
    with contextlib.ExitStack() as hold:
        return _main(args, setup(args, hold))


def _main(args, cfg):
    lazy = is_lazy(cfg)
    trainer_class = LazyTrainer if lazy else Trainer
    if args.eval_only:
        results = trainer_class.eval_only(cfg, resume=args.resume)
        _plots(cfg)
        return results
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    vis_dir = ""
    vis = cfg.train.get("visualize", {}) if lazy else {}
    if vis.get("num_images", 0) > 0 and comm.is_main_process():
        vis_dir = os.path.join(cfg.train.output_dir, "predictions")
        draw_dataset_predictions(
            trainer.model,
            cfg.dataloader.test,
            vis_dir,
            num_images=vis.num_images,
            score_threshold=vis.get("score_threshold", 0.5),
            ema=trainer.ema,
        )
    _plots(cfg)
    _report(trainer.settings.output_dir, vis_dir, cfg.train.get("print_loss_curve", 0) if lazy else 0)
    return results


def argument_parser():
    """Detectron2's ``default_argument_parser()`` with ``--dist-timeout``, ``--launcher`` and ``--overwrite``."""
    parser = add_launch_arguments(default_argument_parser())
    parser.add_argument(
        "--overwrite", action="store_true",
        help="train from the start into an output folder that holds an earlier training: first remove that "
             "run's checkpoints, last_checkpoint, metrics.json, events, inference/, predictions/ and result "
             "plots (nothing else; log.txt is appended to). Without it such a folder is refused; --resume continues it")
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    if not args.config_file:
        raise SystemExit("--config-file is required (e.g. configs/shapes.py)")
    launch_main(main, args, parent_pid=PARENT_PID)  # torchrun / srun's processes, or launch()


if __name__ == "__main__":
    invoke_main()
