"""Stage 1's network as one ONNX graph: export from PyTorch, and run with onnxruntime without importing torch.

The graph is backbone + selective head: input ``pixels``, the normalised ``(B, 3, S, S)`` float32 batch (dynamic B);
outputs ``p_roadwork_raw`` and ``gate_raw``, each ``(B,)`` float32: the sigmoids of the head's cls and gate logits,
i.e. the raw (uncalibrated) scores that ``Stage1Model.forward_raw`` returns and that calibration's rule takes. The
aux output is left out: nothing downstream of training reads it.

Example:
    >>> data = export_scores_graph(backbone, head, image_size=224)  # doctest: +SKIP
    >>> p_raw, gate_raw = OnnxGraph(data)(batch)  # batch: (B, 3, 224, 224) float32  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

from roadwork_cli.errors import BundleError, RoadworkError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAMES",
    "OnnxGraph",
    "create_session",
    "export_graph",
    "export_scores_graph",
    "onnxruntime_available",
    "scores_module",
]

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("p_roadwork_raw", "gate_raw")
OPSET = 17
"""ONNX opset of exported graphs: supported by every onnxruntime of the last years and by the TorchScript exporter."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` (a core dependency; a hand-made environment may lack it) can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def create_session(data: bytes, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` of serialised ONNX ``data``.

    Raises:
        UsageError: onnxruntime is not installed.
        BundleError: The bytes are not a loadable ONNX model.
    """
    if not onnxruntime_available():
        raise UsageError(
            "This needs onnxruntime, which is not installed: pip install onnxruntime (or run the bundle with "
            "--runtime torch)."
        )
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's concern
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure means the member is not a usable graph
        raise BundleError(f"model.onnx cannot be loaded by onnxruntime: {exc}") from None


class OnnxGraph:
    """An exported stage-1 graph in an onnxruntime CPU session.

    Args:
        data: The serialised ONNX model (a bundle's ``model.onnx``).
        threads: Intra-op threads; ``None`` lets onnxruntime choose (one per physical core).

    Raises:
        UsageError: onnxruntime is not installed.
        BundleError: The bytes are not a loadable ONNX model or lack the stage-1 input/outputs.
    """

    def __init__(self, data: bytes, threads: int | None = None):
        self.session = create_session(data, threads)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise BundleError(
                f"model.onnx has inputs {inputs} and outputs {outputs}; a stage-1 graph has input {INPUT_NAME!r} and "
                f"outputs {list(OUTPUT_NAMES)}. Re-export it with `roadwork export --onnx`."
            )

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(p_roadwork, gate)``, each ``(B,)`` float32, of a normalised ``(B, 3, S, S)`` float32 batch."""
        p_raw, gate_raw = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return p_raw.reshape(-1), gate_raw.reshape(-1)


def scores_module(backbone: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
    """``backbone`` + ``head`` as one fp32 module: ``(B, 3, S, S)`` -> (sigmoid cls, sigmoid gate), each ``(B,)``.

    It is both what gets exported and the PyTorch reference the export is verified against.
    """
    import torch

    class ScoresGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.head(self.backbone(pixels).float())
            return torch.sigmoid(out.cls.float()), torch.sigmoid(out.gate.float())  # (B,), (B,)

    return ScoresGraph().eval().float()


def export_scores_graph(backbone: torch.nn.Module, head: torch.nn.Module, image_size: int, opset: int = OPSET) -> bytes:
    """Serialise backbone + head as one ONNX graph with a dynamic batch axis (see the module docstring).

    Raises:
        RoadworkError: The backbone uses an operation the exporter cannot express; the message names the backbone
            (``roadwork export`` then writes the bundle without a graph).
    """
    name = getattr(backbone, "name", type(backbone).__name__)
    return export_graph(scores_module(backbone, head), image_size, OUTPUT_NAMES, name, opset)


def export_graph(
    module: torch.nn.Module, image_size: int, outputs: tuple[str, ...], name: str, opset: int = OPSET
) -> bytes:
    """Serialise ``module`` (input ``pixels``, ``(B, 3, S, S)`` float32, dynamic B) as an ONNX graph.

    Uses PyTorch's TorchScript-based exporter, which needs no package beyond torch.

    Args:
        module: The fp32 module to export.
        image_size: Input side S.
        outputs: Names of its outputs, each with a dynamic batch axis.
        name: What to call it in an error (the backbone's name).
        opset: ONNX opset.

    Raises:
        RoadworkError: The exporter cannot express the module.
    """
    import torch

    example = torch.zeros(2, 3, image_size, image_size)
    buffer = io.BytesIO()
    axes = {axis_of: {0: "batch"} for axis_of in (INPUT_NAME, *outputs)}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
            torch.onnx.export(
                module.eval(),
                (example,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - any exporter failure gets one clear message
        raise RoadworkError(
            f"Backbone {name!r} cannot be exported to ONNX (opset {opset}): {type(exc).__name__}: {exc}."
        ) from exc
    return buffer.getvalue()
