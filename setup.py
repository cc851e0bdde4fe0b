"""Builds fastdarts._C, the C++ kernels (CPU always; CUDA sources only when this torch has CUDA)."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def get_extensions():
    if os.environ.get("FASTDARTS_NO_EXT", "0") == "1":
        return []
    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # Decide on CUDA from the installed torch and toolkit, never from a visible GPU,
    # so a GPU-less build box still produces a CUDA-capable wheel.
    use_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and os.environ.get("FASTDARTS_USE_CUDA", "1") != "0"
    cxx = ["-O3" if not debug else "-O0", "-std=c++17", "-fopenmp"]
    if debug:
        cxx += ["-g"]
    kwargs = dict(
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda and cuda_sources:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3" if not debug else "-O0"]
        return [CUDAExtension("fastdarts._C", sources + cuda_sources, **kwargs)]
    return [CppExtension("fastdarts._C", sources, **kwargs)]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
