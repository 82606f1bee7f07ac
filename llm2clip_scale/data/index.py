"""The dataset index: one json file that lists a dataset's shards, so 100k shards need no brace pattern or glob.

``data_prep/build_shards.py`` writes it last (a dataset with an index is complete); the loaders, the config check and
``data_prep/validate_shards.py`` read it. Anywhere a shard pattern is accepted, a path ending in ``.json`` names an
index instead, e.g. ``data.train_shards: /datasets/cc-10x/index.json``. Shard names are relative to the index's
folder, so a dataset directory can be moved or mounted elsewhere whole.

Format (``"format": "llm2clip-scale/dataset-index/1"``)::

    {"format": ..., "samples": N, "bytes": B,
     "shards": [{"name": "train-000000.tar", "samples": n, "bytes": b}, ...],
     "caption_fields": {"raw": n_raw, "short": n_short, ...},   # samples holding each field (non-blank)
     "skipped": {"bad_image": k, ...},                           # manifest rows left out while building, by reason
     "extra": {...}}                                             # free-form: how it was built

Stdlib only: the config check imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_FORMAT = "llm2clip-scale/dataset-index/1"
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # relative to the index's folder (or absolute)
    samples: int
    bytes: int


@dataclass
class DatasetIndex:
    shards: list[ShardEntry]
    caption_fields: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def urls(self, root: str | os.PathLike) -> list[str]:
        """Shard paths, joined to ``root`` (the index's folder) unless absolute."""
        return [str(Path(root) / shard.name) for shard in self.shards]

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "samples": self.samples, "bytes": self.bytes,
                "shards": [asdict(shard) for shard in self.shards], "caption_fields": dict(self.caption_fields),
                "skipped": dict(self.skipped), "extra": dict(self.extra)}


class DatasetIndexError(ValueError):
    """An index file that cannot be used; the message names the file and what is wrong with it."""


def is_index(pattern: str) -> bool:
    """True when a shard pattern names a dataset index rather than shards."""
    return pattern.endswith(".json")


def write_index(path: str | os.PathLike, index: DatasetIndex) -> None:
    """Write atomically (temporary name, then rename): a reader sees the old index, the new one, or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_index(path: str | os.PathLike) -> DatasetIndex:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetIndexError(f"{path}: no dataset index here; build one with data_prep/build_shards.py") from None
    except (OSError, ValueError) as err:
        raise DatasetIndexError(f"{path}: unreadable dataset index ({err}); rebuild it with data_prep/build_shards.py "
                          "--index-only") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DatasetIndexError(f"{path}: not a dataset index (format {found!r}, expected {INDEX_FORMAT!r})")
    try:
        shards = [ShardEntry(str(s["name"]), int(s["samples"]), int(s["bytes"])) for s in raw["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetIndexError(f"{path}: malformed shard entry ({err!r}); shards need name, samples, bytes") from None
    if not shards:
        raise DatasetIndexError(f"{path}: the index lists no shards")
    return DatasetIndex(shards, dict(raw.get("caption_fields", {})), dict(raw.get("skipped", {})),
                        dict(raw.get("extra", {})))


def index_urls(path: str | os.PathLike) -> list[str]:
    """The shard paths an index lists, resolved against its folder."""
    return read_index(path).urls(Path(path).parent)
