"""``edtalk-live weights download|list``: the Hub logic on a local folder laid out like the Hub repository.

The Hub itself cannot be reached from our machines: the download path is tested with a local
``source`` folder, with a fake Hugging Face cache under ``HF_HUB_OFFLINE=1``, and with
``list_repo_files`` / ``hf_hub_download`` replaced by fakes that serve the same local files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled

import edtalk_live.edtalk as edtalk
from edtalk_live.clients import weights
from edtalk_live.edtalk.checkpoint import weights_hash
from edtalk_live.edtalk.errors import CheckpointError, EDTalkError, InputError
from edtalk_live.media import hub
from edtalk_live.media.weights import default_weights_dir, find_weights

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
PRESETS = SHARED / "testdata" / "edtalk" / "predefined_exp_weights"
EMOTIONS = ["angry", "contempt", "disgusted", "fear", "happy", "neutral", "sad", "surprised"]
WANTED = {
    "EDTalk.pt": "ckpts/EDTalk.pt",
    "EDTalk_lip_pose.pt": "ckpts/EDTalk_lip_pose.pt",
    "Audio2Lip.pt": "ckpts/Audio2Lip.pt",
    **{f"predefined_exp_weights/{e}.npy": f"ckpts/predefined_exp_weights/{e}.npy" for e in EMOTIONS},
}
HUB_URL = f"https://huggingface.co/{hub.HUB_REPO}"


def _files(folder: Path) -> set[str]:
    """Every entry under ``folder`` (files and folders, hidden ones too), relative, as posix paths."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


def _placed_files() -> set[str]:
    return {*WANTED, "predefined_exp_weights"}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the Hub repository (``ckpts/...``), from the size-64 parity fixtures."""
    for need in (FIXTURES / "edtalk_s64.pt", FIXTURES / "lip_pose_s64.pt", PRESETS):
        if not need.exists():
            pytest.skip(f"{need} not found (the Hub tests build their repository from ../shared)")
    edtalk_fx = torch.load(FIXTURES / "edtalk_s64.pt", weights_only=True)
    lip_pose_fx = torch.load(FIXTURES / "lip_pose_s64.pt", weights_only=True)
    root = tmp_path_factory.mktemp("hub_repo")
    (root / "ckpts" / "predefined_exp_weights").mkdir(parents=True)
    torch.save(edtalk_fx["checkpoint"], root / "ckpts" / "EDTalk.pt")
    torch.save(lip_pose_fx["checkpoint"], root / "ckpts" / "EDTalk_lip_pose.pt")
    torch.save(edtalk_fx["audio2lip_checkpoint"], root / "ckpts" / "Audio2Lip.pt")
    for npy in sorted(PRESETS.glob("*.npy")):
        shutil.copy(npy, root / "ckpts" / "predefined_exp_weights")
    # unrelated files that must not be downloaded
    (root / "README.md").write_text("# EDTalk\n")
    (root / ".gitattributes").write_text("*.pt filter=lfs\n")
    (root / "other").mkdir()
    torch.save({"w": torch.zeros(3)}, root / "other" / "model.pth")
    np.save(root / "ckpts" / "crop_template.npy", np.zeros((5, 2), np.float32))
    return root


@pytest.fixture
def source(hub_like: Path, tmp_path: Path) -> Path:
    """A private copy of the Hub-like folder, free to damage."""
    return Path(shutil.copytree(hub_like, tmp_path / "repo"))


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, no user folders: the default folders point into tmp_path, the Hub calls fail loudly."""
    for var in ("EDTALK_LIVE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hf_cache = tmp_path / "hf_cache"
    real_scan = hub.scan_cache_dir
    monkeypatch.setattr(hub, "scan_cache_dir", lambda cache_dir=None: real_scan(cache_dir or hf_cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test reached for the network: {args} {kwargs}")

    monkeypatch.setattr(hub, "list_repo_files", no_network)
    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    return hf_cache


def _check_placed(dest: Path, source: Path) -> None:
    assert _files(dest) == _placed_files(), "wrong set of files (or leftovers) in the weights folder"
    for name, repo_path in WANTED.items():
        assert (dest / name).read_bytes() == (source / repo_path).read_bytes(), name


# ------------------------------------------------------------------------------------------ selection


def test_select_files_by_name_wherever_they_are():
    paths = [
        "README.md", ".gitattributes", "other/model.pth", "EDTalk.pt.bak", "ckpts/crop_template.npy",
        "old/ckpts/EDTalk.pt",                              # deeper duplicate: loses
        "EDTalk.pt",                                        # at the top
        "weights/v2/EDTalk_lip_pose.pt",                    # anywhere
        "ckpts/Audio2Lip.pt",
        "ckpts/predefined_exp_weights/happy.npy",
        "misc/predefined_exp_weights/sad.npy",
        "ckpts/predefined_exp_weights/notes.txt",
    ]  # fmt: skip
    assert hub.select_files(paths) == {
        "EDTalk.pt": "EDTalk.pt",
        "EDTalk_lip_pose.pt": "weights/v2/EDTalk_lip_pose.pt",
        "Audio2Lip.pt": "ckpts/Audio2Lip.pt",
        "predefined_exp_weights/happy.npy": "ckpts/predefined_exp_weights/happy.npy",
        "predefined_exp_weights/sad.npy": "misc/predefined_exp_weights/sad.npy",
    }
    assert hub.select_files(["README.md", "other/model.pth"]) == {}


# ------------------------------------------------------------------------------------------ download


def test_download_from_hub_like_folder(source: Path, tmp_path: Path):
    dest = tmp_path / "weights"
    report = hub.download_weights(dest, source=source)
    assert report.ok and not report.failed and report.absent == ()
    assert report.dest == dest and str(source) in report.origin
    _check_placed(dest, source)
    rows = {r.name: r for r in report.files}
    assert set(rows) == set(WANTED)
    assert {rows[n].origin for n in WANTED} == set(WANTED.values())
    gen = rows["EDTalk.pt"]
    assert gen.config.family == "edtalk" and gen.config.size == 64 and gen.path == dest / "EDTalk.pt"
    sd = torch.load(source / "ckpts" / "EDTalk.pt", weights_only=True)["gen"]
    assert gen.short_hash == weights_hash(sd)[:8]
    assert rows["EDTalk_lip_pose.pt"].config.family == "lip_pose"
    assert rows["Audio2Lip.pt"].lip_dim == 20

    # the placed folder is what every command's --weights loads
    w = find_weights(dest)
    assert w.gen == dest / "EDTalk.pt" and sorted(w.presets) == EMOTIONS
    model = edtalk.load_model(w.gen, audio2lip=w.audio2lip)
    assert model.weights_id.startswith(gen.short_hash)

    text = report.format()
    assert "11 files placed" in text and "not placed" not in text
    # a second run replaces the files with identical ones
    again = hub.download_weights(dest, source=source)
    assert again.ok
    _check_placed(dest, source)


def test_damaged_files_are_reported_not_placed(source: Path, tmp_path: Path):
    dest = tmp_path / "weights"
    _truncate(source / "ckpts" / "EDTalk_lip_pose.pt")
    np.save(source / "ckpts" / "predefined_exp_weights" / "bad.npy", np.zeros((2, 10), np.float32))
    good_audio2lip = (source / "ckpts" / "Audio2Lip.pt").read_bytes()
    sd = torch.load(source / "ckpts" / "Audio2Lip.pt", weights_only=True)
    sd["audio2lip"]["mapping.weight"][0, 0] = float("nan")
    torch.save(sd, source / "ckpts" / "Audio2Lip.pt")
    dest.mkdir()
    (dest / "Audio2Lip.pt").write_bytes(good_audio2lip)  # from an earlier run: must survive

    report = hub.download_weights(dest, source=source)
    assert not report.ok
    failed = {r.name: r for r in report.failed}
    assert set(failed) == {"EDTalk_lip_pose.pt", "Audio2Lip.pt", "predefined_exp_weights/bad.npy"}
    assert "cannot read" in failed["EDTalk_lip_pose.pt"].reason
    assert "NaN" in failed["Audio2Lip.pt"].reason
    assert "[1,10]" in failed["predefined_exp_weights/bad.npy"].reason
    for row in failed.values():
        assert row.status == "damaged" and row.path is None and "\n" not in row.reason
        assert str(dest) not in row.reason and hub.PARTIAL_DIR not in row.reason

    # nothing damaged under a final name, no partial copies anywhere
    assert _files(dest) == _placed_files() - {"EDTalk_lip_pose.pt"}
    assert (dest / "Audio2Lip.pt").read_bytes() == good_audio2lip
    text = report.format()
    assert "3 failed the checks and were not placed" in text
    assert "damaged: cannot read EDTalk generator checkpoint" in text


def test_swapped_files_fail_the_checks(source: Path, tmp_path: Path):
    ckpts = source / "ckpts"
    ckpts.joinpath("EDTalk.pt").unlink()
    shutil.copy(ckpts / "EDTalk_lip_pose.pt", ckpts / "EDTalk.pt")  # a lip_pose network named EDTalk.pt
    shutil.copy(ckpts / "EDTalk_lip_pose.pt", ckpts / "Audio2Lip.pt")  # a generator named Audio2Lip.pt
    report = hub.download_weights(tmp_path / "w", source=source)
    failed = {r.name: r.reason for r in report.failed}
    assert "lip_pose generator" in failed["EDTalk.pt"]
    assert "not Audio2Lip" in failed["Audio2Lip.pt"]
    assert not (tmp_path / "w" / "EDTalk.pt").exists() and not (tmp_path / "w" / "Audio2Lip.pt").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_copy_leaves_no_final_file(source: Path, tmp_path: Path, monkeypatch, error):
    dest = tmp_path / "weights"
    real_copy = hub._copy

    def copy_then_fail(src: Path, dst: Path) -> None:
        if src.name == "Audio2Lip.pt":  # third file: the two generators are already placed
            dst.write_bytes(src.read_bytes()[:1000])
            raise error
        real_copy(src, dst)

    monkeypatch.setattr(hub, "_copy", copy_then_fail)
    with pytest.raises(type(error)):
        hub.download_weights(dest, source=source)
    assert _files(dest) == {"EDTalk.pt", "EDTalk_lip_pose.pt"}  # complete, checked files only
    monkeypatch.setattr(hub, "_copy", real_copy)
    assert hub.download_weights(dest, source=source).ok  # the next run completes the folder
    _check_placed(dest, source)


def test_source_without_generator_writes_nothing(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "ckpts").mkdir(parents=True)
    (repo / "README.md").write_text("nothing here\n")
    with pytest.raises(EDTalkError, match="holds no EDTalk.pt or EDTalk_lip_pose.pt"):
        hub.download_weights(tmp_path / "w", source=repo)
    assert not (tmp_path / "w").exists()
    with pytest.raises(InputError, match="source folder not found"):
        hub.download_weights(tmp_path / "w", source=tmp_path / "missing")


# ------------------------------------------------------------------------------------------ the Hub


def _check_unreachable_message(message: str, dest: Path) -> None:
    assert "\n" not in message
    assert message.startswith(f"cannot reach the Hugging Face Hub for {hub.HUB_REPO}")
    assert HUB_URL in message and str(dest) in message and "EDTALK_LIVE_WEIGHTS" in message
    assert "EDTalk.pt, EDTalk_lip_pose.pt, Audio2Lip.pt and predefined_exp_weights/*.npy" in message


def test_offline_without_cache_is_one_line_and_writes_nothing(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "weights"
    with pytest.raises(EDTalkError) as info:
        hub.download_weights(dest)
    _check_unreachable_message(str(info.value), dest)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert not dest.exists()
    # the same through the command and the default folder
    monkeypatch.setenv("EDTALK_LIVE_WEIGHTS", str(dest))
    with pytest.raises(EDTalkError, match="cannot reach the Hugging Face Hub"):
        weights.main_weights(argparse.Namespace(action="download", dir=None))
    assert not dest.exists()


def test_offline_in_a_fresh_process(tmp_path: Path):
    """The real huggingface_hub with HF_HUB_OFFLINE=1 set before it is imported."""
    dest = tmp_path / "weights"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache"),
           "EDTALK_LIVE_WEIGHTS": str(dest)}
    code = (
        "import argparse, sys\n"
        "from edtalk_live.clients.weights import main_weights\n"
        "from edtalk_live.edtalk.errors import EDTalkError\n"
        "try:\n"
        "    main_weights(argparse.Namespace(action='download', dir=None))\n"
        "except EDTalkError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    _check_unreachable_message(lines[0], dest)
    assert not dest.exists()


def test_real_library_offline_error_is_classified(monkeypatch, tmp_path: Path):
    """huggingface_hub's own offline error (its import-time flag), not our early check."""
    from huggingface_hub import constants, list_repo_files

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    with pytest.raises(EDTalkError) as info:
        hub.download_weights(tmp_path / "w")
    _check_unreachable_message(str(info.value), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def _fake_hf_cache(cache: Path, source: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> None:
    """The Hugging Face cache layout: blobs by hash, a snapshot of links to them, refs/main -> commit."""
    root = cache / ("models--" + hub.HUB_REPO.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    for f in source.rglob("*"):
        if f.is_file():
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.write_bytes(f.read_bytes())
            link = root / "snapshots" / commit / f.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_offline_with_files_in_the_hf_cache(source: Path, tmp_path: Path, isolated: Path, monkeypatch):
    _fake_hf_cache(isolated, source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "weights"
    report = hub.download_weights(dest)
    assert report.ok and "local Hugging Face cache" in report.origin
    _check_placed(dest, source)
    with pytest.raises(EDTalkError, match="cannot reach"):  # another revision is not cached
        hub.download_weights(tmp_path / "other", revision="v2")


@pytest.fixture
def fake_hub(source: Path, monkeypatch) -> dict:
    """``list_repo_files`` / ``hf_hub_download`` serving a repository laid out differently from ``source``."""
    layout = {
        "EDTalk.pt": source / "ckpts" / "EDTalk.pt",
        "weights/v2/EDTalk_lip_pose.pt": source / "ckpts" / "EDTalk_lip_pose.pt",
        "ckpts/Audio2Lip.pt": source / "ckpts" / "Audio2Lip.pt",
        "old/ckpts/EDTalk.pt": source / "README.md",  # a deeper duplicate: never fetched
        "README.md": source / "README.md",
        "other/model.pth": source / "other" / "model.pth",
        **{f"ckpts/predefined_exp_weights/{e}.npy": PRESETS / f"{e}.npy" for e in EMOTIONS},
    }
    calls: dict = {"list": [], "download": []}

    def list_repo_files(repo_id, *, revision=None, **kwargs):
        calls["list"].append((repo_id, revision))
        return list(layout)

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        calls["download"].append((repo_id, filename, revision))
        if filename in calls.get("fail_on", ()):
            raise ConnectionError("[Errno -2] Name or service not known")
        return str(layout[filename])

    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    return calls


def test_hub_path_picks_files_by_name(fake_hub: dict, tmp_path: Path):
    dest = tmp_path / "weights"
    report = hub.download_weights(dest, revision="abc123")
    assert report.ok and report.origin == f"{HUB_URL} (revision abc123)"
    assert fake_hub["list"] == [(hub.HUB_REPO, "abc123")]
    fetched = [name for _, name, _ in fake_hub["download"]]
    assert sorted(fetched) == sorted(
        ["EDTalk.pt", "weights/v2/EDTalk_lip_pose.pt", "ckpts/Audio2Lip.pt",
         *(f"ckpts/predefined_exp_weights/{e}.npy" for e in EMOTIONS)]
    )  # fmt: skip
    assert {(repo, rev) for repo, _, rev in fake_hub["download"]} == {(hub.HUB_REPO, "abc123")}
    assert _files(dest) == _placed_files()
    assert find_weights(dest).gen == dest / "EDTalk.pt"


def test_hub_connection_lost_mid_download(fake_hub: dict, tmp_path: Path):
    fake_hub["fail_on"] = {"ckpts/Audio2Lip.pt"}
    dest = tmp_path / "weights"
    with pytest.raises(EDTalkError) as info:
        hub.download_weights(dest)
    message = str(info.value)
    assert "\n" not in message and "while downloading ckpts/Audio2Lip.pt" in message
    assert "run the command again to resume" in message and HUB_URL in message
    assert _files(dest) == {"EDTalk.pt", "EDTalk_lip_pose.pt"}


class ConnectError(Exception):
    """Stands for httpx's ConnectError (not an OSError)."""


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Name or service not known"),
        TimeoutError("timed out"),
        ConnectError("[Errno -2] Name or service not known"),
        OfflineModeIsEnabled("offline mode is enabled"),
        LocalEntryNotFoundError("cannot find the requested files in the local cache"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_hub_unreachable(monkeypatch, tmp_path: Path, error):
    def list_repo_files(*args, **kwargs):
        raise error

    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    dest = tmp_path / "weights"
    with pytest.raises(EDTalkError) as info:
        hub.download_weights(dest)
    _check_unreachable_message(str(info.value), dest)
    assert not dest.exists()


def test_hub_other_failure_is_one_line(monkeypatch, tmp_path: Path):
    def list_repo_files(*args, **kwargs):
        raise RuntimeError("401 Unauthorized\nmore details")

    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    with pytest.raises(EDTalkError) as info:
        hub.download_weights(tmp_path / "w")
    message = str(info.value)
    assert "\n" not in message and "401 Unauthorized" in message and HUB_URL in message
    assert not (tmp_path / "w").exists()


def test_unreachable_hub_falls_back_to_the_cache(source: Path, isolated: Path, monkeypatch, tmp_path: Path):
    _fake_hf_cache(isolated, source)

    def list_repo_files(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub, "list_repo_files", list_repo_files)
    report = hub.download_weights(tmp_path / "weights")
    assert report.ok and "local Hugging Face cache" in report.origin


# ------------------------------------------------------------------------------------------ default folder


def test_default_weights_dir(monkeypatch, tmp_path: Path, source: Path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_weights_dir() == tmp_path / "home" / ".cache" / "edtalk-live" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_weights_dir() == tmp_path / "xdg" / "edtalk-live" / "weights"
    with pytest.raises(CheckpointError, match="run `edtalk-live weights download`"):
        find_weights()
    (tmp_path / "xdg" / "edtalk-live" / "weights").mkdir(parents=True)  # empty folder: the same hint
    with pytest.raises(CheckpointError, match="run `edtalk-live weights download`"):
        find_weights(None)

    override = tmp_path / "mine"
    monkeypatch.setenv("EDTALK_LIVE_WEIGHTS", str(override))
    assert default_weights_dir() == override
    assert hub.download_weights(source=source).dest == override
    _check_placed(override, source)
    assert find_weights().gen == override / "EDTalk.pt"
    assert not (tmp_path / "xdg" / "edtalk-live" / "weights" / "EDTalk.pt").exists()


# ------------------------------------------------------------------------------------------ list


def _rows(folder: Path | None) -> dict[str, hub.WeightInfo]:
    return {r.name: r for r in hub.list_weights(folder)}


def test_list_weights(source: Path, tmp_path: Path, capsys):
    dest = tmp_path / "weights"
    hub.download_weights(dest, source=source)
    rows = _rows(dest)
    assert set(rows) == set(WANTED)
    assert all(r.ok for r in rows.values())
    gen = rows["EDTalk.pt"]
    assert (gen.family, gen.config.size, gen.config.widths) == ("edtalk", 64, (64, 64, 64, 32, 16))
    sd = torch.load(dest / "EDTalk.pt", weights_only=True)["gen"]
    assert gen.short_hash == weights_hash(sd)[:8]
    happy = rows["predefined_exp_weights/happy.npy"]
    assert happy.short_hash == hashlib.sha256((dest / happy.name).read_bytes()).hexdigest()[:8]
    assert weights.main_weights(argparse.Namespace(action="list", dir=str(dest))) == 0
    out = capsys.readouterr().out
    assert f"weights folder: {dest}" in out and "8 emotion presets" in out and gen.short_hash in out
    assert "usable: EDTalk.pt (edtalk, 64x64)" in out

    # damaged and missing files: a row each, no exception
    _truncate(dest / "EDTalk.pt")
    (dest / "Audio2Lip.pt").unlink()
    np.save(dest / "predefined_exp_weights" / "sad.npy", np.full((1, 10), np.inf, np.float32))
    rows = _rows(dest)
    assert rows["EDTalk.pt"].status == "damaged" and "cannot read" in rows["EDTalk.pt"].reason
    assert rows["Audio2Lip.pt"].status == "missing"
    assert rows["predefined_exp_weights/sad.npy"].status == "damaged"
    assert rows["EDTalk_lip_pose.pt"].ok
    assert weights.main_weights(argparse.Namespace(action="list", dir=str(dest))) == 1  # --weights would load EDTalk.pt
    out = capsys.readouterr().out
    assert "EDTalk.pt is damaged" in out and "missing: not in this folder" in out
    assert "7 emotion presets" in out

    (dest / "EDTalk.pt").unlink()  # the lip_pose model is then the one used
    assert weights.main_weights(argparse.Namespace(action="list", dir=str(dest))) == 0
    assert "usable for video-driven motion only" in capsys.readouterr().out


def test_list_missing_folder(tmp_path: Path, capsys):
    rows = hub.list_weights(tmp_path / "nowhere")
    assert [r.status for r in rows] == ["missing"] * 4
    assert rows[-1].name == "predefined_exp_weights/*.npy"
    assert weights.main_weights(argparse.Namespace(action="list", dir=None)) == 1  # the default folder, empty
    out = capsys.readouterr().out
    assert str(default_weights_dir()) in out and "run `edtalk-live weights download`" in out


def test_list_finds_the_reference_layout(source: Path, capsys):
    """A checkout of the reference repository (``DIR/ckpts/...``) lists like find_weights sees it."""
    rows = _rows(source)
    assert rows["EDTalk.pt"].path == source / "ckpts" / "EDTalk.pt" and rows["EDTalk.pt"].ok
    assert len([r for r in rows.values() if r.kind == "preset" and r.ok]) == 8


# ------------------------------------------------------------------------------------------ command


def test_main_weights_download(source: Path, tmp_path: Path, capsys):
    dest = tmp_path / "weights"
    args = argparse.Namespace(action="download", dir=str(dest), source=str(source), revision=None)
    assert weights.main_weights(args) == 0
    out = capsys.readouterr().out
    assert f"into {dest}" in out and "11 files placed" in out
    _truncate(source / "ckpts" / "Audio2Lip.pt")
    assert weights.main_weights(args) == 1
    assert "1 failed the checks and was not placed" in capsys.readouterr().out
    (source / "ckpts" / "Audio2Lip.pt").unlink()  # absent from the repository: incomplete, not ok
    assert weights.main_weights(args) == 1
    assert "Audio2Lip.pt  not in the repository" in capsys.readouterr().out
    with pytest.raises(InputError, match="unknown weights action"):
        weights.main_weights(argparse.Namespace(action="fetch", dir=None))
