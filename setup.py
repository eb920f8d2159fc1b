"""Ahead-of-time build of csrc/ (the fused crope::qkv_rotary op).

    pip install -e . --no-build-isolation      # or: python setup.py build_ext --inplace
    pip install -e .[hf] --no-build-isolation  # and what export_hf.py needs (transformers, safetensors)

Sources and flags come from fused_op.build.extension_spec(), which the just-in-time build uses too. The CUDA
kernels are built when PyTorch has CUDA, a CUDA toolkit is found (CUDA_HOME, else nvcc on the PATH), and a
GPU is present or TORCH_CUDA_ARCH_LIST names the architectures to build for (e.g. "8.0;9.0").
The fused_op package loads the result as torch.ops.crope.
"""

import sys
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from fused_op.build import extension_spec  # noqa: E402  (the fused_op package sits beside this file)

spec = extension_spec()
Extension = cpp_extension.CUDAExtension if spec["cuda"] else cpp_extension.CppExtension

setup(
    name="crope",
    version="0.1.0",
    description="CRoPE: complex-linear Q/K/V projections before rotary position embedding",
    py_modules=["crope", "cli", "ctrl_c", "data", "runs", "settings"],  # what sample.py and the tools import
    packages=["fused_op"],
    ext_modules=[Extension(spec["name"], [str(s.relative_to(ROOT)) for s in spec["sources"]],
                           extra_compile_args={"cxx": spec["cflags"], "nvcc": spec["cuda_cflags"]})],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    extras_require={"hf": ["transformers>=5", "safetensors"]},  # export_hf.py and its test only
)
