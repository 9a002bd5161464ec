"""CUDA source plus name expressions -> a host shared library built by g++ against ``cuda_host.h``.

The kernel source is compiled unmodified except for its ``__shared__`` declarations, which C++ has
no word for: each becomes a reference into the launch's shared memory (see ``cuda_host.h``), on the
same line, so compiler messages and fault reports keep the source's line numbers.
"""

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SHIM = HERE / "cuda_host.h"
CXX = os.environ.get("CUDAEMU_CXX", "g++")
# -O1 keeps the build short. The sanitizer traps turn undefined behaviour that a GPU would also
# punish (misaligned vector accesses, overflowing fixed arrays, signed overflow) into SIGILL, which
# the launch reports with its source line.
CXXFLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wno-unknown-pragmas",
            "-fsanitize=undefined", "-fsanitize-undefined-trap-on-error", "-fno-sanitize=vptr"]
CACHE = pathlib.Path(os.environ.get("CUDAEMU_CACHE", pathlib.Path(tempfile.gettempdir()) / "accelbn-cudaemu"))

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([^;\[]*?)\s*\b(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:<>,\s*]*?)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*);")


class BuildUnavailable(RuntimeError):
    """No host compiler, or no CUDA headers that it can use."""


def cuda_include():
    """A CUDA include directory whose ``cuda_fp16.h``/``cuda_bf16.h`` compile on the host: the one
    NVIDIA's CUDA 13 wheels share (``nvidia-cuda-runtime``, ``nvidia-cuda-crt`` and
    ``nvidia-cuda-cccl``, in the test extra), ``$CUDA_HOME/include``, or ``/usr/local/cuda/include``."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None:
        candidates += [pathlib.Path(p) / "cu13" / "include" for p in spec.submodule_search_locations]
    if os.environ.get("CUDA_HOME"):
        candidates.append(pathlib.Path(os.environ["CUDA_HOME"]) / "include")
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    for c in candidates:
        if all((c / header).exists() for header in ("cuda_fp16.h", "crt/host_defines.h", "nv/target")):
            return c
    raise BuildUnavailable(
        "no CUDA headers with cuda_fp16.h, crt/host_defines.h and nv/target: install the test extra "
        "(nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-cccl) or a CUDA toolkit"
    )


def compiler():
    if shutil.which(CXX) is None:
        raise BuildUnavailable(f"no host C++ compiler {CXX!r} on PATH (set CUDAEMU_CXX)")
    return CXX


def _rewrite_shared(code):
    code = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::cudaemu::dynamic_shared());",
        code,
    )
    return _STATIC_SHARED.sub(
        lambda m: (
            f"static thread_local const char cudaemu_key_{m.group(2)} = 0; "
            f"auto& {m.group(2)} = ::cudaemu::static_shared<{m.group(1)}{m.group(3).replace(' ', '')}>"
            f"(&cudaemu_key_{m.group(2)}, __FILE__, __LINE__);"
        ),
        code,
    )


def translation_unit(code, name_expressions, filename):
    """The C++ source: the shim, the kernels, and a table with an entry per name expression."""
    entries = ",\n".join(f'    ::cudaemu::make_entry("{e}", &{e})' for e in name_expressions)
    return f"""#include "{SHIM}"
#line 1 "{filename}"
{_rewrite_shared(code)}
#line 1 "cudaemu-entries"
static const ::cudaemu::Entry cudaemu_entries[] = {{
{entries}
}};
extern "C" {{
int cudaemu_count() {{ return {len(name_expressions)}; }}
const char* cudaemu_name(int i) {{ return cudaemu_entries[i].name; }}
int cudaemu_nparams(int i) {{ return cudaemu_entries[i].nparams; }}
void cudaemu_param(int i, int j, int* out) {{
    const ::cudaemu::Param& p = cudaemu_entries[i].params[j];
    out[0] = p.is_pointer; out[1] = p.kind; out[2] = p.size; out[3] = p.is_const;
}}
int cudaemu_launch(int i, const unsigned* grid, const unsigned* block, unsigned long long shared, void** args,
                   int schedule, unsigned seed, char* err, unsigned long long errlen) {{
    const ::cudaemu::Entry& e = cudaemu_entries[i];
    std::string msg = ::cudaemu::launch(e.invoke, e.fn, args, dim3(grid[0], grid[1], grid[2]),
                                        dim3(block[0], block[1], block[2]), shared, schedule, seed);
    if (msg.empty()) return 0;
    std::snprintf(err, errlen, "%s", msg.c_str());
    return 1;
}}
}}
"""


def _defines(options):
    """The preprocessor and language options of an NVRTC option list that mean the same to g++."""
    return [o for o in options if o.startswith(("-D", "-U", "-I", "-std="))]


def build(code, name_expressions, options=(), filename="kernel.cu"):
    """The path of a shared library for ``code``, with one entry per name expression; built once
    and kept in ``CACHE`` under a hash of everything that goes into it."""
    source = translation_unit(code, list(name_expressions), filename)
    flags = [*CXXFLAGS, *_defines(options), f"-I{cuda_include()}"]
    cxx = compiler()
    key = hashlib.sha256("\0".join([source, SHIM.read_text(), cxx, *flags]).encode()).hexdigest()[:24]
    library = CACHE / f"{key}.so"
    if library.exists():
        return library
    CACHE.mkdir(parents=True, exist_ok=True)
    cpp = CACHE / f"{key}.cpp"
    cpp.write_text(source)
    partial = CACHE / f"{key}.{os.getpid()}.so"
    result = subprocess.run([cxx, *flags, str(cpp), "-o", str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"host build of {filename} failed:\n{result.stderr[-8000:]}")
    os.replace(partial, library)
    return library
