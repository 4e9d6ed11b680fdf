"""The NVIDIA DALI image path: read, decode, crop, resize, flip, on the GPU when there is one.

The sample order, flips and crops are decided in Python (:mod:`fastxmc.data.loader`) and fed to the
pipeline per batch through ``fn.external_source``: the encoded file bytes, a flip flag and, for
datasets with crop boxes (CUB's bbox crop), the crop window. The pipeline then runs
``decoders.image`` (``"mixed"``, i.e. nvJPEG, with a GPU, else CPU; RGB; EXIF orientation ignored,
as PIL does) -> ``slice`` (crop boxes only; clipped to the image) -> ``resize`` (linear, antialiased,
exactly ``resolution`` x ``resolution``; the identity, bit for bit, on images already that size) ->
``flip``.
The output is uint8 (B, H, W, 3): the loader converts it to float32 NCHW in [0, 1] exactly as it
does for the torch path, so the two agree bit for bit on images already at the target size.

Prefetching is DALI's own (``prefetch_queue_depth`` batches decoded ahead by ``num_threads``
threads, asynchronously). One pipeline serves consecutive epochs; an epoch left before its end
rebuilds it on the next one (building takes milliseconds).
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import numpy as np
import torch

from fastxmc.data.sources import UnreadableImageError

__all__ = ["dali_available", "DaliImages"]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


class _Feeder:
    """The pipeline's external source: one batch of (bytes, flip[, anchor, shape]) per call."""

    def __init__(self, images: "DaliImages"):
        self.images = images
        self.plans: Iterator = iter(())

    def __call__(self):
        indices, flips = next(self.plans)       # StopIteration ends the epoch for DALI
        out = [[np.fromfile(self.images.paths[i], dtype=np.uint8) for i in indices],
               [np.array(bool(f), dtype=np.int32) for f in flips]]
        if self.images.crops is not None:
            boxes = [self.images.crops[i] for i in indices]
            out.append([np.array(b[:2], dtype=np.float32) for b in boxes])                # (x1, y1)
            out.append([np.array([b[2] - b[0], b[3] - b[1]], dtype=np.float32) for b in boxes])
        return tuple(out)


class DaliImages:
    """uint8 (B, res, res, 3) image batches decoded by DALI.

    ``paths`` (N,) file paths; ``crops`` None or (N,) ``[x1, y1, x2, y2]`` boxes (None entries: no
    crop); ``device_id`` None for a CPU-only pipeline, else the CUDA device index (outputs on it).
    """

    def __init__(self, paths, crops, resolution: int, batch_size: int, threads: int = 2,
                 prefetch: int = 2, device_id: int | None = None):
        self.paths = [str(p) for p in paths]
        if crops is not None and any(c is not None for c in crops):
            # a crop box covering any image: slice trims it to the image for samples without a box
            self.crops = [list(c) if c is not None else [0, 0, 1 << 30, 1 << 30] for c in crops]
        else:
            self.crops = None
        self.resolution, self.batch_size = resolution, batch_size
        self.threads, self.prefetch, self.device_id = max(1, threads), prefetch, device_id
        self._feeder = _Feeder(self)
        self._pipe = None
        self._clean = False       # the last epoch ran to its end: the pipeline can be reused

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline
        gpu = self.device_id is not None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                        prefetch_queue_depth=self.prefetch, exec_async=True, exec_pipelined=True)
        with pipe:
            n_out = 2 if self.crops is None else 4
            inputs = fn.external_source(source=self._feeder, num_outputs=n_out, batch=True)
            images = fn.decoders.image(inputs[0], device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False)
            if self.crops is not None:
                images = fn.slice(images, inputs[2], inputs[3], axis_names="WH", normalized_anchor=False,
                                  normalized_shape=False, out_of_bounds_policy="trim_to_shape")
            images = fn.resize(images, resize_x=self.resolution, resize_y=self.resolution,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.flip(images, horizontal=inputs[1])
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        if self.device_id is None:
            return torch.from_numpy(out.as_array())     # an owned copy of DALI's buffer
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dst = torch.empty((len(out), self.resolution, self.resolution, 3), dtype=torch.uint8,
                          device=f"cuda:{self.device_id}")
        # ordered before anything torch later runs on its current stream
        feed_ndarray(out, dst, cuda_stream=torch.cuda.current_stream(dst.device))
        return dst

    def batches(self, plans) -> Iterator[torch.Tensor]:
        """One uint8 (B, res, res, 3) tensor per ``(indices, flips)`` plan, in order."""
        plans = list(plans)
        if not plans:
            return
        if self._pipe is not None and self._clean:
            self._pipe.reset()
        else:
            self._pipe = None           # dropped mid-epoch: its queue holds stale batches
            self._feeder.plans = iter(())
            self._pipe = self._build()
        self._clean = False
        self._feeder.plans = iter(plans)
        for k, (indices, _) in enumerate(plans):
            try:
                (images,) = self._pipe.run()
            except StopIteration:
                raise RuntimeError(f"DALI pipeline ended after {k} of {len(plans)} batches") from None
            except RuntimeError as e:
                self._pipe = None
                files = ", ".join(self.paths[i] for i in indices[:8])
                raise UnreadableImageError(f"DALI failed on a batch with images {files}"
                                           f"{' ...' if len(indices) > 8 else ''}: {e}") from e
            yield self._to_torch(images)
        try:
            self._pipe.run()            # drains the source: DALI marks the epoch's end
        except StopIteration:
            self._clean = True
