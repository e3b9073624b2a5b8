#!/usr/bin/env python
"""Convert a dinov2od checkpoint to a file that loads without running code.

    python tools/convert_checkpoint.py output/run/model_final.pth model.safetensors
    python tools/convert_checkpoint.py model_final.pth model.safetensors --config-file configs/shapes.py
    DINOV2OD_TRUSTED_CHECKPOINTS=$PWD/old/model_final.pth \\
        python tools/convert_checkpoint.py old/model_final.pth old/model_final_safe.pth

``OUT.safetensors``: the model's weights (a training checkpoint's EMA weights when it has them,
unless ``--no-ema``) and ``OUT.json`` beside it: classes, and with ``--config-file`` (the config it
was trained with; the weights must fit the model it builds) the detector's constructor arguments
and input settings, so ``DINOv2ObjectDetector.from_exported(OUT.safetensors)`` rebuilds it. Every
loader of dinov2od accepts the ``.safetensors`` file where it accepts a ``.pth``.

``OUT.pth``: the whole file (a training checkpoint with its optimizer, scheduler, EMA and random
states) saved again so that ``torch.load(weights_only=True)`` reads it, e.g. to ``--resume`` from a
checkpoint of an earlier dinov2od version.

The input is read like every checkpoint (SECURITY.md): a file that needs full unpickling, which
can run code, is refused unless it is named in ``DINOV2OD_TRUSTED_CHECKPOINTS``. The output never
replaces the input or an existing file (``--overwrite`` replaces an existing output).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dinov2od.modeling.checkpoint_io import (  # noqa: E402
    export_for_inference,
    load_state,
    not_weights_only,
    plain_state,
)

logger = logging.getLogger("dinov2od.convert")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read (.pth, .pkl, .safetensors)")
    p.add_argument("output", help="OUT.safetensors (weights + OUT.json) or OUT.pth (the whole file, weights_only-readable)")
    p.add_argument("--no-ema", action="store_true", help="OUT.safetensors: the model's weights, not the EMA's")
    p.add_argument("--config-file", default=None,
                   help="OUT.safetensors: the config it was trained with (lazy .py / config.yaml / yacs .yaml): "
                        "records the constructor arguments and checks that the weights fit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("opts", nargs="*", help="config overrides of --config-file (key=value or KEY VALUE)")
    return p.parse_intermixed_args(argv)


def inference_weights(obj, use_ema: bool):
    """The ``state_dict`` to export from what a checkpoint holds: its EMA weights (``use_ema``, when
    it has an EMA that was updated), else its ``"model"``, else the object itself."""
    if not isinstance(obj, dict):
        raise SystemExit(f"convert_checkpoint.py: the input holds a {type(obj).__name__}, not a state dict")
    weights = obj.get("model", obj)
    ema = obj.get("ema") if use_ema else None
    if isinstance(ema, dict) and int(ema.get("num_updates", 0)) > 0 and isinstance(ema.get("shadow"), dict):
        weights = {**weights, **ema["shadow"]}
        logger.info("Exporting the EMA weights (%d updates)", int(ema["num_updates"]))
    return {k: torch.as_tensor(v) for k, v in weights.items()}


def _model_for(args, weights_file: str, use_ema: bool):
    """The model of ``--config-file`` with ``weights_file`` loaded (its EMA weights with ``use_ema``;
    refused unless it fits)."""
    import dinov2od.d2  # noqa: F401  (registers the meta-architecture)
    from dinov2od.d2.checkpoint import load_inference_weights
    from dinov2od.d2.config import is_lazy
    from dinov2od.d2.engine.predictor import load_inference_config

    cfg = load_inference_config(args.config_file, args.opts, weights_file)
    if is_lazy(cfg):
        from detectron2.config import instantiate

        model = instantiate(cfg.model)
    else:
        from detectron2.modeling import build_model

        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
    model.to("cpu").eval()
    load_inference_weights(model, weights_file, use_ema=use_ema)
    return model


def convert(args) -> str:
    src, out = args.input, args.output
    if os.path.realpath(src) == os.path.realpath(out):
        raise SystemExit("convert_checkpoint.py: the output would replace the input; give another name")
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"convert_checkpoint.py: {out} exists; give another name or --overwrite")
    if not out.endswith((".safetensors", ".pth", ".pt")):
        raise SystemExit("convert_checkpoint.py: the output must end with .safetensors (weights) or .pth (whole file)")
    try:
        obj = load_state(src)
    except (ValueError, FileNotFoundError) as e:  # UnsafeCheckpointError says how to opt in
        raise SystemExit(f"convert_checkpoint.py: {e}") from None
    if out.endswith(".safetensors"):
        if src.endswith(".safetensors"):
            obj = {"model": obj}
        if args.config_file:  # the model checks the fit and picks the EMA weights as prediction does
            model = _model_for(args, src, use_ema=not args.no_ema)
            weights = model.state_dict()
        else:
            model, weights = None, inference_weights(obj, use_ema=not args.no_ema)
        path, json_path = export_for_inference(model, out, weights, converted_from=os.path.basename(src))
        logger.info("Wrote %s (%d tensors) and %s", path, len(weights), json_path)
        return path
    if isinstance(obj, dict):  # a training checkpoint of an earlier version: numpy's random state as a tuple
        hooks = obj.get("trainer", {}).get("hooks", {}) if isinstance(obj.get("trainer"), dict) else {}
        rng = hooks.get("RNGStateHook") if isinstance(hooks, dict) else None
        if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
            from dinov2od.d2.checkpoint.resume import numpy_state_to_plain

            rng["numpy"] = numpy_state_to_plain(rng["numpy"])
    obj = plain_state(obj)
    bad = not_weights_only(obj)
    if bad:
        raise SystemExit(f"convert_checkpoint.py: {src} holds entries that are not plain data ({', '.join(bad)}); "
                         "convert to .safetensors instead (the weights only)")
    from dinov2od.d2.checkpoint import atomic_save

    atomic_save(obj, out)
    torch.load(out, map_location="cpu", weights_only=True)  # what the conversion promises
    logger.info("Wrote %s (loads with torch.load(weights_only=True))", out)
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return convert(parse_args(argv))


if __name__ == "__main__":
    main()
