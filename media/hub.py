"""The official weights: fetch them from the Hugging Face Hub, validate them, list a folder.

The ``edtalk-live weights`` command (:mod:`edtalk_live.clients.weights`) prints what these return::

    edtalk-live weights download [--dir DIR]     # Hub -> validated files in DIR (default folder below)
    edtalk-live weights list [--dir DIR]         # what DIR holds: family, size, widths, short hash

:func:`download_weights` lists the Hub repository ``tanhshuai0219/EDTalk``, picks the three
checkpoints (``EDTalk.pt``, ``EDTalk_lip_pose.pt``, ``Audio2Lip.pt``) and the emotion presets
(``predefined_exp_weights/*.npy``) by name wherever they sit in it, and downloads each with
``huggingface_hub`` (its progress bars; resumable, kept in the Hugging Face cache). Every file is
copied to ``DIR/.partial/``, checked there with the same checks as :func:`edtalk.load_model`, and
only then renamed to its final name, so an interrupted or failed run never leaves a file under a
name that could pass for complete; a file that fails the checks is reported and not placed.

The default folder is :func:`edtalk_live.media.weights.default_weights_dir`: ``$EDTALK_LIVE_WEIGHTS`` when
set, else ``$XDG_CACHE_HOME/edtalk-live/weights`` (``~/.cache/edtalk-live/weights``).

Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) the files come from the local Hugging Face
cache when an earlier download put them there; otherwise :class:`EDTalkError` says in one line
where to get the files by hand. ``source=`` reads a local folder laid out like the Hub repository
instead (offline installs, tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, list_repo_files, scan_cache_dir
from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from edtalk_live.edtalk.audio2lip import Audio2Lip
from edtalk_live.edtalk.checkpoint import check_state_dict, infer_config, read_checkpoint, weights_hash
from edtalk_live.edtalk.config import ModelConfig
from edtalk_live.edtalk.errors import CheckpointError, EDTalkError, InputError
from edtalk_live.edtalk.generator import Generator
from edtalk_live.media.weights import (
    AUDIO2LIP_FILE,
    EDTALK_FILE,
    LIP_POSE_FILE,
    PRESET_DIR,
    WEIGHTS_ENV,
    _first,
    default_weights_dir,
    load_preset,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HUB_REPO",
    "DownloadReport",
    "WeightInfo",
    "download_weights",
    "format_weights",
    "inspect_weight_file",
    "list_weights",
    "select_files",
    "usable",
]

HUB_REPO = "tanhshuai0219/EDTalk"
GENERATOR_FILES = (EDTALK_FILE, LIP_POSE_FILE)
CHECKPOINT_FILES = (*GENERATOR_FILES, AUDIO2LIP_FILE)
PARTIAL_DIR = ".partial"
_HASH_LEN = 8
_DEFAULT_LIP_DIM = 20
_FAMILY_OF_FILE = {EDTALK_FILE: "edtalk", LIP_POSE_FILE: "lip_pose"}

OK, MISSING, DAMAGED = "ok", "missing", "damaged"


# ------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class WeightInfo:
    """One weight file and what the checks found.

    Attributes:
        name: path relative to the weights folder: ``EDTalk.pt``, ``predefined_exp_weights/happy.npy``.
        kind: ``"generator"``, ``"audio2lip"`` or ``"preset"``.
        status: ``"ok"``, ``"missing"`` or ``"damaged"``.
        path: the file (None when missing).
        reason: one line saying why a file is missing or damaged (empty when ok).
        config: the generator's configuration, inferred from its tensors (generators only).
        lip_dim: mouth coefficients the network works with (generators and Audio2Lip).
        short_hash: first 8 hex digits of :func:`edtalk.checkpoint.weights_hash` (checkpoints) or
            of the file's sha256 (presets); the same prefix as the model's ``weights_id``.
        origin: where a downloaded file came from (its path in the repository), else empty.
    """

    name: str
    kind: str
    status: str
    path: Path | None = None
    reason: str = ""
    config: ModelConfig | None = None
    lip_dim: int | None = None
    short_hash: str = ""
    origin: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def family(self) -> str:
        if self.config is not None:
            return self.config.family
        return "audio2lip" if self.kind == "audio2lip" and self.ok else ""


def _kind_of(name: str) -> str:
    base = PurePosixPath(name).name
    if base in GENERATOR_FILES:
        return "generator"
    if base == AUDIO2LIP_FILE:
        return "audio2lip"
    if base.endswith(".npy"):
        return "preset"
    raise InputError(f"not an EDTalk weight file name: {name} (expected {', '.join(CHECKPOINT_FILES)} or *.npy)")


def _one_line(message: str, path: Path, name: str) -> str:
    """The first line of ``message``, without the ``<path>: `` prefix the checks put in front (else ``name``).

    The path is often a temporary copy (``.partial/...``), which would only confuse the reader.
    """
    text = message.strip().splitlines()[0] if message.strip() else "unreadable"
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text.replace(str(path), name)


def _check_generator(path: Path, name: str) -> tuple[ModelConfig, str]:
    sd, label = read_checkpoint(path, "gen", "EDTalk generator")
    config = infer_config(sd, label)
    with torch.device("meta"):  # shapes only: no memory for a second copy of the weights
        expected = Generator(config).state_dict()
    check_state_dict(expected, sd, label)
    want = _FAMILY_OF_FILE.get(PurePosixPath(name).name)
    if want is not None and config.family != want:
        raise CheckpointError(f"{label}: holds a {config.family} generator, but {PurePosixPath(name).name} "
                              f"is the {want} model (files swapped?)")
    return config, weights_hash(sd)[:_HASH_LEN]


def _check_audio2lip(path: Path, lip_dim: int | None) -> tuple[int, str]:
    sd, label = read_checkpoint(path, "audio2lip", "Audio2Lip")
    if "enc.net_app.convs.0.0.weight" in sd:
        raise CheckpointError(f"{label}: this is an EDTalk generator checkpoint, not Audio2Lip")
    mapping = sd.get("mapping.weight")
    own = int(mapping.shape[0]) if mapping is not None and mapping.ndim == 2 else _DEFAULT_LIP_DIM
    if lip_dim is not None and own != lip_dim:
        raise CheckpointError(f"{label}: predicts {own} mouth coefficients, the generator takes {lip_dim}")
    with torch.device("meta"):
        expected = Audio2Lip(own).state_dict()
    check_state_dict(expected, sd, label)
    return own, weights_hash(sd)[:_HASH_LEN]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:_HASH_LEN]


def inspect_weight_file(path: str | os.PathLike[str], name: str | None = None,
                        lip_dim: int | None = None) -> WeightInfo:
    """Check one weight file with the checks of :func:`edtalk.load_model`; never raises for a bad file.

    ``name`` (default: the file name) says what the file should be: a generator (``EDTalk.pt``,
    ``EDTalk_lip_pose.pt``: readable, tensor names and shapes of the inferred configuration, all
    finite, family matching the name), ``Audio2Lip.pt`` (same, plus ``lip_dim`` when given) or a
    preset ``*.npy`` (``[1,10]`` finite numbers). A missing or failing file gives ``status``
    ``"missing"`` or ``"damaged"`` with a one-line ``reason``.
    """
    path = Path(path)
    name = name or path.name
    kind = _kind_of(name)
    if not path.is_file():
        return WeightInfo(name, kind, MISSING, reason="not found" if not path.exists() else "not a file")
    try:
        if kind == "generator":
            config, short = _check_generator(path, name)
            return WeightInfo(name, kind, OK, path, config=config, lip_dim=config.lip_dim, short_hash=short)
        if kind == "audio2lip":
            own, short = _check_audio2lip(path, lip_dim)
            return WeightInfo(name, kind, OK, path, lip_dim=own, short_hash=short)
        load_preset(path)
        return WeightInfo(name, kind, OK, path, short_hash=_file_hash(path))
    except CheckpointError as exc:
        return WeightInfo(name, kind, DAMAGED, path, reason=_one_line(str(exc), path, name))
    except Exception as exc:  # noqa: BLE001 - a damaged file must be reported, never crash the listing
        logger.debug("checking %s", path, exc_info=True)
        return WeightInfo(name, kind, DAMAGED, path, reason=_one_line(f"{type(exc).__name__}: {exc}", path, name))


# ------------------------------------------------------------------------------------------ list


def list_weights(folder: str | os.PathLike[str] | None = None) -> list[WeightInfo]:
    """Check every expected file of a weights folder (default: :func:`default_weights_dir`).

    One row per checkpoint (``EDTalk.pt``, ``EDTalk_lip_pose.pt``, ``Audio2Lip.pt``; looked up in the
    folder and its ``ckpts/`` subfolder, like :func:`edtalk_live.media.weights.find_weights`), then one row per
    preset ``.npy`` (or one ``missing`` row when there is none). Never raises for a missing or
    damaged file: its row says what is wrong.
    """
    root = default_weights_dir() if folder is None else Path(folder).expanduser()
    where = "folder does not exist" if not root.is_dir() else "not in this folder"
    rows: list[WeightInfo] = []
    lip_dim = None
    for name in CHECKPOINT_FILES:
        path = _first(root, name) if root.is_dir() else None
        if path is None:
            rows.append(WeightInfo(name, _kind_of(name), MISSING, reason=where))
            continue
        info = inspect_weight_file(path, name, lip_dim=lip_dim if name == AUDIO2LIP_FILE else None)
        if info.ok and info.kind == "generator" and lip_dim is None:
            lip_dim = info.lip_dim
        rows.append(info)
    preset_dir = _first(root, PRESET_DIR) if root.is_dir() else None
    presets = sorted(preset_dir.glob("*.npy")) if preset_dir is not None and preset_dir.is_dir() else []
    rows.extend(inspect_weight_file(p, f"{PRESET_DIR}/{p.name}") for p in presets)
    if not presets:
        rows.append(WeightInfo(f"{PRESET_DIR}/*.npy", "preset", MISSING, reason=where))
    return rows


def _selected_generator(rows: Sequence[WeightInfo]) -> WeightInfo | None:
    """The generator ``find_weights`` would use: ``EDTalk.pt`` when present (even damaged), else the other."""
    for info in rows:
        if info.kind == "generator" and info.status != MISSING:
            return info
    return None


def usable(rows: Sequence[WeightInfo]) -> bool:
    """Whether the generator that ``--weights`` would use is present and passes the checks."""
    gen = _selected_generator(rows)
    return gen is not None and gen.ok


def _table(rows: Iterable[WeightInfo]) -> list[str]:
    """Aligned lines: file, status, family, size, widths, hash; ok presets folded into one line."""
    rows = list(rows)
    lines: list[list[str]] = [["file", "status", "family", "size", "widths", "hash"]]
    ok_presets = [r for r in rows if r.kind == "preset" and r.ok]
    for r in rows:
        if r.kind == "preset" and r.ok:
            if r is ok_presets[0]:
                names = ", ".join(PurePosixPath(p.name).stem for p in ok_presets)
                lines.append([f"{PRESET_DIR}/", f"ok: {len(ok_presets)} emotion presets ({names})"])
        elif not r.ok:
            lines.append([r.name, f"{r.status}: {r.reason}"])
        elif r.config is not None:
            c = r.config
            lines.append([r.name, OK, c.family, f"{c.size}x{c.size}", ",".join(map(str, c.widths)), r.short_hash])
        else:
            lines.append([r.name, OK, r.family, "-", f"{r.lip_dim} mouth", r.short_hash])
    full = [line for line in lines if len(line) == 6]
    col = [max(len(line[i]) for line in (lines if i == 0 else full)) for i in range(5)]
    return ["  ".join(cell.ljust(col[i]) if i < len(line) - 1 else cell for i, cell in enumerate(line))
            for line in lines]


def format_weights(rows: Sequence[WeightInfo], folder: str | os.PathLike[str] | None = None) -> str:
    """The table of :func:`list_weights`, a header naming the folder and a last line saying if it is usable."""
    root = default_weights_dir() if folder is None else Path(folder).expanduser()
    lines = [f"weights folder: {root}", *_table(rows)]
    gen = _selected_generator(rows)
    a2l = next((r for r in rows if r.kind == "audio2lip"), None)
    if gen is None:
        lines.append(f"not usable: no {EDTALK_FILE} or {LIP_POSE_FILE}; run `edtalk-live weights download`"
                     f" (or set {WEIGHTS_ENV} to a folder that holds them)")
    elif not gen.ok:
        lines.append(f"not usable: {gen.name} is damaged and is the file --weights would load; "
                     "run `edtalk-live weights download` again, or remove it")
    elif a2l is None or not a2l.ok:
        lines.append(f"usable for video-driven motion only: {AUDIO2LIP_FILE} is {a2l.status if a2l else MISSING} "
                     "(needed to drive the mouth from audio)")
    else:
        n = sum(1 for r in rows if r.kind == "preset" and r.ok)
        lines.append(f"usable: {gen.name} ({gen.family}, {gen.config.size}x{gen.config.size}) with "
                     f"{AUDIO2LIP_FILE} and {n} emotion preset{'s' if n != 1 else ''}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ download


@dataclass(frozen=True)
class DownloadReport:
    """What :func:`download_weights` did.

    Attributes:
        repo: the Hub repository.
        origin: where the files came from (the Hub URL, the local Hugging Face cache, a local folder).
        dest: the weights folder the files were placed in.
        files: one row per file picked from the repository: ``ok`` (validated and placed) or
            ``damaged`` (failed the checks, not placed; an older file of that name is left alone).
        absent: checkpoint names the repository did not hold.
    """

    repo: str
    origin: str
    dest: Path
    files: tuple[WeightInfo, ...]
    absent: tuple[str, ...] = ()

    @property
    def placed(self) -> tuple[WeightInfo, ...]:
        return tuple(f for f in self.files if f.ok)

    @property
    def failed(self) -> tuple[WeightInfo, ...]:
        return tuple(f for f in self.files if not f.ok)

    @property
    def ok(self) -> bool:
        """No file failed, a generator and ``Audio2Lip.pt`` were placed."""
        names = {f.name for f in self.placed}
        return not self.failed and bool(names & set(GENERATOR_FILES)) and AUDIO2LIP_FILE in names

    def format(self) -> str:
        lines = [f"from {self.origin}", f"into {self.dest}", *_table(self.files)]
        for name in self.absent:
            lines.append(f"{name}  not in the repository")
        n_ok, n_bad = len(self.placed), len(self.failed)
        summary = f"{n_ok} file{'s' if n_ok != 1 else ''} placed"
        if n_bad:
            summary += f"; {n_bad} failed the checks and {'was' if n_bad == 1 else 'were'} not placed"
        lines.append(summary)
        return "\n".join(lines)


@dataclass(frozen=True)
class _Listing:
    """The files of a repository snapshot and how to get one of them as a local file."""

    origin: str
    files: tuple[str, ...]
    fetch: Callable[[str], Path]


def select_files(paths: Iterable[str]) -> dict[str, str]:
    """Pick the wanted files of a repository by name, wherever they sit.

    Returns ``{name in the weights folder: path in the repository}``, e.g.
    ``{"EDTalk.pt": "ckpts/EDTalk.pt", "predefined_exp_weights/happy.npy":
    "ckpts/predefined_exp_weights/happy.npy"}``: the three checkpoints by file name, and every
    ``.npy`` inside a folder named ``predefined_exp_weights``. When a name occurs twice the
    shallowest path wins (then the first in sorted order).
    """
    chosen: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: (p.count("/"), p)):
        p = PurePosixPath(path)
        if p.name in CHECKPOINT_FILES:
            target = p.name
        elif p.suffix == ".npy" and p.parent.name == PRESET_DIR:
            target = f"{PRESET_DIR}/{p.name}"
        else:
            continue
        if target in chosen:
            logger.info("%s also at %s: using %s", target, path, chosen[target])
            continue
        chosen[target] = path
    return chosen


def _manual_hint(repo: str, dest: Path) -> str:
    return (f"download {EDTALK_FILE}, {LIP_POSE_FILE}, {AUDIO2LIP_FILE} and {PRESET_DIR}/*.npy from "
            f"https://huggingface.co/{repo} by hand and put them in {dest} (or set {WEIGHTS_ENV} to their folder)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _unreachable(exc: BaseException) -> bool:
    """Whether a Hub call failed for want of a connection (rather than an answer from the Hub)."""
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return True
    if isinstance(exc, HfHubHTTPError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # requests' ConnectionError/Timeout (huggingface_hub < 1.0), httpx's ConnectError/TimeoutException
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "Timeout", "TimeoutException", "NetworkError"})


def _hub_failure(repo: str, dest: Path, exc: BaseException, doing: str = "") -> EDTalkError:
    hint = _manual_hint(repo, dest)
    if isinstance(exc, OfflineModeIsEnabled):
        why = "offline: HF_HUB_OFFLINE is set"
    elif isinstance(exc, LocalEntryNotFoundError):
        why = "offline, and the files are not in the local Hugging Face cache"
    else:
        why = _first_line(exc)
    if _unreachable(exc):
        resume = "; run the command again to resume, or " if doing else "; "
        return EDTalkError(f"cannot reach the Hugging Face Hub for {repo}{doing} ({why}){resume}{hint}")
    return EDTalkError(f"the Hugging Face Hub could not give {repo}{doing} ({why}); {hint}")


def _folder_listing(root: Path, origin: str) -> _Listing:
    files = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))
    return _Listing(origin, files, lambda path: root / path)


def _cache_listing(repo: str, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> _Listing | None:
    """The snapshot of ``repo`` in the local Hugging Face cache (files complete by construction), or None."""
    try:
        cache = scan_cache_dir(cache_dir)
    except Exception as exc:  # noqa: BLE001 - CacheNotFound, or a cache it cannot read: nothing cached
        logger.debug("no usable Hugging Face cache: %s", _first_line(exc))
        return None
    revisions = [rev for info in cache.repos if info.repo_id == repo and info.repo_type == "model"
                 for rev in info.revisions]
    wanted = revision or "main"
    match = [rev for rev in revisions if rev.commit_hash == wanted or wanted in rev.refs]
    if not match and revision is None and revisions:
        match = sorted(revisions, key=lambda rev: rev.last_modified, reverse=True)
    if not match:
        return None
    rev = match[0]
    snapshot = Path(rev.snapshot_path)
    files = tuple(sorted(Path(f.file_path).relative_to(snapshot).as_posix() for f in rev.files))
    origin = f"the local Hugging Face cache of {repo} (commit {rev.commit_hash[:8]}, offline)"
    return _Listing(origin, files, lambda path: snapshot / path)


def _hub_listing(repo: str, revision: str | None, cache_dir: str | os.PathLike[str] | None,
                 dest: Path) -> _Listing:
    if _hub_offline():
        cached = _cache_listing(repo, revision, cache_dir)
        if cached is None:
            raise EDTalkError(f"cannot reach the Hugging Face Hub for {repo} (offline: HF_HUB_OFFLINE is set, and "
                              f"the files are not in the local Hugging Face cache); {_manual_hint(repo, dest)}")
        return cached
    try:
        files = tuple(list_repo_files(repo, revision=revision))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub, requests and httpx raise many types
        logger.debug("listing %s", repo, exc_info=True)
        if _unreachable(exc):
            cached = _cache_listing(repo, revision, cache_dir)
            if cached is not None:
                logger.warning("cannot reach the Hugging Face Hub (%s): using %s", _first_line(exc), cached.origin)
                return cached
        raise _hub_failure(repo, dest, exc) from None

    def fetch(path: str) -> Path:
        try:
            return Path(hf_hub_download(repo, path, revision=revision, cache_dir=cache_dir))
        except Exception as exc:  # noqa: BLE001 - as above
            logger.debug("downloading %s", path, exc_info=True)
            raise _hub_failure(repo, dest, exc, doing=f" while downloading {path}") from None

    return _Listing(f"https://huggingface.co/{repo}" + (f" (revision {revision})" if revision else ""), files, fetch)


def _copy(src: Path, dst: Path) -> None:
    """Copy one file (following symbolic links: the Hugging Face cache links snapshots to blobs)."""
    shutil.copyfile(src, dst)


def _place(listing: _Listing, repo_path: str, name: str, dest: Path, partial_root: Path,
           lip_dim: int | None) -> WeightInfo:
    """Fetch one file, copy it to ``partial_root``, check it there, rename it into ``dest`` when it passes."""
    partial = partial_root / name
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = listing.fetch(repo_path)
        logger.info("checking %s (from %s)", name, repo_path)
        _copy(src, partial)
        info = inspect_weight_file(partial, name, lip_dim=lip_dim)
        if info.ok:
            final = dest / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)  # atomic: the final name only ever holds a checked, complete file
            info = replace(info, path=final)
        else:
            info = replace(info, path=None)
        return replace(info, origin=repo_path)
    finally:
        partial.unlink(missing_ok=True)


def download_weights(dest: str | os.PathLike[str] | None = None, repo: str = HUB_REPO, revision: str | None = None,
                     source: str | os.PathLike[str] | None = None,
                     cache_dir: str | os.PathLike[str] | None = None) -> DownloadReport:
    """Fetch, check and place the official weights; see the module docstring.

    Args:
        dest: weights folder (default: :func:`default_weights_dir`); created when needed.
        repo: Hub repository, ``owner/name``.
        revision: branch, tag or commit of the repository (default: its main branch).
        source: a local folder laid out like the Hub repository, read instead of the Hub.
        cache_dir: Hugging Face cache folder (default: huggingface_hub's, ``HF_HUB_CACHE``).

    Returns:
        A :class:`DownloadReport`; files that fail the checks are in it (``damaged``), not placed.

    Raises:
        EDTalkError: one line when the Hub cannot be reached and the files are not cached, the Hub
            refuses the repository, or it holds neither generator; nothing is written then.
        OSError: writing into ``dest`` failed; the file being written is not left under its name.
    """
    dest = default_weights_dir() if dest is None else Path(dest).expanduser()
    if source is not None:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise InputError(f"source folder not found: {root} (expected a folder laid out like {repo})")
        listing = _folder_listing(root, f"{root} (a local copy of {repo})")
    else:
        listing = _hub_listing(repo, revision, cache_dir, dest)
    chosen = select_files(listing.files)
    if not any(name in chosen for name in GENERATOR_FILES):
        raise EDTalkError(f"{listing.origin} holds no {EDTALK_FILE} or {LIP_POSE_FILE} "
                          f"({len(listing.files)} files); {_manual_hint(repo, dest)}")
    absent = tuple(name for name in CHECKPOINT_FILES if name not in chosen)
    order = [*(n for n in CHECKPOINT_FILES if n in chosen), *sorted(n for n in chosen if n not in CHECKPOINT_FILES)]
    logger.info("%d files from %s into %s", len(order), listing.origin, dest)

    dest.mkdir(parents=True, exist_ok=True)
    (dest / PARTIAL_DIR).mkdir(exist_ok=True)
    partial_root = Path(tempfile.mkdtemp(dir=dest / PARTIAL_DIR))  # one per run: concurrent runs do not collide
    results: list[WeightInfo] = []
    lip_dim = None
    try:
        for name in order:
            info = _place(listing, chosen[name], name, dest, partial_root, lip_dim)
            if info.ok and info.kind == "generator" and lip_dim is None:
                lip_dim = info.lip_dim
            if not info.ok:
                logger.warning("%s from %s failed the checks and was not placed: %s", name, listing.origin,
                               info.reason)
            results.append(info)
    finally:
        shutil.rmtree(partial_root, ignore_errors=True)
        try:
            (dest / PARTIAL_DIR).rmdir()  # only when empty: another run may be using it
        except OSError:
            pass
    return DownloadReport(repo=repo, origin=listing.origin, dest=dest, files=tuple(results), absent=absent)
