"""Stage `face_model`: convert the chosen morphable model (params face_model.source) to models/face_model.npz, with
the MediaPipe 468-point correspondence registered from face_model.mediapipe_obj."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.face_model import save_face_model
from pipeline.face_model.bfm import convert_bfm
from pipeline.face_model.ict import convert_ict
from pipeline.face_model.mediapipe_mesh import with_mesh468
from pipeline.face_model.sfm import convert_sfm
from stages import read_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/face_model.npz")
    ap.add_argument("--source", help="override face_model.source (the face_model_ict stage passes ict)")
    args = ap.parse_args()
    p = read_params(args.params, "face_model")["face_model"]
    if args.source:
        p = {**p, "source": args.source}
    if p["source"] == "sfm":
        model = convert_sfm(p["sfm_dir"], p["bfm_aux_dir"], tuple(p["sfm_albedo_rgb"]), p["landmarks"])
    elif p["source"] == "bfm":
        if not p["bfm_mat"] or not p["bfm_exp_bin"]:
            raise SystemExit("face_model.source=bfm needs face_model.bfm_mat (01_MorphableModel.mat) and "
                             "face_model.bfm_exp_bin (Exp_Pca.bin): set them to your licensed copies")
        model = convert_bfm(p["bfm_mat"], p["bfm_exp_bin"], p["bfm_aux_dir"])
    elif p["source"] == "ict":
        model = convert_ict(p["ict_source"], tuple(p["sfm_albedo_rgb"]), p["ict_area"], p["landmarks"])
    else:
        raise SystemExit(f"face_model.source must be 'sfm', 'bfm' or 'ict', got {p['source']!r}")
    model = with_mesh468(model, p["mediapipe_obj"])
    save_face_model(model, args.out)
    print(f"{model.name}: {model.n_verts} vertices, {len(model.triangles)} triangles, "
          f"K_id={model.k_id} K_exp={model.k_exp} K_alb={model.k_alb}, "
          f"{int((model.mesh468_weight > 0).sum())}/468 MediaPipe points weighted -> {args.out}")


if __name__ == "__main__":
    main()
