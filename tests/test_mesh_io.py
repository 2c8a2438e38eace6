"""Mesh export: write OBJ / PLY, read back with trimesh, compare vertices, faces and colours."""
from pathlib import Path

import numpy as np
import pytest
import trimesh

from pipeline.render.mesh_io import write_obj, write_ply

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SFM_MODEL = SHARED / "face_models" / "sfm" / "sfm_shape_3448.bin"


@pytest.fixture(scope="module")
def sfm_mean_mesh():
    """The Surrey Face Model mean: verts (3448, 3) mm, tris (6736, 3), colours from the normalised position."""
    eos = pytest.importorskip("eos")
    shape = eos.morphablemodel.load_model(str(SFM_MODEL)).get_shape_model()
    verts = np.asarray(shape.get_mean(), dtype=np.float64).reshape(-1, 3)
    tris = np.asarray(shape.get_triangle_list(), dtype=np.int64)
    colors = (verts - verts.min(0)) / np.ptp(verts, axis=0)
    return verts, tris, colors


def _read(path: Path) -> trimesh.Trimesh:
    mesh = trimesh.load(path, process=False)
    assert isinstance(mesh, trimesh.Trimesh)
    return mesh


@pytest.mark.parametrize("writer, suffix", [(write_obj, ".obj"), (write_ply, ".ply")])
def test_real_mesh_round_trips_through_trimesh(tmp_path, sfm_mean_mesh, writer, suffix):
    verts, tris, colors = sfm_mean_mesh
    path = writer(tmp_path / f"mean{suffix}", verts, tris, colors)
    mesh = _read(path)
    np.testing.assert_allclose(mesh.vertices, verts, rtol=0, atol=1e-4)  # mm; PLY stores float32
    np.testing.assert_array_equal(mesh.faces, tris)
    expected_rgb = np.round(colors * 255)
    np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3], expected_rgb, atol=1)


@pytest.mark.parametrize("writer, suffix", [(write_obj, ".obj"), (write_ply, ".ply")])
def test_without_colours_and_from_tensors(tmp_path, writer, suffix):
    torch = pytest.importorskip("torch")
    verts = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 2.25, -1.0], [1.0, 1.0, 1.0]])
    tris = torch.tensor([[0, 1, 2], [1, 3, 2]])
    mesh = _read(writer(tmp_path / f"t{suffix}", verts, tris))
    np.testing.assert_allclose(mesh.vertices, verts.numpy(), atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, tris.numpy())


def test_obj_lines_and_colour_clipping(tmp_path):
    verts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    colors = np.array([[1.7, 0.5, -0.2], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    lines = write_obj(tmp_path / "c.obj", verts, [[0, 1, 2]], colors).read_text().splitlines()
    assert lines[0].split() == ["v", "0", "0", "0", "1", "0.5", "0"]
    assert lines[-1] == "f 1 2 3"  # OBJ indices are 1-based


def test_overwrite_is_atomic_and_bad_input_leaves_target_untouched(tmp_path):
    target = tmp_path / "m.obj"
    verts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    write_obj(target, verts, [[0, 1, 2]])
    before = target.read_bytes()
    with pytest.raises(ValueError, match="tris"):
        write_obj(target, verts, [[0, 1, 3]])
    with pytest.raises(ValueError, match="non-finite"):
        write_ply(tmp_path / "m.ply", verts * np.nan, [[0, 1, 2]])
    with pytest.raises(ValueError, match="colors"):
        write_obj(target, verts, [[0, 1, 2]], colors=np.zeros((2, 3)))
    assert target.read_bytes() == before
    write_obj(target, verts * 2, [[0, 2, 1]])
    np.testing.assert_array_equal(_read(target).faces, [[0, 2, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.obj"]  # no temporary files left behind
