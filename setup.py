"""Build urkle_fast and its extension urkle_fast._C.

The C++ CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are built
when nvcc is found and torch is a CUDA build, unless URKLE_FAST_SKIP_CUDA_BUILD=1.
kernels/ (Triton) is installed as the subpackage urkle_fast._kernels.

Install with:  pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only build; the package falls back to the references
        print("urkle_fast: torch not importable at build time; skipping urkle_fast._C")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpu_sources:
        print("urkle_fast: no C++ sources in csrc/; skipping urkle_fast._C")
        return [], {}
    # no -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14)
    cxx_flags = ["-O3", "-fopenmp", "-DURKLE_FAST_OMP"]
    link_flags = ["-fopenmp"]

    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
        if os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
        else None
    )
    want_cuda = (
        not _truthy("URKLE_FAST_SKIP_CUDA_BUILD")
        and nvcc is not None
        and torch.version.cuda is not None
        and len(cuda_sources) > 0
    )
    if want_cuda:
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # a short arch list keeps the build fast: A100 and H100
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            name="urkle_fast._C",
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DURKLE_FAST_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-DURKLE_FAST_WITH_CUDA"],
            },
            extra_link_args=link_flags,
        )
        print("urkle_fast: building urkle_fast._C with CPU and CUDA kernels")
    else:
        ext = cpp_extension.CppExtension(
            name="urkle_fast._C",
            sources=cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        why = (
            "URKLE_FAST_SKIP_CUDA_BUILD is set" if _truthy("URKLE_FAST_SKIP_CUDA_BUILD")
            else "nvcc not found" if nvcc is None
            else "torch is not a CUDA build" if torch.version.cuda is None
            else "no CUDA sources"
        )
        print(f"urkle_fast: building urkle_fast._C with CPU kernels only ({why})")
    # BuildExtension honours MAX_JOBS for ninja
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["urkle_fast", "urkle_fast.*"]) + ["urkle_fast._kernels"],
    package_dir={"urkle_fast._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
