"""colln's Triton python-backend model: what every ``1/model.py`` that
:func:`colln.export.triton.write_model_repository` writes for the python backend imports.

Triton's python stub imports this module in its own process, so it imports numpy and the standard
library only, besides the ``colln`` package it sits in (whose ``__init__`` brings torch, which the
runner needs anyway); Triton's ``triton_python_backend_utils`` and colln's runner are loaded when an
instance starts. Nothing of colln-serve's server, guard or supervisor (:mod:`colln.serve.server`)
comes with it.

One colln runner (:func:`colln.infer.runners.open_runner`) per instance, one response per request:
a NaN/Inf image fails its own request with 400, not its batch-mates; a failed inference is a 500
that names the exception type only (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np


class TritonPythonModel:
    """Triton python-backend model: one colln runner per instance, one response per request."""

    def initialize(
        self,
        args: dict,
    ) -> None:
        import triton_python_backend_utils as pb_utils

        from colln.infer.runners import open_runner

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config["parameters"]
        # The tensors the config declares (read from the ONNX graph when it was written).
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        self.runner = open_runner(Path(params["export_dir"]["string_value"]), backend=params["runner"]["string_value"])
        self.runner.activate()

    def execute(
        self,
        requests: list,
    ) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            images = pb.get_input_tensor_by_name(request, self.input).as_numpy()
            if np.isfinite(images).all():
                accepted.append((i, images))
            else:
                responses[i] = self._error(
                    f"{self.input} contains NaN or Inf: send finite pixel values", pb.TritonError.INVALID_ARG
                )
        if accepted:
            for i, response in self._infer(accepted):
                responses[i] = response
        return responses

    def _infer(
        self,
        accepted: list[tuple[int, np.ndarray]],
    ) -> list:
        """Run the merged batch once; split every output back into one response per request."""
        pb = self.pb
        batch = np.concatenate([images for _, images in accepted])
        try:
            results = self.runner.infer({self.input: batch})
            outputs = {name: results[name] for name in self.outputs}
            for name, rows in outputs.items():
                if rows.shape[0] != batch.shape[0]:
                    raise ValueError(f"runner returned {rows.shape[0]} rows of {name} for a batch of {batch.shape[0]}")
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error response, never a crash
            pb.Logger.log_error(f"colln: inference failed:\n{traceback.format_exc()}")
            # The type name only: exception text can hold server paths.
            error = self._error(
                f"inference failed ({type(exc).__name__}); the server log has the details", pb.TritonError.INTERNAL
            )
            return [(i, error) for i, _ in accepted]
        out, start = [], 0
        for i, images in accepted:
            tensors = [pb.Tensor(name, np.ascontiguousarray(rows[start : start + len(images)])) for name, rows in outputs.items()]
            out.append((i, pb.InferenceResponse(output_tensors=tensors)))
            start += len(images)
        return out

    def _error(
        self,
        message: str,
        code: int,
    ) -> object:
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    def finalize(self) -> None:
        self.runner.deactivate()
