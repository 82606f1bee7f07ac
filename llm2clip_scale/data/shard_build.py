"""Building webdataset shards from manifest rows (:mod:`llm2clip_scale.data.manifests`), restartably, to the byte.

A shard ``{prefix}-NNNNNN.tar`` holds, per good row in manifest order, ``<key>.jpg`` (decoded, EXIF orientation
applied, transparency flattened onto white, RGB, shorter side resized down to ``max_size``, JPEG) and ``<key>.json``
({caption field: stripped text} for the non-blank captions, ``width``/``height`` of the original upright image, the
meta columns). Bad rows are skipped and counted under the first reason that applies (:data:`SKIP_REASONS`). Next to
it, ``{prefix}-NNNNNN.stats.json`` records its rows, samples, bytes, skips, caption field counts and the settings.

Complete on disk: a shard is written as ``.{name}.tmp-{host}.{pid}`` (hidden; host and pid keep writers on shared
file systems apart, and tell a restart which temporary files belong to which shard, :func:`temp_owner`), fsynced,
then its stats file is written the same way, and only then is the tar renamed into place. So a ``.tar`` that exists
is complete and has its stats; anything else is a leftover to delete and redo.

Deterministic: shard bytes depend only on the rows and the settings (tar members with fixed mtime, owner and mode;
json with sorted keys; the same Pillow, whose version the stats record), so a build killed and restarted, split into
any parts or run with any number of workers, equals an uninterrupted one byte for byte. :func:`assemble_index` turns
the stats of a complete set into the dataset index (:mod:`llm2clip_scale.data.index`), identical whoever writes it.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tarfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm2clip_scale.data.index import DatasetIndex, ShardEntry
from llm2clip_scale.data.manifests import Manifest, ShardJob, manifest_rows, shard_jobs

STATS_FORMAT = "llm2clip-scale/shard-stats/1"
SKIP_REASONS = ("bad_row", "bad_key", "missing_caption", "missing_image", "bad_image")
RESERVED_FIELDS = ("width", "height")
# Test hook: seconds to sleep per row, so a test can SIGKILL a build in the middle of a shard.
_TEST_ROW_DELAY = float(os.environ.get("LLM2CLIP_BUILD_SHARDS_TEST_ROW_DELAY", "0") or 0)
_TAR_MODE = 0o644


class SettingsMismatch(Exception):
    """Shards in the output folder built with other settings: exit status 2."""


def read_columns(image_column: str, captions: dict[str, str], meta_columns: Sequence[str],
                 key_column: str | None) -> list[str]:
    """The manifest columns a build reads (each once, in a fixed order)."""
    return list(dict.fromkeys([image_column, *captions.values(), *meta_columns, *([key_column] if key_column else [])]))


@dataclass(frozen=True)
class BuildConfig:
    out: str
    manifests: tuple[Manifest, ...]
    image_column: str
    captions: dict[str, str]  # json field -> manifest column
    key_column: str | None
    meta_columns: tuple[str, ...]
    samples_per_shard: int
    max_size: int
    quality: int
    prefix: str
    image_root: str | None
    key_width: int
    settings: dict  # what the shard bytes depend on; recorded in every stats file and compared on restart

    @classmethod
    def create(cls, out: str, manifests: Sequence[Manifest], *, image_column: str, captions: dict[str, str],
               key_column: str | None, meta_columns: Sequence[str], samples_per_shard: int, max_size: int,
               quality: int, prefix: str, image_root: str | None) -> BuildConfig:
        """The config of a build over planned ``manifests``, with its settings record and key width."""
        total = sum(m.rows for m in manifests)
        # image_root is not a setting: the same images under another mount give the same bytes
        settings = {
            "manifests": [{"name": Path(m.path).name, "rows": m.rows} for m in manifests],
            "image_column": image_column,
            "captions": captions,
            "key_column": key_column,
            "meta_columns": list(meta_columns),
            "samples_per_shard": samples_per_shard,
            "max_size": max_size,
            "quality": quality,
            "prefix": prefix,
        }
        return cls(out=str(out), manifests=tuple(manifests), image_column=image_column, captions=captions,
                   key_column=key_column, meta_columns=tuple(meta_columns), samples_per_shard=samples_per_shard,
                   max_size=max_size, quality=quality, prefix=prefix, image_root=image_root,
                   key_width=max(9, len(str(max(total - 1, 0)))), settings=settings)

    @property
    def columns(self) -> list[str]:
        return read_columns(self.image_column, self.captions, self.meta_columns, self.key_column)


# ------------------------------------------------------------------------------------------------------- images


def target_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Shorter side down to ``max_size`` (never up), the longer one scaled and rounded half up; 0 = keep."""
    short, long = min(width, height), max(width, height)
    if max_size <= 0 or short <= max_size:
        return width, height
    scaled = max(1, (2 * long * max_size + short) // (2 * short))
    return (max_size, scaled) if width <= height else (scaled, max_size)


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent areas become white, not black
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_image(data: bytes, max_size: int, quality: int) -> tuple[bytes, int, int]:
    """(JPEG bytes, original width, original height), upright (EXIF orientation applied). Raises on bad images."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency and decompression-bomb notices, per image
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
            turned = orientation in (5, 6, 7, 8)
            width, height = image.size[::-1] if turned else image.size
            size = target_size(width, height, max_size)
            if size != (width, height) and image.format == "JPEG":
                # Decode at a reduced DCT scale, still at least twice the target (as Image.thumbnail does).
                image.draft(None, (2 * size[1], 2 * size[0]) if turned else (2 * size[0], 2 * size[1]))
            image.load()
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
    return out.getvalue(), width, height


def _image_bytes(value, base: Path) -> bytes | None:
    """The encoded image a manifest cell names: raw bytes, a path (relative to ``base``), or a {bytes, path} struct
    (Hugging Face's Image feature). None when it names nothing readable."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value.strip())
    try:
        return (path if path.is_absolute() else base / path).read_bytes() or None
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None


# ------------------------------------------------------------------------------------------------------ one shard


def _caption(value) -> str | None:
    # The rule of shards.caption_of (the loaders'), restated: importing that module (webdataset, torch) would cost
    # every spawned worker seconds and memory.
    return value.strip() if isinstance(value, str) and value.strip() else None


def _bad_key(key: str) -> bool:
    return not key or "." in key or "/" in key or "\\" in key or key != key.strip()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, _TAR_MODE, 0, 0, "", ""
    return info


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}.{os.getpid()}")


def _write_json(path: Path, payload: dict) -> None:
    tmp = _temp_path(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build_shard(job: ShardJob, cfg: BuildConfig) -> dict:
    """Write one shard (temporary name, stats, rename) and return its stats."""
    out = Path(cfg.out)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    fields = dict.fromkeys(cfg.captions, 0)
    seen: set[str] = set()
    samples = 0
    columns = cfg.columns
    tmp = _temp_path(out / job.name)
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
            row_number = job.first_row
            for segment in job.segments:
                manifest = cfg.manifests[segment.manifest]
                base = Path(cfg.image_root) if cfg.image_root else Path(manifest.path).parent
                for row in manifest_rows(manifest, segment, columns):
                    number, row_number = row_number, row_number + 1
                    if _TEST_ROW_DELAY:
                        time.sleep(_TEST_ROW_DELAY)
                    reason, record = _sample(row, number, cfg, base, seen)
                    if reason:
                        skipped[reason] += 1
                        continue
                    key, jpeg, text, meta = record
                    for name in cfg.captions:
                        fields[name] += name in meta
                    tar.addfile(_member(f"{key}.jpg", len(jpeg)), io.BytesIO(jpeg))
                    tar.addfile(_member(f"{key}.json", len(text)), io.BytesIO(text))
                    seen.add(key)
                    samples += 1
            if row_number != job.last_row:  # a line-based manifest changed under us since the scan
                raise RuntimeError(f"{job.name}: read {row_number - job.first_row} rows, expected "
                                   f"{job.last_row - job.first_row}; was a manifest modified during the build?")
        handle.flush()
        os.fsync(handle.fileno())
    stats = {
        "format": STATS_FORMAT,
        "shard": job.name,
        "rows": [job.first_row, job.last_row],
        "samples": samples,
        "bytes": tmp.stat().st_size,
        "skipped": {reason: count for reason, count in skipped.items() if count},
        "caption_fields": fields,
        "settings": cfg.settings,
        "pillow": _pillow_version(),
    }
    _write_json(out / stats_name(job.name), stats)  # before the rename: "tar exists" implies "stats exist"
    os.replace(tmp, out / job.name)
    return stats


def _sample(row: dict | None, number: int, cfg: BuildConfig, base: Path,
            seen: set[str]) -> tuple[str | None, tuple[str, bytes, bytes, dict] | None]:
    """(skip reason, None) or (None, (key, jpeg, json bytes, json object)). Checks run cheapest first; a row with
    several problems counts once, under the first: bad_row, bad_key, missing_caption, missing_image, bad_image,
    bad_key (a key already in this shard)."""
    if row is None:
        return "bad_row", None
    if cfg.key_column:
        value = row.get(cfg.key_column)
        key = "" if value is None or isinstance(value, (dict, list, bytes)) else str(value)
        if _bad_key(key):
            return "bad_key", None
    else:
        key = f"{number:0{cfg.key_width}d}"
    meta: dict = {}
    for name, column in cfg.captions.items():
        text = _caption(row.get(column))
        if text is not None:
            meta[name] = text
    if not meta:
        return "missing_caption", None
    data = _image_bytes(row.get(cfg.image_column), base)
    if data is None:
        return "missing_image", None
    try:
        jpeg, width, height = encode_image(data, cfg.max_size, cfg.quality)
    except Exception:  # noqa: BLE001 - PIL's decoders raise many kinds on corrupt bytes
        return "bad_image", None
    if key in seen:
        return "bad_key", None
    for column in cfg.meta_columns:
        value = row.get(column)
        if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
            continue  # null, NaN (not json) and the empty string (a csv's null) are left out
        meta[column] = value if isinstance(value, (str, int, float, bool)) else str(value)
    meta["width"], meta["height"] = width, height
    try:  # sorted keys: deterministic bytes; a lone surrogate from a jsonl escape cannot be written as UTF-8
        text = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return "bad_row", None
    return None, (key, jpeg, text, meta)


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


_WORKER_CONFIG: BuildConfig | None = None


def init_worker(cfg: BuildConfig) -> None:
    """Pool initializer: the config (row offsets of every manifest) reaches each worker once, not with every shard."""
    global _WORKER_CONFIG
    _WORKER_CONFIG = cfg


def build_in_worker(job: ShardJob, cfg: BuildConfig | None = None) -> tuple[str, dict | None, str | None]:
    """(shard name, its stats or None, the error or None): a failure is reported, not raised, so the pool lives."""
    cfg = cfg or _WORKER_CONFIG
    try:
        return job.name, build_shard(job, cfg), None
    except Exception as err:  # noqa: BLE001 - reported by the main process, which stops the build
        return job.name, None, f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------- directory and index


def stats_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".stats.json"


def read_stats(out: Path, tar_name: str) -> dict | None:
    """A shard's stats, or None when absent or unreadable (the shard is then unfinished)."""
    try:
        stats = json.loads((out / stats_name(tar_name)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("format") == STATS_FORMAT else None


def check_settings(stats: dict, settings: dict, where: Path) -> None:
    """SettingsMismatch, naming what differs, unless ``stats`` were built with ``settings``."""
    if stats.get("settings") != settings:
        theirs = stats.get("settings") or {}
        differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        raise SettingsMismatch(
            f"{where}: built with other settings ({', '.join(differ)} differ: {[theirs.get(k) for k in differ]} "
            f"there, {[settings.get(k) for k in differ]} now); use another --out, or delete that directory's shards")


def _canonical(settings: dict) -> dict:
    """Keys sorted at every level, as a stats file holds them: the index is the same whoever writes it."""
    return json.loads(json.dumps(settings, sort_keys=True))


def temp_owner(name: str) -> str | None:
    """The shard (or stats) file a hidden temporary file was being written as, or None for other files."""
    if not name.startswith(".") or ".tmp-" not in name:
        return None
    return name[1:name.index(".tmp-")]


def assemble_index(out: Path, jobs: Sequence[ShardJob], settings: dict | None) -> tuple[DatasetIndex | None, list]:
    """(the index of a complete set, []) or (None, names of the shards not finished yet). ``settings`` None: take
    them from the first shard's stats (``--index-only`` without manifests); every shard must match them."""
    present = {entry.name for entry in os.scandir(out)}
    missing = [job.name for job in jobs if job.name not in present]
    if missing:
        return None, missing
    shards, empty = [], []
    fields: dict[str, int] = {}
    skipped: dict[str, int] = {}
    pillow: set[str] = set()
    for job in jobs:
        stats = read_stats(out, job.name)
        if stats is None:
            missing.append(job.name)
            continue
        if settings is None:
            settings = stats.get("settings")
        check_settings(stats, settings, out / stats_name(job.name))
        if stats["samples"]:
            shards.append(ShardEntry(job.name, int(stats["samples"]), int(stats["bytes"])))
        else:
            empty.append(job.name)  # an empty tar confuses loaders: left out of the index, listed in extra
        for name, count in stats["caption_fields"].items():
            fields[name] = fields.get(name, 0) + count
        for reason, count in stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        pillow.add(str(stats.get("pillow")))
    if missing:
        return None, missing
    extra = {
        "builder": "data_prep/build_shards.py",
        "settings": _canonical(settings),
        "manifests": [m["name"] for m in settings["manifests"]],
        "rows": sum(m["rows"] for m in settings["manifests"]),
        "shards_built": len(jobs),
        "empty_shards": empty,
        "pillow": sorted(pillow),
    }
    return DatasetIndex(shards, fields, dict(sorted(skipped.items())), extra), []


def jobs_from_settings(settings: dict) -> list[ShardJob]:
    """The shard names and row ranges of a build, from the settings its stats record (no manifest access)."""
    rows = [Manifest(path=m["name"], kind="", rows=int(m["rows"])) for m in settings["manifests"]]
    start = 0
    for manifest in rows:
        manifest.start, start = start, start + manifest.rows
    return shard_jobs(rows, int(settings["samples_per_shard"]), settings["prefix"])
