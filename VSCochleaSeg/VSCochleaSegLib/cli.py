"""The ``vscochleaseg`` command line: segment, evaluate, phantom, demo, models.

    vscochleaseg segment scans/*_hrT2.nii.gz -o results/          # batch, continues past failures
    vscochleaseg evaluate --pred results/ --gt labels/ --json scores.json
    vscochleaseg phantom data/ --n 10 --seed 7 --modality both     # unpaired ceT1 + hrT2 sets
    vscochleaseg demo                                              # bundled sample + bundled model

Exit codes: 0 success, 1 at least one case failed (see OUTDIR/summary.json), 2 bad usage, model or input,
130 interrupted (Ctrl-C), 128 + n stopped by signal n (143: SIGTERM). An interrupted run leaves finished
cases complete and no partial file under an output's name; re-run with --resume to finish the batch.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
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

    from .checks import ScanChecks
    from .io import case_stem, stale_temporaries, write_json_atomic
    from .pipeline import Segmenter

    out_dir = Path(args.output)
    stems = [case_stem(p) for p in args.inputs]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        print(f"error: several inputs would write the same outputs: {', '.join(duplicates)}; "
              "segment them into different output folders.", file=sys.stderr)
        return 2
    limit = None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9)
    # The model first: a damaged or unknown model stops here, before anything is written.
    segmenter = Segmenter(args.model, device=args.device, quality=args.quality, threads=args.threads,
                          checks=ScanChecks(memory_limit_bytes=limit))
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in stale_temporaries(out_dir / "summary.json"):  # a killed run's; this run rewrites the summary
        tmp.unlink(missing_ok=True)
    summary = {"model": segmenter.spec.name, "model_version": segmenter.spec.version, "cases": []}
    cases = list(zip(args.inputs, stems))
    bar = tqdm(cases, desc="segment", unit="case", disable=args.quiet)
    started = time.time()
    try:
        for path, stem in bar:
            _check_stop_requested()
            summary["cases"].append(_segment_case(path, stem, out_dir, segmenter, args, bar))
        _check_stop_requested()
    except KeyboardInterrupt:
        # Record what was done. The case being segmented left no output under its real name, but the
        # interrupt may have come between a case's last write and its record: its JSON tells.
        done = {c["stem"] for c in summary["cases"]}
        for p, s in cases:
            if s not in done:
                marker = _outputs(out_dir, s)["json"]
                written = marker.exists() and marker.stat().st_mtime >= started
                summary["cases"].append({"input": str(p), "stem": s,
                                         "status": "ok" if written else "not run (interrupted)"})
        summary["interrupted"] = True
        raise
    finally:
        segmenter.release()
        summary["n_failed"] = sum(c["status"] == "failed" for c in summary["cases"])
        summary["n_cases"] = len(stems)
        write_json_atomic(summary, out_dir / "summary.json", overwrite=True)
    failed = summary["n_failed"]
    if not args.quiet:
        ok = [c for c in summary["cases"] if c["status"] == "ok"]
        for c in ok:
            m = c["measurements"]
            side = m["vs_side"] or "no VS"
            print(f"{c['stem']}: VS {m['vs_volume_ml']:.2f} mL ({side}), max diameter {m['vs_max_diameter_mm']:.1f} mm")
        print(f"{len(stems) - failed}/{len(stems)} cases done; outputs in {out_dir}")
    return 1 if failed else 0


def _segment_case(path, stem: str, out_dir: Path, segmenter, args, bar) -> dict:
    """Segment one input and write its outputs; the summary record. Failures are recorded, not raised
    (only KeyboardInterrupt, i.e. Ctrl-C or a termination signal, stops the batch)."""
    from .checks import check_memory_before_reading
    from .io import read_image, stale_temporaries, write_image_atomic, write_json_atomic
    from .overlay import render_overlay_png

    outputs = _outputs(out_dir, stem)
    record = {"input": str(path), "stem": stem, "outputs": {k: str(v) for k, v in outputs.items()}}
    try:
        if args.resume and outputs["json"].exists() and outputs["labels"].exists():
            record["status"] = "skipped (complete)"  # the JSON is written last: its presence marks a complete case
            return record
        existing = [str(p) for p in outputs.values() if p.exists()]
        if existing and not (args.overwrite or args.resume):  # --resume redoes an interrupted case
            raise VSCochleaSegError(f"outputs already exist ({', '.join(existing)}); pass --overwrite to replace "
                                    "them, --resume to skip finished cases, or choose another output folder.")
        for output in outputs.values():  # left by a killed run (SIGKILL, power loss) writing this case
            for tmp in stale_temporaries(output):
                tmp.unlink(missing_ok=True)
        bar.set_postfix(case=stem, stage="read")
        check_memory_before_reading(path, segmenter.spec, segmenter.checks)
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
    except (VSCochleaSegError, OSError, RuntimeError, ValueError) as exc:
        _record_failure(record, path, str(exc), exc)
    except MemoryError as exc:
        _record_failure(record, path, "ran out of memory while segmenting. Crop the scan to the posterior fossa "
                                      "around both inner ears or resample it coarser, or close other programs.", exc)
    except Exception as exc:  # noqa: BLE001 - a bug must not lose the rest of the batch
        _record_failure(record, path, f"unexpected error (please report it): {type(exc).__name__}: {exc}", exc)
        record["traceback"] = traceback.format_exc()
    return record


def _record_failure(record: dict, path, message: str, exc: BaseException) -> None:
    record.update(status="failed", error=message, error_type=type(exc).__name__)
    print(f"error: {path}: {message}", file=sys.stderr)


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
                                  no_overlay=False, quiet=args.quiet, max_memory_gb=None)
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
    p.add_argument("--resume", action="store_true",
                   help="skip cases whose outputs are complete; redo the others, replacing what an interrupted run left")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="refuse scans estimated to need more memory than this (default: the RAM available)")
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


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) turned into the same orderly stop as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


# The signal that asked this process to stop, if any. The handler also raises at once, but Python drops
# an exception raised while a destructor or weakref callback runs ("Exception ignored in ..."), so the
# batch loop checks this flag between cases too: a stop request is never lost.
_stop_signal: list = []


def _raise_terminated(signum, frame):
    _stop_signal.append(signum)
    raise Terminated(signum)


def _check_stop_requested() -> None:
    if _stop_signal:
        raise Terminated(_stop_signal[0])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    # Python's default for SIGTERM/SIGHUP is to die on the spot, skipping the clean-up that removes
    # temporary files; route them, and Ctrl-C, through one handler that raises KeyboardInterrupt.
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    handled = [getattr(signal, n) for n in names if getattr(signal, n, None) is not None]
    _stop_signal.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise_terminated) for s in handled}
    try:
        return args.func(args)
    except VSCochleaSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("interrupted; finished cases are complete and no partial files were left; "
              "re-run with --resume to finish", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
