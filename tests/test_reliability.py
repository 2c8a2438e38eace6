"""Regression tests for issue 14 (reliability and DVC usability): each reproduces a defect an adversarial run
found, through the stage scripts where that is where it showed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT, repo_params
from pipeline.reconstruct.parts import read_reconstructions


def write_params(workdir: Path, **overrides: dict) -> Path:
    """The repository's params.yaml with `overrides` ({section: {key: value}}) at workdir/params.yaml."""
    params = repo_params()
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def face_model_npz(tmp_path_factory, sfm) -> Path:
    from pipeline.face_model.format import save_face_model

    path = tmp_path_factory.mktemp("model") / "face_model.npz"
    save_face_model(sfm, path)
    return path


def quick_reconstruct_params(workdir: Path, model: Path, **reconstruct) -> Path:
    """params for a fast CLI reconstruction: a few fit steps, no network, files on."""
    section = {"face_model": str(model), "checkpoint": str(workdir / "no_rnet.pt"), "method": "fit",
               "landmark_steps": 2, "full_steps": 2, "refine_steps": 0, "batch_size": 4}
    section.update(reconstruct)
    return write_params(workdir, reconstruct=section, workers=1)


def run_reconstruct(argv: list[str]) -> dict:
    from stages import reconstruct

    reconstruct.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


# -- items 1 and 2: bounded, unique output names; one face's failure never loses the others ---------------------

def test_long_and_colliding_names_each_get_their_own_bounded_files(tmp_path, faces_dir, face_model_npz):
    photos = tmp_path / "photos"
    nested = photos / ("d" * 120) / ("e" * 120)
    nested.mkdir(parents=True)
    names = [photos / ("x" * 236 + ".jpg"), nested / "face.jpg", photos / "a b.jpg", photos / "a_b.jpg",
             photos / "é.jpg", photos / "ü.jpg"]
    for path in names:
        shutil.copy(faces_dir / "000002.jpg", path)
    params = quick_reconstruct_params(tmp_path, face_model_npz, write_overlays=False)
    out = tmp_path / "out"
    summary = run_reconstruct(["--images", str(photos), "--out", str(out), "--params", str(params)])
    table = read_reconstructions(out)
    assert summary["faces"] == len(table) == len(names) and summary["rejected"] == 0
    stems = list(table["files_stem"])
    assert len(set(stems)) == len(names)  # no two faces share (and overwrite) files
    assert all(len(s.encode()) <= 80 and not s.startswith(".") for s in stems)
    files = sorted(p.name for p in (out / "faces").iterdir())
    assert files == sorted(f"{s}{suffix}" for s in stems for suffix in (".obj", "_crop.png"))


def test_file_stems_are_bounded_unique_and_readable():
    from pipeline.reconstruct.outputs import file_stem

    assert file_stem("photos/a b.jpg#0").startswith("photos_a_b.jpg_0-")
    assert file_stem("../shared/x.png#1").startswith("shared_x.png_1-")
    assert file_stem("/abs/dir/y.jpg#2").startswith("abs_dir_y.jpg_2-")
    pairs = [("a b.jpg#0", "a_b.jpg#0"), ("é.jpg#0", "ü.jpg#0"), ("p.jpg#0", "p.jpg#1"),
             ("x" * 240 + "1.jpg#0", "x" * 240 + "2.jpg#0"),
             ("/" + "d" * 120 + "/f.jpg#0", "/" + "e" * 120 + "/f.jpg#0")]
    for a, b in pairs:
        assert file_stem(a) != file_stem(b), (a, b)
    long = file_stem("d" * 120 + "/" + "x" * 240 + ".jpg#0")
    assert len(long) <= 80 and long.split("-")[0].endswith(".jpg_0")
    assert file_stem("é.jpg#0").startswith("jpg_0-")
    assert file_stem("日本.jpg#0") != file_stem("中国.jpg#0")
    assert file_stem("....#0") != "" and not file_stem("....#0").startswith(".")


def test_a_face_whose_files_fail_is_rejected_and_the_others_are_kept(tmp_path, faces_dir, face_model_npz,
                                                                     monkeypatch):
    import pipeline.reconstruct.outputs as outputs

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("good.jpg", "bad.jpg"):
        shutil.copy(faces_dir / "000002.jpg", photos / name)
    real = outputs.write_obj

    def failing_write_obj(path, *args, **kwargs):
        if "bad" in Path(path).name:
            raise OSError(36, "File name too long", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_obj", failing_write_obj)
    params = quick_reconstruct_params(tmp_path, face_model_npz, write_overlays=False)
    out = tmp_path / "out"
    summary = run_reconstruct(["--images", str(photos), "--out", str(out), "--params", str(params)])
    table = read_reconstructions(out)
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert list(table["id"]) == ["good.jpg#0"]
    assert list(rejects["id"]) == ["bad.jpg#0"] and list(rejects["reason"]) == ["output not written"]
    assert "File name too long" in rejects["detail"].iloc[0] and rejects["stage"].iloc[0] == "reconstruct"
    assert summary["faces"] == 1 and summary["rejected"] == 1
    assert all("bad" not in p.name for p in (out / "faces").iterdir())  # no half set of files


# -- item 8: every entry that looks like a photo ends in the outputs or the rejects -------------------------------

def make_bad_entries(photos: Path, faces_dir: Path, monkeypatch) -> dict[str, str]:
    """One real photo and every kind of entry named like a photo that is not one: {name: expected reason}."""
    import os

    photos.mkdir(parents=True, exist_ok=True)
    shutil.copy(faces_dir / "000002.jpg", photos / "real.jpg")
    (photos / "folder.jpg").mkdir()
    (photos / "dangling.jpg").symlink_to(photos / "gone.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    locked = photos / "locked.jpg"
    shutil.copy(faces_dir / "000006.jpg", locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make this one refuse as it would for a user
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    return {"folder.jpg": "not a file", "dangling.jpg": "unreadable file", "loop.jpg": "unreadable file",
            "locked.jpg": "unreadable file"}


def test_screen_photos_accounts_for_every_photo_named_entry(tmp_path, faces_dir, monkeypatch):
    from pipeline.detect.photo_io import PHOTO_EXTENSIONS
    from pipeline.shards import screen_photos

    expected = make_bad_entries(tmp_path / "p", faces_dir, monkeypatch)
    (tmp_path / "p" / "notes.txt").write_text("not named like a photo")
    photos, rejects = screen_photos(tmp_path / "p", PHOTO_EXTENSIONS)
    assert [p.name for p in photos] == ["real.jpg"]
    assert {Path(r["path"]).name: r["reason"] for r in rejects} == expected
    assert "broken symlink" in next(r["detail"] for r in rejects if r["path"].endswith("dangling.jpg"))


def test_crop_stage_rejects_folders_symlinks_and_unreadable_files(tmp_path, faces_dir, monkeypatch):
    from stages import crop

    photos = tmp_path / "photos"
    expected = make_bad_entries(photos, faces_dir, monkeypatch)
    params = write_params(tmp_path, data={"images": str(photos)}, workers=1)
    monkeypatch.chdir(tmp_path)
    crop.main(["--params", str(params)])
    report = json.loads(Path("reports/crop.json").read_text())
    crops = pd.read_parquet("data/interim/crops.parquet")
    rejects = pd.read_parquet("data/interim/crop_rejects.parquet")
    assert [Path(s).name for s in crops["source"]] == ["real.jpg"]
    assert dict(zip((Path(p).name for p in rejects["path"]), rejects["reason"])) == expected
    assert report["inputs"] == 1 + len(expected) and report["rejected"] == len(expected)


def test_folder_reconstruction_rejects_what_it_cannot_read(tmp_path, faces_dir, face_model_npz, monkeypatch):
    photos = tmp_path / "photos"
    expected = make_bad_entries(photos, faces_dir, monkeypatch)
    params = quick_reconstruct_params(tmp_path, face_model_npz, write_overlays=False, write_meshes=False,
                                      write_crops=False)
    out = tmp_path / "out"
    summary = run_reconstruct(["--images", str(photos), "--out", str(out), "--params", str(params)])
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert dict(zip((Path(p).name for p in rejects["path"]), rejects["reason"])) == expected
    assert summary["faces"] == 1 and summary["rejected"] == len(expected)


# -- item 4: a reused output folder never mixes two runs -------------------------------------------------------

def test_reusing_an_output_folder_clears_the_earlier_runs_results(tmp_path, faces_dir, face_model_npz):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(faces_dir / "000002.jpg", photos / "now.jpg")
    out = tmp_path / "out"
    (out / "faces").mkdir(parents=True)
    (out / "coefficients").mkdir()
    stale = [out / "rejects.parquet", out / "coefficients.rank1.parquet", out / "coefficients" / "part-old.parquet",
             out / "faces" / "before-0123456789.obj",
             out / "faces" / "before-0123456789_crop.png", out / "faces" / "before-0123456789_overlay.png",
             out / "faces" / ".before-0123456789.obj.abc.tmp"]
    pd.DataFrame({"path": ["old.jpg"], "stage": ["crop"], "reason": ["no face"], "detail": [""],
                  "id": [None]}).to_parquet(stale[0])
    for path in stale[1:]:
        path.write_bytes(b"from an earlier run")
    mine = [out / "notes.txt", out / "faces" / "keep.txt"]
    for path in mine:
        path.write_text("the user's")
    params = quick_reconstruct_params(tmp_path, face_model_npz, write_overlays=False)
    summary = run_reconstruct(["--images", str(photos), "--out", str(out), "--params", str(params)])
    assert summary["rejected"] == 0 and not any(p.exists() for p in stale)
    assert all(p.read_text() == "the user's" for p in mine)
    stem = read_reconstructions(out)["files_stem"].iloc[0]
    assert sorted(p.name for p in (out / "faces").iterdir()) == sorted(["keep.txt", f"{stem}.obj",
                                                                        f"{stem}_crop.png"])


# -- items 5, 6, 7: parameters are read from the file named and checked before any work --------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Fails a test if a stage starts preprocessing or reconstructing."""
    import pipeline.detect
    import pipeline.reconstruct.stream

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the parameters were checked")

    monkeypatch.setattr(pipeline.detect, "preprocess_photos", forbidden)
    monkeypatch.setattr(pipeline.reconstruct.stream, "reconstruct_stream", forbidden)
    monkeypatch.setattr("stages.reconstruct.reconstruct_stream", forbidden)


def test_a_missing_params_file_is_an_error_not_the_defaults(tmp_path, faces_dir, no_work):
    from stages import crop, pack, reconstruct

    missing = tmp_path / "typo.yaml"
    with pytest.raises(SystemExit, match="no such file: .*typo.yaml"):
        reconstruct.main([str(faces_dir / "000002.jpg"), "--out", str(tmp_path / "out"), "--params", str(missing)])
    for stage in (crop, pack):
        with pytest.raises(SystemExit, match="no such file: .*typo.yaml"):
            stage.main(["--params", str(missing)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"full_steps": -5}, "reconstruct.full_steps must be an int >= 0, got -5"),
    ({"full_steps": "fifty"}, "reconstruct.full_steps must be an int >= 0, got 'fifty'"),
    ({"batch_size": 0}, "reconstruct.batch_size must be an int >= 1, got 0"),
    ({"lr": "5e-2"}, "reconstruct.lr must be a number > 0, got '5e-2'"),
    ({"write_meshes": "yes"}, "reconstruct.write_meshes must be true or false, got 'yes'"),
    ({"loss_weights": {"photometric": -1.0}}, "reconstruct.loss_weights.photometric must be a number >= 0"),
    ({"jaw_weight": -0.1}, "reconstruct.jaw_weight must be a number >= 0, got -0.1"),
    ({"method": "fitt"}, "reconstruct.method must be one of fit, network, network[+]fit, got 'fitt'"),
])
def test_reconstruct_parameters_are_checked_before_any_work(tmp_path, faces_dir, face_model_npz, no_work,
                                                            overrides, message):
    params = quick_reconstruct_params(tmp_path, face_model_npz, **overrides)
    with pytest.raises(SystemExit, match=message):
        run_reconstruct(["--images", str(faces_dir), "--out", str(tmp_path / "out"), "--params", str(params)])


def test_an_unknown_method_is_refused_even_without_a_checkpoint(tmp_path, faces_dir, face_model_npz, no_work):
    params = quick_reconstruct_params(tmp_path, face_model_npz, method="netwrok")
    assert not (tmp_path / "no_rnet.pt").exists()  # before: this fell back to method fit
    with pytest.raises(SystemExit, match="reconstruct.method must be one of"):
        run_reconstruct([str(faces_dir / "000002.jpg"), "--out", str(tmp_path / "out"), "--params", str(params)])


@pytest.mark.parametrize("stage,section,key,value,message", [
    ("crop", "crop", "jpeg_quality", 0, "crop.jpeg_quality must be an int >= 1 and <= 100, got 0"),
    ("crop", "crop", "upsample", 1.5, "crop.upsample must be an int >= 0, got 1.5"),
    ("crop", None, "workers", -1, "workers must be an int >= 0, got -1"),
    ("crop", "crop", "detectors", ["nope"], "crop.detectors must be a non-empty list of"),  # CropSettings' check
    ("masks", "masks", "bisenet_weights", "/no/such.pth", "masks.bisenet_weights: no such file"),
    ("landmarks", "landmarks", "max_template_px", "x", "landmarks.max_template_px must be a number > 0"),
    ("masks", "masks", "min_coverage", 1.0, "masks.min_coverage must be a number >= 0 and < 1, got 1.0"),
    ("pack", "pack", "val_ratio", 2, "pack.val_ratio must be a number >= 0 and <= 1, got 2"),
    ("train", "train", "epochs", 0, "train.epochs must be an int >= 1, got 0"),
    ("train", "train", "resume", "no", "train.resume must be true or false, got 'no'"),
    ("albedo", "albedo", "full_steps", -1, "albedo.full_steps must be an int >= 0, got -1"),
    ("albedo", "albedo", "prior_weight", -0.5, "albedo.prior_weight must be a number >= 0, got -0.5"),
    ("synth", "synth", "count", "many", "synth.count must be an int >= 1, got 'many'"),
    ("report", "report", "max_faces", None, "report.max_faces must be an int >= 0, got None"),
])
def test_every_stage_checks_its_parameters_first(tmp_path, monkeypatch, stage, section, key, value, message):
    import importlib
    import sys

    params = write_params(tmp_path, **({section: {key: value}} if section else {key: value}))
    monkeypatch.setattr(sys, "argv", [stage, "--params", str(params)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        importlib.import_module(f"stages.{stage}").main()
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_the_repositorys_parameters_pass_and_unknown_keys_are_allowed():
    from stages import param_errors

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert param_errors(params, *params) == []
    params["landmarks"]["source"] = "fused"  # settings the checks do not list yet are not refused
    params["reconstruct"]["loss_weights"]["new_term"] = 0.5
    assert param_errors(params, *params) == []
    del params["reconstruct"]["full_steps"]
    assert param_errors(params, "reconstruct") == ["reconstruct.full_steps is missing"]


# -- item 3: compiled caches are no part of the DVC dependencies ------------------------------------------------

DEP_HASHES = """
import json
from dvc.repo import Repo
hashes = {}
for stage in Repo(".").index.stages:
    for dep in stage.deps:
        if dep.def_path.startswith(("pipeline", "stages")) and dep.def_path not in hashes:
            hashes[dep.def_path] = dep.get_hash().value
print(json.dumps(hashes))
"""

IMPORT_ALL = """
import importlib, pathlib, sys
for path in sorted(pathlib.Path("pipeline").rglob("*.py")) + sorted(pathlib.Path("stages").glob("*.py")):
    importlib.import_module(".".join(path.with_suffix("").parts).removesuffix(".__init__"))
assert pathlib.Path(sys.modules["pipeline"].__file__).resolve().parent == pathlib.Path("pipeline").resolve()
"""


@pytest.mark.slow
def test_a_fresh_clones_dependencies_do_not_change_when_caches_are_written(tmp_path):
    """`dvc status` stays as it was after importing every module (bytecode) and a numba kernel cache write: the
    dependency directories hash only their tracked files."""
    import subprocess
    import sys

    (tmp_path / "shared").symlink_to(REPO_ROOT.parent / "shared")
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    shutil.copy(REPO_ROOT / ".dvcignore", clone / ".dvcignore")  # the working tree's, committed or not

    def dep_hashes() -> dict:
        done = subprocess.run([sys.executable, "-c", DEP_HASHES], cwd=clone, capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout)

    before = dep_hashes()
    subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=clone, check=True, capture_output=True,
                   env={**__import__("os").environ, "PYTHONDONTWRITEBYTECODE": ""})
    assert list((clone / "pipeline" / "render" / "__pycache__").glob("*.pyc"))  # bytecode was written
    # what numba's cache=True writes on a kernel's first compile, beside the bytecode
    (clone / "pipeline" / "render" / "__pycache__" / "raster_cpu._zbuffer_items-99.py311.nbi").write_bytes(b"i")
    (clone / "pipeline" / "render" / "__pycache__" / "raster_cpu._zbuffer_items-99.py311.1.nbc").write_bytes(b"c")
    after = dep_hashes()
    assert after == before


# -- item 11: a killed writer's temporary file does not survive the rerun ----------------------------------------

def test_a_rerun_removes_the_temporary_file_of_a_killed_writer(tmp_path):
    import signal
    import subprocess
    import sys

    from pipeline.shards import REJECTS_SCHEMA, write_table

    target = tmp_path / "crop_rejects.parquet"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pipeline.shards import REJECTS_SCHEMA, TableWriter\n"
        f"w = TableWriter({str(target)!r}, REJECTS_SCHEMA, row_group_rows=1)\n"
        "w.write_rows([{'path': 'a.jpg', 'stage': 'crop', 'reason': 'no face', 'detail': '', 'id': None}])\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n")], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "written"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    litter = tmp_path / f"crop_rejects.parquet.tmp-{killed.pid}"
    assert litter.exists() and not target.exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f"crop_rejects.parquet.tmp-{alive.pid}"  # a writer still at work keeps its file
        busy.write_bytes(b"in progress")
        other = tmp_path / "other.parquet.tmp-1"  # another output's: not this writer's business
        other.write_bytes(b"x")
        write_table([], target, REJECTS_SCHEMA)
        assert target.exists() and not litter.exists() and busy.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()


# -- items 10, 12, 15: training resumes its curves without repeats, survives a corrupt checkpoint, shows progress

def test_resumed_training_logs_each_step_once(tmp_path):
    from stages.train import open_live

    live_dir = tmp_path / "train"
    live = open_live(live_dir, 0)  # the first run: steps 0..171, then killed (no live.end())
    for step in range(0, 172):
        live.step = step
        live.log_metric("train/loss", float(step))
        if step % 25 == 0:
            live.log_metric("val/landmark_px", float(step))
    live = open_live(live_dir, 151)  # the rerun resumes from the checkpoint at step 150
    for step in range(151, 301):
        live.step = step
        live.log_metric("train/loss", float(step))
        if step % 25 == 0:
            live.log_metric("val/landmark_px", float(step))
    live.end()
    loss = pd.read_csv(live_dir / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    val = pd.read_csv(live_dir / "plots" / "metrics" / "val" / "landmark_px.tsv", sep="\t")
    assert list(loss["step"]) == list(range(0, 301)) and list(loss["loss"]) == list(range(0, 301))
    assert list(val["step"]) == list(range(0, 301, 25))


def test_a_corrupt_resumable_checkpoint_restarts_training_and_names_the_file(tmp_path, capsys):
    from test_train import run_tiny, tiny_config, tiny_faces

    (tmp_path / "run").mkdir()
    last = tmp_path / "run" / "rnet_last.pt"
    last.write_bytes(b"PK\x03\x04 truncated by a full disk")
    result = run_tiny(tiny_config(epochs=1), tmp_path / "run", tiny_faces(8), [])
    out = capsys.readouterr()
    assert result.metrics["resumed_from_step"] == 0 and result.metrics["steps"] == 2
    assert f"{last} cannot be resumed from" in out.out and "training from scratch" in out.out
    assert "train.resume: false" in out.out
    from pipeline.train.checkpoint import load_checkpoint
    assert load_checkpoint(last)["step"] == 2  # replaced by a good one


def test_training_shows_a_progress_bar_with_loss_and_speed(tmp_path, capsys):
    from test_train import run_tiny, tiny_config, tiny_faces

    run_tiny(tiny_config(epochs=1), tmp_path / "run", tiny_faces(8), [])
    err = capsys.readouterr().err
    assert "train: 100%" in err and "2/2" in err and "loss=" in err and "img_s=" in err


# -- item 9: the same photo under two names cannot land in both train and val -----------------------------------

def test_duplicate_photos_are_packed_once_and_recorded(tmp_path, faces_dir, monkeypatch):
    from pipeline.shards import read_faces, split_of
    from stages import crop, landmarks, masks, pack

    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert len({split_of(f"{n}#0", 0.5) for n in names}) == 2  # by name these copies would go to both splits
    for name in names:
        shutil.copy(faces_dir / "000002.jpg", photos / name)
    shutil.copy(faces_dir / "000033.jpg", photos / "other.jpg")
    params = write_params(tmp_path, data={"images": str(photos)}, pack={"val_ratio": 0.5}, workers=1)
    monkeypatch.chdir(tmp_path)
    for stage in (crop, landmarks, masks, pack):
        stage.main(["--params", str(params)])
    faces = read_faces(sorted(Path("data/shards").glob("*.parquet")))
    rejects = pd.read_parquet("reports/rejects.parquet")
    assert sorted(faces["id"]) == ["a.jpg#0", "other.jpg#0"]
    assert sorted(rejects["id"]) == [f"{n}#0" for n in names[1:]]
    assert set(rejects["reason"]) == {"duplicate face"} and set(rejects["stage"]) == {"pack"}
    assert all(d == "identical crop to a.jpg#0" for d in rejects["detail"])
    report = json.loads(Path("reports/pack.json").read_text())
    assert report["outputs"] == 2 and report["photos_kept"] == 2 and report["photos_rejected"] == 5


# -- item 13: printed rejects cannot be spoofed; meshes get the umask's permissions as the images do --------------

def test_reject_lines_quote_names_and_meshes_follow_the_umask(tmp_path, faces_dir, face_model_npz, capsys):
    import os

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(faces_dir / "000002.jpg", photos / "real.jpg")
    evil = "x.jpg\nreal.jpg: no face (spoofed).jpg"
    (photos / evil).write_text("not a photo")
    (photos / "esc\x1b[2K.jpg").write_text("not a photo")
    params = quick_reconstruct_params(tmp_path, face_model_npz, write_overlays=False)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        run_reconstruct(["--images", str(photos), "--out", str(out), "--params", str(params)])
    finally:
        os.umask(old)
    err = [line for line in capsys.readouterr().err.splitlines() if "not an image" in line or "spoofed" in line]
    assert len(err) == 2 and all("not an image" in line for line in err)
    assert any(repr(str(photos / evil)) in line for line in err) and not any("\x1b" in line for line in err)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in (out / "faces").iterdir()}
    assert modes == {".obj": 0o644, ".png": 0o644}


# -- item 14: headline metrics only; training curves as a PNG that the report embeds ------------------------------

HEADLINE_METRICS = {"reports/metrics.json", "reports/bench.json", "reports/train.json"}
STAGE_COUNTS = {f"reports/{s}.json" for s in ("crop", "landmarks", "masks", "pack", "albedo", "reconstruct")}


def test_dvc_metrics_are_the_headline_numbers_and_stage_counts_plain_outputs():
    import subprocess
    import sys

    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    metrics = {next(iter(m)) if isinstance(m, dict) else m for s in spec.values() for m in s.get("metrics", [])}
    assert metrics == HEADLINE_METRICS
    outs = {next(iter(o)): o[next(iter(o))] for s in spec.values() for o in s.get("outs", []) if isinstance(o, dict)}
    assert all(outs[path] == {"cache": False} for path in STAGE_COUNTS)
    dvc = Path(sys.executable).with_name("dvc")
    shown = subprocess.run([str(dvc), "metrics", "show", "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True)
    files = {f for rev in json.loads(shown.stdout).values() for f in rev.get("data", {})}
    assert files <= HEADLINE_METRICS and not files & STAGE_COUNTS
    train_plots = {next(iter(p)) if isinstance(p, dict) else p for p in spec["train"]["plots"]}
    assert "reports/train_curves.png" in train_plots and "reports/train_curves.png" in spec["report"]["deps"]


def test_training_curves_png_is_drawn_and_embedded_in_the_report(tmp_path):
    import base64

    from pipeline.reconstruct.report import report_html
    from pipeline.train.curves import plot_training_curves
    from stages.train import open_live

    live = open_live(tmp_path / "train", 0)
    for step in range(0, 40):
        live.step = step
        live.log_metric("train/loss", 2.0 / (step + 1))
        live.log_metric("train/coefficient", 0.0)  # a zero term on a log axis must not break the plot
        live.log_metric("lr", 1e-3)
        if step % 10 == 0:
            live.log_metric("val/landmark_px", 10.0 - step / 10)
    live.end()
    png = plot_training_curves(tmp_path / "train", tmp_path / "curves.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import cv2
    import numpy as np
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (650, 1000) and image.std() > 10  # drawn, not blank
    assert plot_training_curves(tmp_path / "nothing", tmp_path / "none.png") is None
    page = report_html("t", "s", {}, [], 96, 80, {"training curves": data})
    assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page
    assert "http://" not in page and "https://" not in page and "Training curves" in page


FIT_DIGEST = """
import hashlib, os, sys
sys.path.insert(0, {tests!r})
from conftest import ALBEDO, AUX_DIR, SFM_DIR
from pipeline.face_model import FaceDecoder
from pipeline.face_model.sfm import convert_sfm
from pipeline.reconstruct.fit import fit_to_landmarks
import torch
decoder = FaceDecoder(convert_sfm(SFM_DIR, AUX_DIR, ALBEDO))
start = decoder.layout.zeros(8, torch.device("cpu"))
with torch.no_grad():
    noise = torch.randn(8, 68, 2, generator=torch.Generator().manual_seed(0)) * 3
    target = decoder.landmark_px(decoder.layout.split(start)) + noise
coeffs = fit_to_landmarks(decoder, start, target, torch.ones(68), 100, 5.0e-2, landmark_weight=1.6e-3,
                          coefficient_weight=1.0e-2)
print(os.environ["MKL_CBWR"], os.environ["OMP_WAIT_POLICY"], hashlib.sha1(coeffs.numpy().tobytes()).hexdigest())
"""


def test_the_library_fits_on_the_stages_numeric_path_without_them():
    """Importing the library fixes MKL's code path as the stages run it (pipeline/__init__.py), so a fit from the
    library alone (a single test, a script) equals the same fit in a stage, bit for bit. Before, only `stages` set
    it: on this project's 2-core AVX2 machines a 100-step landmark fit of 8 faces then ended with other bits, and
    the annotated photos' inner NME of one fit moved by up to 0.36 points between a single test and the suite."""
    import os
    import subprocess
    import sys
    script = FIT_DIGEST.format(tests=str(REPO_ROOT / "tests"))
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_WAIT_POLICY")}
    runs = {name: subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env={**env, **extra},
                                 capture_output=True, text=True, check=True).stdout.split()
            for name, extra in [("library alone", {}), ("as the stages set it", {"MKL_CBWR": "AUTO,STRICT"})]}
    assert runs["library alone"][:2] == ["AUTO,STRICT", "PASSIVE"], runs
    assert runs["library alone"] == runs["as the stages set it"], runs
