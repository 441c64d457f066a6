"""Where reward weights are looked for, offline only, and the error raised when they are absent.

Lookup order for every file a reward needs (first hit wins):

1. an explicit option of the reward (``path=...`` and friends), a file or a directory;
2. ``$TREEBENCH_WEIGHTS/<reward>/...`` with the sub-layout documented on each reward class;
3. the Hugging Face cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``), read with local-only lookups
   (``try_to_load_from_cache`` / ``snapshot_download(local_files_only=True)``): never the network;
4. the package's own cache directory where the upstream package defines one (e.g. ``~/.cache/hpsv2``).

Nothing here downloads. When a file is not found, :class:`MissingWeightsError` names the files
expected, every place looked at, and how to obtain them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.errors import MissingWeightsError

#: Environment variable naming the root of the local weights tree.
WEIGHTS_ENV = "TREEBENCH_WEIGHTS"


def weights_root() -> Path | None:
    root = os.environ.get(WEIGHTS_ENV)
    return Path(root).expanduser() if root else None


def hf_cache_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repository if it is already in the local HF cache; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed cache is treated as absent
        return None
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def hf_cache_snapshot(repo_id: str, must_contain: Sequence[str] = ("config.json",)) -> Path | None:
    """The local snapshot directory of a hub repository if cached (local-only lookup)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        return None
    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        return None
    return snap if all(any((snap / f).exists() for f in alt.split("|")) for alt in must_contain) else None


class Finder:
    """Collects the places a lookup tried, so a failure can list them."""

    def __init__(self, reward: str) -> None:
        self.reward = reward
        self.tried: list[str] = []

    def file(self, explicit: str | os.PathLike | None, layout: Iterable[str],
             hub: Iterable[tuple[str, str]] = (), extra_dirs: Iterable[Path] = ()) -> Path | None:
        """First existing file among: ``explicit`` (a file, or a directory holding one of the
        ``layout`` basenames), ``$TREEBENCH_WEIGHTS/<reward>/<layout>``, ``extra_dirs/<basename>``,
        then ``hub`` (repo_id, filename) pairs in the local HF cache."""
        layout = list(layout)
        if explicit:
            p = Path(explicit).expanduser()
            cands = [p] if not p.is_dir() else [p / Path(rel).name for rel in layout] + [p / rel for rel in layout]
            for c in cands:
                self.tried.append(str(c))
                if c.is_file():
                    return c
            return None  # an explicit path that does not hold the file is an error, not a fallback
        root = weights_root()
        if root is not None:
            for rel in layout:
                c = root / self.reward / rel
                self.tried.append(str(c))
                if c.is_file():
                    return c
        else:
            self.tried += [f"${WEIGHTS_ENV}/{self.reward}/{rel} (${WEIGHTS_ENV} is not set)" for rel in layout]
        for d in extra_dirs:
            for rel in layout:
                c = Path(d).expanduser() / Path(rel).name
                self.tried.append(str(c))
                if c.is_file():
                    return c
        for repo_id, filename in hub:
            self.tried.append(f"HF cache: {repo_id}/{filename}")
            hit = hf_cache_file(repo_id, filename)
            if hit is not None:
                return hit
        return None

    def directory(self, explicit: str | os.PathLike | None, layout: Iterable[str],
                  hub_repos: Iterable[str] = (), must_contain: Sequence[str] = ("config.json",)) -> Path | None:
        """First directory containing all of ``must_contain``, same order as :meth:`file`."""
        def ok(d: Path) -> bool:  # an entry "a|b" is satisfied by either file
            return d.is_dir() and all(any((d / f).exists() for f in alt.split("|")) for alt in must_contain)

        if explicit:
            d = Path(explicit).expanduser()
            self.tried.append(str(d))
            return d if ok(d) else None
        root = weights_root()
        if root is not None:
            for rel in layout:
                d = root / self.reward / rel
                self.tried.append(str(d))
                if ok(d):
                    return d
        else:
            self.tried += [f"${WEIGHTS_ENV}/{self.reward}/{rel}/ (${WEIGHTS_ENV} is not set)" for rel in layout]
        for repo_id in hub_repos:
            self.tried.append(f"HF cache: {repo_id}")
            snap = hf_cache_snapshot(repo_id, must_contain)
            if snap is not None:
                return snap
        return None

    def missing(self, expected: str, how: str) -> MissingWeightsError:
        looked = "\n".join(f"  - {t}" for t in self.tried)
        return MissingWeightsError(
            f"reward {self.reward!r}: weights not found.\nExpected: {expected}\nLooked in:\n{looked}\n"
            f"How to obtain: {how}\n(Rewards never download: put the files under "
            f"${WEIGHTS_ENV}/{self.reward}/ or in the HF cache, or pass the path option.)")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, n: int = 16) -> str:
    """First ``n`` hex digits of a file's SHA-256 (memoised per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key][:n]


def dir_sha256(path: str | os.PathLike, patterns: Sequence[str] = ("*.safetensors", "*.bin", "*.json", "*.txt"),
               n: int = 16) -> str:
    """Hash of a model directory: the SHA-256 of its weight and config files' hashes, by name."""
    p = Path(path)
    files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f, 64).encode())
    return h.hexdigest()[:n]
