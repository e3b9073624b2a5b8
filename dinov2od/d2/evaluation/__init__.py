"""After training: evaluation (:mod:`.evaluator`), the pictures a run leaves in its output folder
(:mod:`.plots`, the entry, drawing with :mod:`.curves`, :mod:`.per_class`, :mod:`.confusion`,
:mod:`.examples` and :mod:`.figures`), the run's summary (:mod:`.report`) and drawing detections
(:mod:`.visualize`).

Only the evaluator is named here; the pictures, the report and the drawing are imported from their
modules."""
from .evaluator import SubsetCOCOEvaluator, detections_to_coco_results, eval_context, run_evaluation

__all__ = ["SubsetCOCOEvaluator", "detections_to_coco_results", "eval_context", "run_evaluation"]
