"""The ``vscochleaseg`` command line: segment, evaluate, phantom, demo, models.

    vscochleaseg segment scans/*_hrT2.nii.gz -o results/          # batch, continues past failures
    vscochleaseg evaluate --pred results/ --gt labels/ --json scores.json
    vscochleaseg phantom data/ --n 10 --seed 7 --modality both     # unpaired ceT1 + hrT2 sets
    vscochleaseg demo                                              # bundled sample + bundled model

Exit codes: 0 success, 1 at least one case failed (see OUTDIR/summary.json), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import VSCochleaSegError

log = logging.getLogger("vscochleaseg")

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_HRT2 = REPO_ROOT / "Resources" / "Samples" / "phantom_sample_hrT2.nii.gz"
SAMPLE_LABEL = REPO_ROOT / "Resources" / "Samples" / "phantom_sample_Label.nii.gz"
# The bundled sample is phantom case 0 of this seed; training and evaluation use other seeds.
SAMPLE_SEED = 4242


def _outputs(out_dir: Path, stem: str) -> dict:
    return {
        "labels": out_dir / f"{stem}_seg.nii.gz",
        "overlay": out_dir / f"{stem}_overlay.png",
        "json": out_dir / f"{stem}.json",  # written last: its presence marks a complete case
    }


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .io import case_stem, read_image, write_image_atomic, write_json_atomic
    from .overlay import render_overlay_png
    from .pipeline import Segmenter

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [case_stem(p) for p in args.inputs]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        print(f"error: several inputs would write the same outputs: {', '.join(duplicates)}; "
              "segment them into different output folders.", file=sys.stderr)
        return 2
    segmenter = Segmenter(args.model, device=args.device, quality=args.quality, threads=args.threads)
    summary = {"model": segmenter.spec.name, "model_version": segmenter.spec.version, "cases": []}
    failed = 0
    bar = tqdm(list(zip(args.inputs, stems)), desc="segment", unit="case", disable=args.quiet)
    for path, stem in bar:
        outputs = _outputs(out_dir, stem)
        record = {"input": str(path), "stem": stem, "outputs": {k: str(v) for k, v in outputs.items()}}
        try:
            if args.resume and all(p.exists() for p in outputs.values()):
                record["status"] = "skipped (complete)"
                summary["cases"].append(record)
                continue
            existing = [str(p) for p in outputs.values() if p.exists()]
            if existing and not args.overwrite:
                raise VSCochleaSegError(f"outputs already exist ({', '.join(existing)}); pass --overwrite to replace "
                                        "them, --resume to skip finished cases, or choose another output folder.")
            bar.set_postfix(case=stem, stage="read")
            t0 = time.perf_counter()
            image = read_image(path)
            read_s = time.perf_counter() - t0
            result = segmenter.segment_image(image, progress=lambda stage, f: bar.set_postfix(case=stem, stage=stage))
            result.timings_s = {"read": read_s, **result.timings_s}
            t1 = time.perf_counter()
            write_image_atomic(result.labels, outputs["labels"], overwrite=True)
            if not args.no_overlay:
                render_overlay_png(image, result.labels, outputs["overlay"], overwrite=True,
                                   measurements=result.measurements.to_dict())
            result.timings_s["write"] = time.perf_counter() - t1
            doc = {"input": str(path), "engine_version": __version__, "quality": segmenter.quality, **result.summary()}
            write_json_atomic(doc, outputs["json"], overwrite=True)
            record.update(status="ok", measurements=result.measurements.to_dict(), warnings=result.warnings)
            for w in result.warnings:
                log.warning("%s: %s", stem, w)
        except KeyboardInterrupt:
            raise
        except (VSCochleaSegError, OSError, RuntimeError, ValueError) as exc:
            failed += 1
            record.update(status="failed", error=str(exc), error_type=type(exc).__name__)
            print(f"error: {path}: {exc}", file=sys.stderr)
        summary["cases"].append(record)
    segmenter.release()
    summary["n_failed"] = failed
    summary["n_cases"] = len(stems)
    write_json_atomic(summary, out_dir / "summary.json", overwrite=True)
    if not args.quiet:
        ok = [c for c in summary["cases"] if c["status"] == "ok"]
        for c in ok:
            m = c["measurements"]
            side = m["vs_side"] or "no VS"
            print(f"{c['stem']}: VS {m['vs_volume_ml']:.2f} mL ({side}), max diameter {m['vs_max_diameter_mm']:.1f} mm")
        print(f"{len(stems) - failed}/{len(stems)} cases done; outputs in {out_dir}")
    return 1 if failed else 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_folders, format_table, write_json

    result = evaluate_folders(args.pred, args.gt, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def cmd_phantom(args) -> int:
    from .phantoms.generator import write_phantoms

    cases = write_phantoms(args.output, args.n, args.seed, args.modality, unpaired=not args.paired,
                           overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {len(cases)} phantom case(s) to {args.output}")
    return 0


def cmd_demo(args) -> int:
    from .metrics import score_case

    out_dir = Path(args.output)
    sample = SAMPLE_HRT2
    label = SAMPLE_LABEL
    if not sample.exists():  # e.g. an installed package without the repository's Resources/
        from .phantoms.generator import make_case, write_case

        print(f"bundled sample not found; making phantom {SAMPLE_SEED}/0 in {out_dir}")
        case = make_case(SAMPLE_SEED, 0, name="phantom_sample")
        write_case(case, out_dir, overwrite=True)
        sample, label = out_dir / "phantom_sample_hrT2.nii.gz", out_dir / "phantom_sample_Label.nii.gz"
    seg_args = argparse.Namespace(inputs=[str(sample)], output=str(out_dir), model=args.model, device=args.device,
                                  quality=args.quality, threads=args.threads, overwrite=True, resume=False,
                                  no_overlay=False, quiet=args.quiet)
    code = cmd_segment(seg_args)
    if code == 0 and label.exists():
        import SimpleITK as sitk

        scores = score_case(sitk.ReadImage(str(out_dir / "phantom_sample_hrT2_seg.nii.gz")), sitk.ReadImage(str(label)))
        print("against the sample's ground truth: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        print(f"look at {out_dir / 'phantom_sample_hrT2_overlay.png'}")
    return code


def cmd_models(args) -> int:
    from .model_folder import list_models

    for m in list_models():
        flag = " (default)" if m.get("default") else ""
        print(f"{m['name']}{flag}  version {m.get('version') or '?'}  [{m.get('source', '')}] {m.get('where', '')}")
        if m.get("description"):
            print(f"    {m['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vscochleaseg", description="Vestibular schwannoma and cochlea segmentation on hrT2 MRI.")
    ap.add_argument("--version", action="version", version=f"vscochleaseg {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def add_model_options(p):
        p.add_argument("--model", default=None, help="bundled/registered model name or model folder path (default: bundled)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where networks run (default auto)")
        p.add_argument("--quality", default="full", choices=["full", "fast"], help="full ensemble or first member only")
        p.add_argument("--threads", type=int, default=None, help="cap on CPU threads")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")

    p = sub.add_parser("segment", help="segment hrT2 scans (files or DICOM series folders)")
    p.add_argument("inputs", nargs="+", help="scans: NIfTI/NRRD/MHA files or DICOM series folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--resume", action="store_true", help="skip cases whose outputs are complete")
    p.add_argument("--no-overlay", action="store_true", help="do not write the quick-look PNG")
    add_model_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="CrossMoDA scores (Dice, ASSD) of predictions against labels")
    p.add_argument("--pred", required=True, help="folder with <id>_hrT2_seg.nii.gz")
    p.add_argument("--gt", required=True, help="folder with <id>_Label.nii.gz")
    p.add_argument("--json", help="write per-case and mean scores here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("phantom", help="write synthetic posterior-fossa phantoms in CrossMoDA layout")
    p.add_argument("output", help="output folder")
    p.add_argument("--n", type=int, default=1, help="cases per modality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", default="hrT2", choices=["ceT1", "hrT2", "both"])
    p.add_argument("--paired", action="store_true", help="with 'both': same subjects in both contrasts (default unpaired)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("demo", help="segment the bundled sample with the bundled model")
    p.add_argument("-o", "--output", default="vscochleaseg-demo", help="output folder (default ./vscochleaseg-demo)")
    add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list known models")
    p.set_defaults(func=cmd_models)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VSCochleaSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished cases are complete, no partial files were left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
