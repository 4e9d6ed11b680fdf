"""``python -m fastxmc.info [--json]``: versions, the native build, and which backends can run.

For every op it describes each backend (for InfoNCE / SupCon: that ``cuda`` runs FP32 FMA tiles
without tensor cores, the fallback for GPUs without Triton) and, per device, lists the backends
that are available and, for the others, why not, so a user can tell at a glance whether the fused
kernels are in use.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from fastxmc import __version__, _extension


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return getattr(mod, "__version__", "unknown")


def _registries() -> dict:
    # Import the registries by module path: the package re-exports functions of the same names.
    from fastxmc.ops.infonce import registry as infonce_registry
    from fastxmc.ops.modulated_bn import registry as modulated_bn_registry
    from fastxmc.ops.region_word import registry as region_word_registry
    from fastxmc.ops.word_attention import registry as word_attention_registry

    return {"info_nce": infonce_registry, "supcon": infonce_registry,
            "region_word_loss": region_word_registry, "word_attention": word_attention_registry,
            "modulated_batch_norm": modulated_bn_registry}


def _devices() -> list:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def collect() -> dict:
    from fastxmc.ops.registry import Request

    ops, descriptions = {}, {}
    for op, reg in _registries().items():
        descriptions[op] = {name: b.description for name, b in reg.backends.items()}
        ops[op] = {}
        for device in _devices():
            reasons = reg.reasons(Request(device, torch.float32))
            chosen = reg.select(Request(device, torch.float32), impl=None) if any(
                not w for w in reasons.values()) else None
            ops[op][device.type] = {"default": chosen, "backends": reasons}
    return {
        "fastxmc": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "extension": {
            "loaded": _extension.extension_loaded(),
            "error": _extension.extension_error(),
            "build": _extension.build_info(),
            "cuda_kernels": _extension.has_kernel("infonce_lse_forward", "CUDA"),
        },
        "ops": ops,
        "backends": descriptions,
    }


def _print_text(info: dict) -> None:
    print(f"fastxmc {info['fastxmc']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda']}, GPU available: {info['cuda_available']})  "
          f"triton {info['triton']}  numpy {info['numpy']}")
    ext = info["extension"]
    if ext["loaded"]:
        build = ext["build"]
        print(f"extension: built  (CUDA kernels compiled: {ext['cuda_kernels']}, "
              f"CUDA {build.get('cuda_version')}, archs {build.get('cuda_archs')}, "
              f"compiled against torch {build.get('torch_version')})")
    else:
        print(f"extension: NOT available: {ext['error']}")
    for op, per_device in info["ops"].items():
        print(f"{op} backends:")
        for name, description in info["backends"][op].items():
            print(f"    {name:<13} {description}")
        for device, entry in per_device.items():
            print(f"{op} on {device}: default backend {entry['default']}")
            for name, why in entry["backends"].items():
                state = "available" if not why else "unavailable: " + "; ".join(why)
                print(f"    {name:<13} {state}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastxmc.info", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_text(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
