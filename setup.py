"""Build urkle_fast and its extension urkle_fast._C.

The C++ CPU kernels (csrc/cpu) are always built. The CUDA kernels (csrc/cuda) are built too when torch
is a CUDA build and a complete CUDA toolkit is found (see _find_cuda_home), unless
URKLE_FAST_SKIP_CUDA_BUILD=1; otherwise the CPU part is built alone, with a one-line note saying why.
kernels/ (Triton) is installed as the subpackage urkle_fast._kernels.

Install with:  pip install --no-build-isolation -e .
No variable is needed. Optional: CUDA_HOME (or CUDA_PATH) names the toolkit; TORCH_CUDA_ARCH_LIST
(default "8.0;9.0": A100, H100); MAX_JOBS (default: the CPUs this process may use).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(line: str) -> None:
    """Show one line to the person running the install.

    pip runs the build backend with stdout and stderr captured and, unless -v is given, shows only a
    spinner (the output appears only if the build fails). When stderr is not a terminal but the process
    has a controlling terminal (pip run by a person), the line goes to /dev/tty, which pip does not
    capture; elsewhere (CI, `pip -v`, `python setup.py ...` in a terminal) it goes to stderr.
    """
    if not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write("\n" + line + "\n")
            return
        except OSError:  # no controlling terminal (CI, cron, Windows)
            pass
    print(line, file=sys.stderr, flush=True)


def _ask_nvcc_for_its_root(nvcc: str):
    """The toolkit folder of the nvcc that `nvcc` on PATH really runs, or None.

    `nvcc` on PATH may be a wrapper (here /usr/local/bin/nvcc is a shell script that execs
    /usr/local/cuda-13.0/bin/nvcc), and realpath() does not see through a script's exec: the old
    dirname(dirname(realpath(nvcc))) gave /usr/local, which has no CUDA libraries. So ask nvcc itself:
    `nvcc -v --dryrun` prints the variables of its nvcc.profile without compiling anything, among them
    `_HERE_` (the folder of the real nvcc binary, which nvcc finds from its own executable) and
    `TOP` (the toolkit root, `$(_HERE_)/..` in NVIDIA's profile), whatever wrappers or links lie in
    between. If nvcc does not answer, fall back to realpath() when that is the binary itself (an ELF
    file); for a script it cannot answer, give up (the caller tries /usr/local/cuda).
    """
    try:
        with tempfile.TemporaryDirectory() as tmp:  # --dryrun writes nothing; the .cu need not exist
            out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "probe.cu", "-o", "probe.o"], cwd=tmp,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, timeout=60).stdout
        found = dict(re.findall(r"^#\$ (TOP|_HERE_)=(.*?)\s*$", out, flags=re.M))
        if found.get("TOP"):
            return os.path.realpath(found["TOP"])
        if found.get("_HERE_"):
            return os.path.realpath(os.path.join(found["_HERE_"], ".."))
    except (OSError, subprocess.SubprocessError):
        pass
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return os.path.dirname(os.path.dirname(real))
    except OSError:
        pass
    return None


def _find_cuda_home():
    """(toolkit folder, where it came from): the way a user has CUDA set up.

    1. CUDA_HOME, else CUDA_PATH (the variables torch reads, in its order);
    2. else the real location of `nvcc` on PATH (see _ask_nvcc_for_its_root);
    3. else /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = _ask_nvcc_for_its_root(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc})"
        return DEFAULT_CUDA_HOME, f"the default; {nvcc} did not say where its toolkit is"
    return DEFAULT_CUDA_HOME, "the default; no nvcc on PATH"


def _cuda_lib_dir(cuda_home: str) -> str:
    # the same rule torch's cpp_extension uses for its -L flag
    if os.name == "nt":
        return os.path.join("lib", "x64")
    if not os.path.exists(os.path.join(cuda_home, "lib64")) and os.path.exists(os.path.join(cuda_home, "lib")):
        return "lib"
    return "lib64"


def _missing_cuda_parts(cuda_home: str) -> list:
    """What the CUDA part of this build needs from the toolkit and does not find there.

    nvcc; the runtime headers that csrc/cuda and torch's c10/cuda headers include (c10/cuda/CUDAStream.h,
    CUDAGuard.h, CUDAException.h pull in cuda_runtime_api.h, cuda_runtime.h and cuda.h; c10's Half and
    BFloat16 pull in cuda_fp16.h and cuda_bf16.h; ATen/cuda/CUDAContext.h, which would also need
    cusparse.h and cublas, is deliberately not used); and libcudart, which torch links with -lcudart
    from the lib folder it picks.
    """
    if os.name == "nt":
        need = [os.path.join("bin", "nvcc.exe"), os.path.join("lib", "x64", "cudart.lib")]
    else:
        need = [os.path.join("bin", "nvcc"), os.path.join(_cuda_lib_dir(cuda_home), "libcudart.so")]
    need += [os.path.join("include", h) for h in
             ("cuda_runtime.h", "cuda_runtime_api.h", "cuda.h", "cuda_fp16.h", "cuda_bf16.h")]
    return [p for p in need if not os.path.exists(os.path.join(cuda_home, p))]


def _toolkit_cuda_version(cuda_home: str):
    """'13.0' from the toolkit's CUDART_VERSION (13000), or None."""
    try:
        with open(os.path.join(cuda_home, "include", "cuda_runtime_api.h"), encoding="utf-8", errors="replace") as f:
            m = re.search(r"^#define\s+CUDART_VERSION\s+(\d+)", f.read(), flags=re.M)
    except OSError:
        return None
    return f"{int(m.group(1)) // 1000}.{int(m.group(1)) % 1000 // 10}" if m else None


def _sm_names(arch_list: str) -> str:
    archs = [a for a in re.split(r"[;\s,]+", arch_list) if a]
    return "/".join("sm_" + re.sub(r"[^0-9a-z]", "", a.split("+")[0]) for a in archs)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _extensions():
    try:
        import torch
    except ImportError:  # metadata-only build; the package falls back to the references
        print("urkle_fast: torch not importable at build time; skipping urkle_fast._C")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpu_sources:
        print("urkle_fast: no C++ sources in csrc/; skipping urkle_fast._C")
        return [], {}

    # Decide on the CUDA part before torch.utils.cpp_extension is imported: that module computes its
    # CUDA_HOME once, at import, from $CUDA_HOME / $CUDA_PATH, else dirname(dirname(which("nvcc")))
    # (= /usr/local for the nvcc wrapper script, which has no libcudart), else /usr/local/cuda.
    cuda_home, cuda_from = _find_cuda_home()
    why_not = None
    if _truthy("URKLE_FAST_SKIP_CUDA_BUILD"):
        why_not = "URKLE_FAST_SKIP_CUDA_BUILD is set"
    elif not cuda_sources:
        why_not = "no CUDA sources in csrc/cuda"
    elif torch.version.cuda is None:
        why_not = (f"torch {torch.__version__} is a CPU build (install a CUDA build of torch to build the CUDA "
                   f"kernels)")
    else:
        missing = _missing_cuda_parts(cuda_home)
        toolkit_version = _toolkit_cuda_version(cuda_home)
        hint = ("set CUDA_HOME=/path/to/cuda-{}.x (the folder holding bin/nvcc, include/ and lib64/) to build them"
                .format(torch.version.cuda.split(".")[0]))
        if missing and not os.path.isdir(cuda_home):
            why_not = f"no CUDA toolkit at {cuda_home} (from {cuda_from}); {hint}"
        elif missing:
            why_not = (f"the CUDA toolkit at {cuda_home} (from {cuda_from}) lacks {', '.join(missing)}; "
                       f"{hint}")
        elif toolkit_version and toolkit_version.split(".")[0] != torch.version.cuda.split(".")[0]:
            why_not = (f"the CUDA toolkit at {cuda_home} (from {cuda_from}) is CUDA {toolkit_version}, torch "
                       f"{torch.__version__} is built for CUDA {torch.version.cuda}; {hint}")
    want_cuda = why_not is None
    if want_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension's import below, and by ninja's nvcc calls
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)  # short list, fast build: A100, H100
    # torch's BuildExtension hands MAX_JOBS to ninja; without it ninja runs CPUs + 2 jobs
    os.environ.setdefault("MAX_JOBS", str(_cpu_count()))
    # `.venv/bin/pip install` does not put .venv/bin on PATH, where requirements.txt's ninja lies; torch
    # looks ninja up on PATH and, not finding it, falls back to a serial distutils build
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin) is not None:
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")

    from torch.utils import cpp_extension

    if want_cuda and cpp_extension.CUDA_HOME != cuda_home:
        # cpp_extension was imported earlier (by torch itself or a plugin) with another guess: correct it;
        # its helpers read the module global at call time
        cpp_extension.CUDA_HOME = cuda_home

    # no -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14)
    cxx_flags = ["-O3", "-fopenmp", "-DURKLE_FAST_OMP"]
    link_flags = ["-fopenmp"]
    jobs = os.environ["MAX_JOBS"]
    if want_cuda:
        ext = cpp_extension.CUDAExtension(
            name="urkle_fast._C",
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DURKLE_FAST_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-DURKLE_FAST_WITH_CUDA"],
            },
            extra_link_args=link_flags,
        )
        note = (f"urkle_fast: compiling urkle_fast._C (C++ CPU kernels + CUDA kernels for "
                f"{_sm_names(os.environ['TORCH_CUDA_ARCH_LIST'])}, CUDA {_toolkit_cuda_version(cuda_home) or '?'} at "
                f"{cuda_home}) with {jobs} parallel jobs: about 1.5 minutes on 2 cores ...")
    else:
        ext = cpp_extension.CppExtension(
            name="urkle_fast._C",
            sources=cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        note = (f"urkle_fast: compiling urkle_fast._C (C++ CPU kernels only) with {jobs} parallel jobs: about 1 "
                f"minute on 2 cores ... No CUDA kernels: {why_not}")

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            # said when the compile starts, not each time pip runs setup.py for metadata
            _say(note)
            super().run()

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["urkle_fast", "urkle_fast.*"]) + ["urkle_fast._kernels"],
    package_dir={"urkle_fast._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
