"""Recreate the bundled sample ``Resources/Samples/phantom_sample_*`` (phantom seed 4242, index 1).

The sample is cropped in-plane to 240×240 around the inner ears (a typical small CISS field of view) and
stored as int16 so the repository stays light. Seed 4242 is used neither for training nor for evaluation.

    python -m training.make_sample [--out Resources/Samples]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from VSCochleaSegLib.io import write_image_atomic, write_json_atomic
from VSCochleaSegLib.phantoms import make_case

SEED, INDEX, SIZE_XY = 4242, 1, 240


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="Resources/Samples")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    c = make_case(SEED, INDEX, modalities=("hrT2",), stream="hrT2", name="phantom_sample")
    img = c.images["hrT2"]
    mid = np.mean([c.info["cochlea_centres_lps"][s] for s in ("left", "right")], axis=0)
    idx = np.array(img.TransformPhysicalPointToIndex(mid.tolist()))
    lo = [int(np.clip(idx[0] - SIZE_XY // 2, 0, img.GetSize()[0] - SIZE_XY)),
          int(np.clip(idx[1] - SIZE_XY // 2 + 10, 0, img.GetSize()[1] - SIZE_XY)), 0]
    size = [SIZE_XY, SIZE_XY, img.GetSize()[2]]
    img, lab = sitk.RegionOfInterest(img, size, lo), sitk.RegionOfInterest(c.labels, size, lo)
    arr = sitk.GetArrayFromImage(img)
    scaled = np.clip(np.round(arr * (1000.0 / np.percentile(arr, 99.9))), 0, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(img)
    folder = Path(args.out)
    write_image_atomic(out, folder / "phantom_sample_hrT2.nii.gz", overwrite=args.overwrite)
    write_image_atomic(lab, folder / "phantom_sample_Label.nii.gz", overwrite=args.overwrite)
    info = dict(c.info, note=f"phantom seed {SEED} index {INDEX} (hrT2 stream), cropped in-plane to {SIZE_XY}x{SIZE_XY} "
                              "around the inner ears, rescaled to int16; never used in training or evaluation")
    write_json_atomic(info, folder / "phantom_sample_info.json", overwrite=args.overwrite)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
