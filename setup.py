"""Install dinov2od: ``pip install -e . --no-build-isolation`` (torch must already be installed).

The compiled multi-scale deformable attention op (``dinov2od._C``) is optional:
- sources under ``dinov2od/layers/csrc/`` are compiled when present;
- CUDA kernels are built when ``torch.cuda.is_available()`` or ``FORCE_CUDA=1``
  (``TORCH_CUDA_ARCH_LIST`` selects the architectures), else only the CPU kernel;
- ``DINOV2OD_NO_EXT=1`` skips the extension; the PyTorch path then runs everywhere.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("dinov2od", "layers", "csrc")


def _openmp_flags():
    """-fopenmp (compile only) when torch's intra-op backend is OpenMP.

    ``at::parallel_for`` is inline in the headers: without ``_OPENMP`` it runs serially. The
    OpenMP runtime symbols stay undefined in ``_C`` and resolve to the runtime torch already
    loaded, so ``torch.set_num_threads`` governs the kernel too (no second runtime is linked).
    """
    import torch

    if os.name == "nt":
        return ["/openmp"]
    if "OpenMP" in torch.__config__.parallel_info() and os.uname().sysname == "Linux":
        return ["-fopenmp"]
    return []


def get_extensions():
    if os.environ.get("DINOV2OD_NO_EXT", "0") == "1":
        return []
    cpp = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    if not cpp:
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cu = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    want_cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    define_macros = []
    extra_compile_args = {"cxx": ["-O3"] + _openmp_flags()}
    if want_cuda and cu and CUDA_HOME is not None:
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "dinov2od._C",
                cpp + cu,
                include_dirs=[os.path.join(HERE, CSRC)],
                define_macros=define_macros,
                extra_compile_args=extra_compile_args,
            )
        ]
    if want_cuda:
        print("dinov2od: CUDA requested but no CUDA toolkit found (CUDA_HOME); building the CPU op only")
    return [
        CppExtension(
            "dinov2od._C",
            cpp,
            include_dirs=[os.path.join(HERE, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    ]


def get_cmdclass():
    if not get_extensions():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="dinov2od",
    version="0.1.0",
    description="DINOv2 + LoRA backbone with a deformable DETR decoder, on Detectron2",
    packages=find_packages(exclude=("tests", "tests.*", "configs", "tools")),
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "torchvision", "transformers>=4.57", "peft", "scipy"],
    extras_require={"d2": ["pycocotools", "fvcore", "iopath"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
