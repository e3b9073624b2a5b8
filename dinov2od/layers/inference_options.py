"""Which fast paths inference takes: one options object instead of scattered switches.

:class:`InferenceOptions` holds one flag per path; :mod:`dinov2od.layers.kernels` (the one door the
model code calls: ``linear``, ``attention``, ``deformable_sampling``) reads :func:`current_options`
before it picks a kernel. Each flag only *allows* its path: the path still runs only where it
computes the same function (see :mod:`.kernels`: CPU, no gradient, not tracing/exporting/compiling, ...).

=================  ===============================  ===============================================
option             environment variable             off means
=================  ===============================  ===============================================
``fused_linear``   ``DINOV2OD_FUSED_LINEAR=0``      no oneDNN linear (bias and activation fused),
                                                    float32 or bfloat16 (:mod:`.fused_linear`);
                                                    ``fused_blocks`` and the AVX-512 attention
                                                    kernels go with it (they run only where it does)
``fused_blocks``   ``DINOV2OD_FUSED_BLOCKS=0``      the ViT blocks run as written, not as one q/k/v
                                                    product with the LoRA deltas merged
                                                    (:mod:`dinov2od.modeling.inference`)
``cpu_attention``  ``DINOV2OD_CPU_ATTENTION=0``     torch's attention kernel instead of
                                                    ``dinov2od._C``'s AVX-512 ones
                                                    (:mod:`.cpu_attention`)
``compiled_msda``  ``DINOV2OD_COMPILED_MSDA=0``     multi-scale deformable attention runs the
                                                    PyTorch path, not the compiled kernel
                                                    (:mod:`.ms_deform_attn`; in training too)
=================  ===============================  ===============================================

All default to on, and every variable reads the same way: ``0``, ``false``, ``False`` or ``off``
turns its path off; anything else (or unset) leaves it on. The old ``DINOV2OD_FORCE_PYTORCH_MSDA``
(which read the other way) is refused with a message naming ``DINOV2OD_COMPILED_MSDA=0``. The
variables are read here and nowhere else, at each :func:`current_options` call (a set of values is
parsed once), so that a variable set in the process (``monkeypatch.setenv``) takes effect.

Precedence, lowest first: the defaults; the environment; :func:`set_inference_options` (process-wide);
the innermost :func:`inference_options` block (this thread or task: a ``contextvars`` variable)::

    from dinov2od.layers.inference_options import inference_options

    with inference_options(fused_linear=False):   # the plain path, e.g. the A/B of tools/benchmark.py
        model(images)

Other ``DINOV2OD_*`` variables steer no inference path and are read where they act:
``DINOV2OD_ALLOW_SLOW_BF16`` (:mod:`dinov2od.layers.precision`), ``DINOV2OD_DATASETS``
(:mod:`dinov2od.d2.data.datasets.shapes`), ``DINOV2OD_NO_EXT`` (``setup.py``: build without the
extension), and the tests' ``DINOV2OD_EXPECT_*``. The decoder's one value projection for all layers
is the decoder's class attribute ``DeformableDecoder.stack_value_proj`` (a model option, settable per
instance), not one of these. docs/speed.md has this table too, with what each path saves.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

__all__ = ["ENV_VARIABLES", "InferenceOptions", "current_options", "inference_options", "options_from_environment",
           "set_inference_options"]


@dataclass(frozen=True)
class InferenceOptions:
    """The fast paths inference may take (see the module doc's table); all on by default."""

    fused_linear: bool = True
    fused_blocks: bool = True
    cpu_attention: bool = True
    compiled_msda: bool = True


# option -> its environment variable (their meanings: the module doc's table)
ENV_VARIABLES: Dict[str, str] = {
    "fused_linear": "DINOV2OD_FUSED_LINEAR",
    "fused_blocks": "DINOV2OD_FUSED_BLOCKS",
    "cpu_attention": "DINOV2OD_CPU_ATTENTION",
    "compiled_msda": "DINOV2OD_COMPILED_MSDA",
}
_OFF = ("0", "false", "False", "off")
# read the other way (=1 turned the kernel off) until issue 31; refused with the new name
_RETIRED = {"DINOV2OD_FORCE_PYTORCH_MSDA": "DINOV2OD_COMPILED_MSDA=0"}
_FIELDS = tuple(f.name for f in dataclasses.fields(InferenceOptions))


def _parse(raw: Tuple) -> Dict[str, bool]:
    """The options a tuple of raw values of :data:`ENV_VARIABLES`'s variables (None: unset) asks for."""
    for variable, value in zip(_RETIRED, raw[len(ENV_VARIABLES):]):
        if value is not None:
            raise RuntimeError(f"{variable} is no longer read: set {_RETIRED[variable]} instead (every "
                               "DINOV2OD_* switch reads the same way: =0 turns its path off; docs/speed.md)")
    return {name: False for name, value in zip(ENV_VARIABLES, raw) if value is not None and value in _OFF}


_VARIABLES = tuple(ENV_VARIABLES.values()) + tuple(_RETIRED)


def _raw_environment(_get=os.environ.get) -> Tuple:
    """The raw values of :data:`ENV_VARIABLES`' variables and the retired ones (None: unset): the one
    place they are read."""
    return tuple(map(_get, _VARIABLES))


def options_from_environment() -> Dict[str, bool]:
    """The options the environment sets now (only those it sets)."""
    return _parse(_raw_environment())


_PROCESS: Dict[str, bool] = {}  # set_inference_options
_BLOCKS: contextvars.ContextVar[Tuple[Tuple[str, bool], ...]] = contextvars.ContextVar(
    "dinov2od_inference_options", default=())
_RESOLVED: Dict[Tuple, InferenceOptions] = {}  # (raw environment, blocks) -> options; cleared by the setter


def current_options() -> InferenceOptions:
    """The options in force here and now: defaults < environment < :func:`set_inference_options`
    < the innermost :func:`inference_options` block. Called by every path before it runs: the
    environment is read each time (cheap), each combination is resolved once."""
    key = (_raw_environment(), _BLOCKS.get())
    options = _RESOLVED.get(key)
    if options is None:
        if len(_RESOLVED) > 256:  # (a process that keeps changing the variables' values)
            _RESOLVED.clear()
        options = _RESOLVED[key] = InferenceOptions(**{**_parse(key[0]), **_PROCESS, **dict(key[1])})
    return options


def _check(changes: Dict[str, bool]) -> None:
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown inference option(s) {unknown}; the options are {list(_FIELDS)}")
    for name, value in changes.items():
        if not isinstance(value, bool):
            raise TypeError(f"inference option {name}={value!r}: expected True or False")


@contextlib.contextmanager
def inference_options(**changes: bool) -> Iterator[InferenceOptions]:
    """The options ``changes`` in force inside the block (over the environment and the process-wide
    setting; restored on exit, nested blocks stack). Yields the options in force.

    Raises:
        TypeError: an unknown option, or a value that is not a bool.
    """
    _check(changes)
    token = _BLOCKS.set(_BLOCKS.get() + tuple(changes.items()))
    try:
        yield current_options()
    finally:
        _BLOCKS.reset(token)


def set_inference_options(**changes: bool) -> InferenceOptions:
    """Set options process-wide (over the environment, under :func:`inference_options` blocks);
    ``name=None`` drops an earlier setting. Returns the options now in force.

    Raises:
        TypeError: an unknown option, or a value that is neither a bool nor None.
    """
    _check({k: v for k, v in changes.items() if v is not None})
    for name, value in changes.items():
        if value is None:
            _PROCESS.pop(name, None)
        else:
            _PROCESS[name] = value
    _RESOLVED.clear()
    return current_options()
