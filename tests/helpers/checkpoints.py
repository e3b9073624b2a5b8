"""A malicious checkpoint (real tensors plus an object whose unpickling runs ``exec``) and the refusal
every reader of weights must give (:mod:`dinov2od.modeling.checkpoint_io`)."""
import os
import pickle

import torch

from dinov2od.modeling.checkpoint_io import TRUSTED_ENV

class _Payload:
    """Unpickling it calls ``exec``: it writes ``marker`` (what a malicious checkpoint would do worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def write_malicious(path, marker, state=None):
    """A checkpoint at ``path`` holding ``state`` (a real ``{"model": ...}``, default a tiny one) and a
    payload that writes ``marker`` when unpickled in full. ``.pkl``: a plain pickle (Detectron2's
    model-zoo format); anything else: ``torch.save``."""
    obj = dict(state) if state is not None else {"model": {"w": torch.ones(3)}}
    obj["extra"] = _Payload(marker)
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return str(path)


def assert_refused(error, path, marker):
    """The message names the file, what was refused (exec) and the opt-in; the payload did not run."""
    msg = str(error.value if hasattr(error, "value") else error)
    assert str(path) in msg and "exec" in msg and TRUSTED_ENV in msg and "full unpickling" in msg, msg
    assert not os.path.exists(marker), "the payload ran"
