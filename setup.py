"""Ahead-of-time build of csrc/ (the fused crope::qkv_rotary op).

    pip install -e . --no-build-isolation      # or: python setup.py build_ext --inplace

Builds the CUDA kernels too when PyTorch has CUDA and a CUDA toolkit is found (CUDA_HOME or nvcc
on the PATH); for which GPUs, TORCH_CUDA_ARCH_LIST decides (default: the GPUs present).
crope.py loads the result as torch.ops.crope; without it, it builds the same sources just in time.
"""

from setuptools import setup
from torch.utils import cpp_extension

cuda = cpp_extension.CUDA_HOME is not None and cpp_extension.torch.version.cuda is not None
Extension = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
sources = ["csrc/crope_qkv.cpp"] + (["csrc/crope_qkv_cuda.cu"] if cuda else [])
flags = ["-O3"] + (["-DWITH_CUDA"] if cuda else [])

setup(
    name="crope",
    version="0.1.0",
    description="CRoPE: complex-linear Q/K/V projections before rotary position embedding",
    py_modules=["crope"],
    ext_modules=[Extension("crope_ext", sources, extra_compile_args={"cxx": flags, "nvcc": flags})],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
