"""Speed and peak memory of ``segment`` against the same networks run naively over the whole volume.

    python Testing/benchmarks/bench_segment.py [--model NAME|DIR] [--cases 3] [--threads 2]

Cases: hrT2 phantoms of 384×384×(60–80) voxels (seed 7777, used for nothing else). Each mode runs in its
own child process so peak RSS (``ru_maxrss``) belongs to that mode alone:

- ``engine``: what ``vscochleaseg segment`` does — localiser, two ear crops, every default member, fuse,
  map back, post-process, measure (read and write included, overlay PNG excluded).
- ``naive``: the whole scan resampled to the model's spacing and each default member run by MONAI's sliding
  window (Gaussian blending, overlap 0.5) over all of it, softmax-averaged, mapped back — no localisation.

Writes ``docs/benchmark/speed.json`` and ``docs/benchmark/speed.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = 7777


def make_cases(folder: Path, n: int) -> list[Path]:
    import numpy as np

    from VSCochleaSegLib.phantoms.generator import make_case, write_case

    paths = []
    for i in range(n):
        slices = int(np.random.default_rng([SEED, i]).integers(60, 81))
        case = make_case(SEED, i, acquisition={"size_xy": 384, "n_slices": slices}, name=f"bench_{i:02d}")
        write_case(case, folder, overwrite=True)
        paths.append(folder / f"bench_{i:02d}_hrT2.nii.gz")
    return paths


def child(mode: str, model: str | None, threads: int, inputs: list[str], out_dir: str) -> dict:
    """Runs in the child process; returns timings and this process's peak RSS."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from VSCochleaSegLib.io import case_stem, read_image, write_image_atomic
    from VSCochleaSegLib.pipeline import Segmenter

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    seg = Segmenter(model, device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    per_case = []
    for path in inputs:
        t = time.perf_counter()
        image = read_image(path)
        if mode == "engine":
            labels = seg.segment_image(image).labels
        else:
            labels = naive_segment(seg, image)
        write_image_atomic(labels, Path(out_dir) / f"{case_stem(path)}_seg.nii.gz", overwrite=True)
        per_case.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"mode": mode, "model_load_s": load_s, "per_case_s": per_case, "peak_rss_mb": peak_mb,
            "members": [m.name for m in seg.members], "threads": threads}


def naive_segment(seg, image):
    """Every default member over the whole scan resampled to the model spacing (no localisation)."""
    import numpy as np
    import SimpleITK as sitk

    from VSCochleaSegLib.fusion import fuse_mean
    from VSCochleaSegLib.geometry import labels_to_image, lps_aligned_grid, resample_channels_to_reference, resample_to_grid
    from VSCochleaSegLib.inference import predict_softmax
    from VSCochleaSegLib.normalisation import fit_intensity_scale

    image = sitk.Cast(image, sitk.sitkFloat32)
    scale = fit_intensity_scale(sitk.GetArrayViewFromImage(image), seg.spec.normalisation)
    grid = lps_aligned_grid(image, seg.spec.segmentation.spacing_xyz_mm)
    volume = scale.apply(resample_to_grid(image, grid))
    probs = [predict_softmax(net, volume, m.patch_size_zyx, seg.device, seg.settings) for m, net in zip(seg.members, seg._nets)]
    fused = fuse_mean(probs, [m.weight for m in seg.members])
    sl, maps, cover = resample_channels_to_reference(fused, grid, image)
    out = np.zeros(image.GetSize()[::-1], np.uint8)
    bg = 1.0 - maps.sum(0)
    out[sl] = np.concatenate([bg[None], maps]).argmax(0)
    return labels_to_image(out, image)


def run_child(mode, model, threads, inputs, out_dir) -> dict:
    code = (
        "import json,sys; sys.path.insert(0, %r); import bench_segment as b; "
        "print('RESULT' + json.dumps(b.child(%r, %r, %d, %r, %r)))"
        % (str(Path(__file__).parent), mode, model, threads, [str(p) for p in inputs], str(out_dir))
    )
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    result["process_wall_s"] = wall
    return result


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmark"))
    args = ap.parse_args(argv)
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = make_cases(tmp / "in", args.cases)
        results = {}
        for mode in ("engine", "naive"):
            (tmp / mode).mkdir()
            results[mode] = run_child(mode, args.model, args.threads, inputs, tmp / mode)
            print(mode, json.dumps(results[mode]))
    import SimpleITK as sitk  # noqa: F401  (sizes for the record)

    sizes = []
    for i in range(args.cases):
        import numpy as np

        sizes.append([384, 384, int(np.random.default_rng([SEED, i]).integers(60, 81))])
    summary = {
        "cases": args.cases, "sizes_xyz": sizes, "threads": args.threads, "cpu": cpu_name(),
        "torch_threads": args.threads, "model": results["engine"]["members"],
        "engine_mean_s": statistics.mean(results["engine"]["per_case_s"]),
        "naive_mean_s": statistics.mean(results["naive"]["per_case_s"]),
        "engine_peak_rss_mb": results["engine"]["peak_rss_mb"],
        "naive_peak_rss_mb": results["naive"]["peak_rss_mb"],
    }
    summary["speedup"] = summary["naive_mean_s"] / summary["engine_mean_s"]
    summary["targets"] = {"engine_s_max": 30, "engine_rss_mb_max": 3072, "speedup_min": 5}
    summary["targets_met"] = (summary["engine_mean_s"] <= 30 and summary["engine_peak_rss_mb"] <= 3072
                              and summary["speedup"] >= 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    md = [
        "# Segmentation speed and memory (CPU)",
        "",
        f"Measured by `python Testing/benchmarks/bench_segment.py` on {summary['cpu']}, {args.threads} threads, "
        f"{args.cases} hrT2 phantoms of 384×384×(60–80) voxels, members {', '.join(summary['model'])}.",
        "",
        "| mode | mean per case (s) | per case (s) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for mode in ("engine", "naive"):
        r = results[mode]
        md.append(f"| {mode} | {statistics.mean(r['per_case_s']):.1f} | "
                  f"{', '.join(f'{v:.1f}' for v in r['per_case_s'])} | {r['peak_rss_mb']:.0f} |")
    md += ["", f"Speed-up of the engine over the naive whole-volume run: **{summary['speedup']:.1f}×**. "
               f"Targets (≤ 30 s, ≤ 3 GB, ≥ 5×) met: **{summary['targets_met']}**.", ""]
    (out / "speed.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
