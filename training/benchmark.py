"""`simpleslicenet benchmark`: detection time and peak memory, default model vs the paper's setup (and U2AD).

Each configuration runs in its own child process so its peak memory (ru_maxrss) is its own.
Timed: reading the volume, detection, lesion extraction and writing the heatmap and mask (the
work of `detect` per input without the overlay picture), after one warm-up run. Interpreter
start and model loading are reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from SimpleSliceNetLib.errors import UserError
from SimpleSliceNetLib.progress import Progress

PAPER = "paper"
# The same configuration run the way detection runs the default model (prepare_for_inference: on the
# CPU, BatchNorm folded and the encoder frozen; on CUDA, a reduced-precision encoder); the public code
# runs plain eager fp32.
PAPER_ENGINE = "paper-engine"
DEFAULT = "default"
U2AD = "u2ad"
U2AD_MODEL = "u2ad-t1-synth"  # the bundled U2AD model, timed with its K = 4 masks per slice


def paper_config():
    """The published configuration: wide_resnet50_2 layer2+layer3, 192x192x96 at 1 mm, 512-d, 8 blocks."""
    from SimpleSliceNetLib.encoder import EncoderConfig
    from SimpleSliceNetLib.flow import FlowConfig
    from SimpleSliceNetLib.preprocess import PreprocessConfig
    from SimpleSliceNetLib.slicenet import SliceNetConfig

    return SliceNetConfig(
        preprocess=PreprocessConfig(shape=(192, 192, 96), spacing=(1.0, 1.0, 1.0)),
        encoder=EncoderConfig(backbone="wide_resnet50_2", taps=(2, 3), channels_per_tap=256,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        flow=FlowConfig(blocks=8, pos_dim=128, pos_depth=False),
        group=3,
    )


def _worker(which: str, volume_path: str, repeats: int, device: str) -> dict:
    """Runs inside the child process: load, warm up, time ``repeats`` detections."""
    started = time.perf_counter()
    from SimpleSliceNetLib.detector import Detector, prepare_for_inference
    from SimpleSliceNetLib.devices import autocast_dtype, choose_device
    from SimpleSliceNetLib.lesions import extract_lesions
    from SimpleSliceNetLib.volume_io import load_volume, save_volume

    import_s = time.perf_counter() - started
    started = time.perf_counter()
    if which in (DEFAULT, U2AD):
        detector = Detector.load(None if which == DEFAULT else U2AD_MODEL, device)
        name = detector.model.id
    else:
        from SimpleSliceNetLib.slicenet import SliceNetModel

        # Random weights: the paper's ImageNet weights cannot be fetched offline and do not change the cost.
        detector = Detector.__new__(Detector)
        detector.device = choose_device(device)
        detector.net = SliceNetModel(paper_config(), encoder_weights="none").eval().to(detector.device.name)
        detector.autocast = autocast_dtype(detector.device.name) if which == PAPER_ENGINE else None
        if which == PAPER_ENGINE:
            prepare_for_inference(detector.net, detector.device.name, detector.autocast)
        name = "paper (wide_resnet50_2 layer2+3, 192x192x96, 512-d, 8 blocks; random weights)"
    load_s = time.perf_counter() - started

    def once(out: Path) -> dict:
        t0 = time.perf_counter()
        volume = load_volume(volume_path)
        result = detector.detect(volume)
        labels, _ = extract_lesions(result.heatmap, volume.affine, result.threshold, result.brain_mask)
        save_volume(out / "heatmap.nii.gz", result.heatmap, volume.affine)
        save_volume(out / "mask.nii.gz", (labels > 0).astype(np.uint8), volume.affine)
        return {"total_s": time.perf_counter() - t0, **result.timings}

    with tempfile.TemporaryDirectory() as tmp:
        once(Path(tmp))
        runs = [once(Path(tmp)) for _ in range(repeats)]
    return {
        "config": which,
        "model": name,
        "device": detector.device.name,
        "autocast": str(detector.autocast).replace("torch.", "") if detector.autocast else "none",
        "encoder_dim": int(detector.net.dim),
        "import_s": round(import_s, 2),
        "model_load_s": round(load_s, 2),
        "seconds_per_volume": round(float(np.median([r["total_s"] for r in runs])), 3),
        "stages_s": {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0] if k != "total_s"},
        "repeats": repeats,
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def benchmark(volume_path: str, repeats: int, paper_repeats: int, device: str, progress: Progress) -> dict:
    from SimpleSliceNetLib.volume_io import load_volume

    shape = list(load_volume(volume_path).array.shape)
    results = {}
    configurations = [(DEFAULT, repeats), (PAPER, paper_repeats), (PAPER_ENGINE, paper_repeats)]
    if _bundled(U2AD_MODEL):
        configurations.append((U2AD, repeats))
    for which, count in configurations:
        progress.info(f"benchmarking {which} ({count} timed run(s) after a warm-up) ...")
        cmd = [sys.executable, "-m", "SimpleSliceNetTraining.benchmark", "--worker", which, volume_path,
               str(count), device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"benchmark of {which} failed: {done.stderr.strip().splitlines()[-1:]}")
        results[which] = json.loads(done.stdout.strip().splitlines()[-1])
    speedup = results[PAPER]["seconds_per_volume"] / results[DEFAULT]["seconds_per_volume"]
    import torch

    return {
        "volume": volume_path,
        "shape": shape,
        "threads": torch.get_num_threads(),
        "results": results,
        "speedup_vs_paper": round(speedup, 2),
        "speedup_vs_paper_engine": round(
            results[PAPER_ENGINE]["seconds_per_volume"] / results[DEFAULT]["seconds_per_volume"], 2
        ),
        "targets": {
            "default_seconds_per_volume<=3": results[DEFAULT]["seconds_per_volume"] <= 3.0,
            "default_peak_memory_mb<=1536": results[DEFAULT]["peak_memory_mb"] <= 1536,
            "speedup_vs_paper>=8": speedup >= 8.0,
            **({"u2ad_seconds_per_volume<=15": results[U2AD]["seconds_per_volume"] <= 15.0} if U2AD in results else {}),
        },
    }


def _bundled(model_id: str) -> bool:
    from SimpleSliceNetLib.resources import bundled_models_dir

    return (bundled_models_dir() / f"{model_id}.json").exists()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("benchmark", help="time detection (default model vs the paper's configuration)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", help="volume to time (default: the bundled 240x240x155 sample)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the default model (median reported)")
    p.add_argument("--paper-repeats", type=int, default=1, help="timed runs of the paper configuration")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, progress: Progress) -> int:
    from SimpleSliceNetLib.resources import sample_volume

    volume = args.volume or str(sample_volume())
    if not Path(volume).exists():
        raise UserError(f"{volume}: volume not found")
    report = benchmark(volume, args.repeats, args.paper_repeats, args.device, progress)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"volume {report['volume']} {report['shape']}, {report['threads']} threads")
    print(f"{'configuration':<14}{'s/volume':>10}{'peak MB':>10}{'load s':>9}  stages")
    for key, r in report["results"].items():
        stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["stages_s"].items())
        print(f"{key:<14}{r['seconds_per_volume']:>10.2f}{r['peak_memory_mb']:>10.0f}{r['model_load_s']:>9.1f}"
              f"  {stages}")
    print(f"speed-up vs paper configuration: {report['speedup_vs_paper']:.1f}x (fp32, as published), "
          f"{report['speedup_vs_paper_engine']:.1f}x (run as this engine runs the default model)")
    for target, met in report["targets"].items():
        print(f"  {'met' if met else 'NOT met'}: {target}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
