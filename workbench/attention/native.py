"""The compiled tile step of the flash path: its C source (``flash_step.c`` beside this module, shipped as
package data), how it is built (once per machine, source and CPU, into the workbench cache) and when a built
library is trusted enough to load (:func:`workbench.base.files.untrusted_part`).

Plain C (no Python or torch headers: compiles in well under a second), loaded with ctypes, which releases the
GIL during the call. Without a compiler (or on any failure) the flash path uses its torch step instead, with
identical results up to rounding.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..base.files import untrusted_part
from ..models.embedded import cache_dir

#: the C source of the step (f32 and f64 entry points); its text is part of the build's cache key
STEP_SOURCE = Path(__file__).with_name("flash_step.c")
_STEP_C = STEP_SOURCE.read_text(encoding="utf-8")
log = logging.getLogger("workbench.attention.chunked")  # the name users' logging setups already know
#: reassociating the two row sums lets them vectorise; no -ffast-math (it would assume no infinities)
_CFLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
_native: dict = {}
_native_lock = threading.Lock()


def native_step(dtype: torch.dtype):
    """The compiled tile step for ``dtype`` (float32 or float64) as a ctypes function, or None when it
    cannot be built or loaded here (no C compiler, not Linux/macOS, ...). Built once per machine and
    source version (about a second), cached under the workbench cache directory."""
    if "lib" not in _native:
        with _native_lock:
            if "lib" not in _native:
                _native["lib"] = _load_native()
    lib = _native["lib"]
    if lib is None:
        return None
    return lib.wb_flash_step_f32 if dtype == torch.float32 else lib.wb_flash_step_f64 if dtype == torch.float64 else None


def _load_native():
    if sys.platform not in ("linux", "darwin"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("workbench: no C compiler found; the CPU attention path uses its torch tile step")
        return None
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "i686") else ["-mcpu=native"]
    key = hashlib.sha256("\0".join([_STEP_C, cc, *arch, *_CFLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    path = cache_dir() / "native" / f"flash_step-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # never group-writable: see untrusted_part
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                c_file, so_file = os.path.join(tmp, "flash_step.c"), os.path.join(tmp, "flash_step.so")
                with open(c_file, "w") as f:
                    f.write(_STEP_C)
                for flags in (arch, []):  # -march/-mcpu=native where the compiler knows it
                    res = subprocess.run([cc, *_CFLAGS, *flags, "-o", so_file, c_file, "-lm"], capture_output=True, text=True, timeout=120)
                    if res.returncode == 0:
                        break
                else:
                    log.warning("workbench: compiling the attention tile step failed; using the torch step\n%s", res.stderr[-2000:])
                    return None
                os.chmod(so_file, 0o755)  # the compiler followed the umask (0775 under 002): owner-only writes
                os.replace(so_file, path)  # atomic: concurrent builders each install a complete file
        problem = untrusted_part(path)
        if problem:
            log.warning("workbench: %s not loaded (%s); using the torch step", path, problem)
            return None
        lib = ctypes.CDLL(str(path))
        P, I = ctypes.c_void_p, ctypes.c_int64
        for name, real in (("wb_flash_step_f32", ctypes.c_float), ("wb_flash_step_f64", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.argtypes = [P, I, I, P, P, I, real, ctypes.c_int32, P, P, P]
            fn.restype = I
        return lib
    except Exception as e:  # no compiler that works, unwritable cache, foreign binary, ...
        log.warning("workbench: the compiled attention tile step is unavailable (%s); using the torch step", e)
        return None


def _cpu_flags() -> str:
    """What -march=native depends on: a cached build is reused only on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()
