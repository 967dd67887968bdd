"""Builds fastmed's CUDA kernels for the CPU (fmemu, see include/fmemu.h) as the module
``_C_cuda_emu``: the same sources and bindings as ``fastmed._C_cuda``, compiled by the host C++
compiler, with kernel launches rewritten into calls of ``fmemu::launch``.

``load()`` builds once per content (a hash of every source, header and flag) under
``build/cuda_emu/`` and imports the result. It needs a C++17 compiler (``CXX`` or ``c++``) and
pybind11's headers (the test extra installs pybind11), as the package build does; nothing of CUDA.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
SOURCES = [
    CSRC / "dice_ce" / "dice_ce_cuda.cu",
    CSRC / "sliding_window" / "sliding_window_cuda.cu",
    CSRC / "resample" / "resample_cuda.cu",
    CSRC / "bindings_cuda.cpp",
]
MODULE = "_C_cuda_emu"
SELFTEST = "_fmemu_selftest"  # fmemu's own checks: selftest.cu
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", "-fvisibility=hidden",
         "-Wno-attributes", "-Wno-unknown-pragmas", '-DFASTMED_CUDA_VERSION="fmemu"', '-DFASTMED_CUDA_ARCHS="fmemu (CPU emulation)"']


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _callee_start(text: str, i: int) -> int:
    """Start of the kernel expression that ends just before ``text[i]`` (a name, maybe qualified,
    maybe with template arguments)."""
    j = i
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if text[j - 1] == ">":
        depth = 0
        while j > 0:
            j -= 1
            if text[j] == ">":
                depth += 1
            elif text[j] == "<":
                depth -= 1
                if depth == 0:
                    break
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):  # (j > 0: never text[-1])
        j -= 1
    return j


def _matching_paren(text: str, i: int) -> int:
    depth = 0
    for k in range(i, len(text)):
        if text[k] == "(":
            depth += 1
        elif text[k] == ")":
            depth -= 1
            if depth == 0:
                return k
    raise BuildError(f"unbalanced parentheses after offset {i}")


def translate(text: str) -> str:
    """CUDA-only syntax into C++ (line numbers kept): launches and dynamic shared memory."""
    out = text
    while True:
        i = out.find("<<<")
        if i < 0:
            break
        start = _callee_start(out, i)
        callee = out[start:i].strip()
        k = out.find(">>>", i)
        cfg = out[i + 3:k]
        m = k + 3
        while out[m].isspace():
            m += 1
        if out[m] != "(" or not callee:
            raise BuildError(f"cannot parse the launch near: {out[start:m + 20]!r}")
        e = _matching_paren(out, m)
        args = out[m + 1:e]
        out = out[:start] + f"::fmemu::launch([&]() {{ {callee}({args}); }}, {cfg})" + out[e + 1:]
    # __shared__ variables: a static (its address is the key) and a reference to the block's copy,
    # which starts as garbage in each block (fmemu::block_shared; same line)
    out = re.sub(r"(?m)^(\s*)__shared__\s+([^;()]*?)\b(\w+)\s*((?:\[[^\]]*\]\s*)*);",
                 lambda mt: (f"{mt[1]}__shared__ {mt[2]}fmemu_key_{mt[3]}{mt[4]}; "
                             f"auto& {mt[3]} = *::fmemu::block_shared(&fmemu_key_{mt[3]});"),
                 out)
    out = re.sub(
        r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[A-Za-z_][\w ]*?)\s+(?P<name>\w+)\s*\[\s*\]\s*;",
        lambda mt: f"{mt['type']}* {mt['name']} = reinterpret_cast<{mt['type']}*>(::fmemu::dynamic_shared());",
        out,
    )
    # test hooks (see fmemu.h): the layout constants become settable, on the same line; a hook that
    # no longer finds its constant is an error (its tests would lose their point)
    if "kTargetBlocks" in out:
        for decl, env in ((r"constexpr int64_t kTargetBlocks = ([^;]+);", "FMEMU_DICE_TARGET_BLOCKS"),
                          (r"constexpr int64_t kMaxGrid = ([^;]+);", "FMEMU_DICE_MAX_GRID")):
            name = decl.split()[2]
            out, n = re.subn(decl, lambda mt: f"#define {name} (::fmemu::env_int(\"{env}\", {mt[1]}))", out)
            if n != 1:
                raise BuildError(f"test hook: {name} declared {n} times")
    elif "grid_for(" in out:
        if "65535 * 16" not in out:
            raise BuildError("test hook: no grid cap (65535 * 16) found")
        out = out.replace("65535 * 16", "(::fmemu::env_int(\"FMEMU_GRID_CAP\", 65535 * 16))")
    return out.replace(f"PYBIND11_MODULE(_C_cuda,", f"PYBIND11_MODULE({MODULE},")


def _includes() -> list[str]:
    import pybind11

    return ["-I", str(HERE / "include"), "-I", str(CSRC), "-I", pybind11.get_include(),
            "-I", sysconfig.get_paths()["include"]]


def _flags(sanitize: bool, fma: bool = False, tsan: bool = False) -> list[str]:
    f = FLAGS + (["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else [])
    if tsan:
        f = f + ["-fsanitize=thread", "-fno-omit-frame-pointer", "-DFMEMU_TSAN=1"]
    if not fma:
        return f
    # (GCC contracts only from -O2 on)
    return [x for x in f if x not in ("-ffp-contract=off", "-O1")] + ["-O2", "-ffp-contract=fast", "-mfma"]


def fma_supported() -> bool:
    """The FMEMU_FMA build runs here: an x86-64 CPU with FMA."""
    try:
        return " fma " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _key(cxx: str, flags: list[str], module: str) -> str:
    h = hashlib.sha256(module.encode())
    files = (sorted(p for p in CSRC.rglob("*") if p.is_file()) + sorted((HERE / "include").glob("*.h"))
             + [HERE / "selftest.cu", Path(__file__)])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    import pybind11

    h.update((ver + cxx + shutil.which(cxx) + " ".join(flags) + sys.version + " ".join(_includes())
              + pybind11.__version__).encode())
    return h.hexdigest()[:16]


def build(out_root: Path | None = None, sanitize: bool = False, module: str = MODULE, fma: bool = False,
          tsan: bool = False) -> Path:
    """Path of the built module (built now unless an identical build is there). ``sanitize``: with
    AddressSanitizer (import it only in a process started with libasan preloaded). ``module``:
    MODULE (fastmed's CUDA kernels) or SELFTEST (fmemu's own checks). ``fma``: multiply-adds fused
    as nvcc fuses them (except the __fmul_rn family), on an x86-64 CPU with FMA. ``tsan``: with
    ThreadSanitizer, each emulated GPU thread a fiber of its own (import it only in a process started
    with libtsan preloaded, from the python executable itself, not a shell wrapper)."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler (set CXX)")
    out_root = out_root or ROOT / "build" / "cuda_emu"
    if sanitize and tsan:
        raise BuildError("AddressSanitizer and ThreadSanitizer do not go together")
    flags = _flags(sanitize, fma, tsan)
    d = out_root / _key(cxx, flags, module)
    so = d / (module + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.exists():
        return so
    tmp = out_root / f"tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _build_in(cxx, tmp, d, so, flags, SOURCES if module == MODULE else [HERE / "selftest.cu"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_in(cxx: str, tmp: Path, d: Path, so: Path, flags: list[str], sources: list[Path]) -> Path:
    objs, cmds = [], []
    for src in sources:
        t = tmp / (src.stem + ".cpp")
        t.write_text(f'#line 1 "{src}"\n' + translate(src.read_text()))
        o = tmp / (src.stem + ".o")
        objs.append(o)
        arch = ["-D__CUDA_ARCH__=900"] if src.suffix == ".cu" else []  # the device-only branches
        cmds.append([cxx, *flags, *arch, "-I", str(src.parent), *_includes(), "-c", str(t), "-o", str(o)])

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as ex:
        results = list(ex.map(run, cmds))
    for cmd, r in zip(cmds, results):
        if r.returncode != 0:
            raise BuildError(f"{' '.join(cmd)}\n{r.stderr[-6000:]}")
    r = run([cxx, "-shared", *[f for f in flags if f.startswith("-fsanitize")], *map(str, objs), "-o",
             str(tmp / so.name)])
    if r.returncode != 0:
        raise BuildError(r.stderr[-4000:])
    d.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / so.name, so)  # atomic: a concurrent build ends with the same file
    return so


def load(sanitize: bool = False, module: str = MODULE, fma: bool = False, tsan: bool = False):
    """The emulated module, built if needed (fastmed._C is imported first: the parameter classes
    are shared with it, as on a real GPU build)."""
    import fastmed._ext  # noqa: F401  (registers the parameter types)

    so = build(sanitize=sanitize, module=module, fma=fma, tsan=tsan)
    if module in sys.modules:
        if Path(sys.modules[module].__file__) != so:
            raise BuildError(f"another build of {module} is loaded already ({sys.modules[module].__file__})")
        return sys.modules[module]
    spec = importlib.util.spec_from_file_location(module, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[module] = mod
    return mod


if __name__ == "__main__":
    print(build(sanitize="--asan" in sys.argv, tsan="--tsan" in sys.argv,
                module=SELFTEST if "--selftest" in sys.argv else MODULE))
