"""array-api-strict: the standard and nothing else, to prove the core needs nothing more."""

from __future__ import annotations

import sys
from typing import Any

from ._base import Backend, BackendUnavailableError

LIBRARY = "array_api_strict"
INSTALL_HINT = "pip install 'conv2d[strict]'"


def is_array(obj: Any) -> bool:
    module = sys.modules.get("array_api_strict._array_object")  # the Array class is not exported
    return module is not None and isinstance(obj, module.Array)


def device_spec(array: Any) -> str | None:
    name = _device_name(array.device)
    return None if name == "CPU_DEVICE" else name


def _device_name(device: Any) -> str:
    # Device objects keep their name privately; their repr is "array_api_strict.Device('NAME')".
    return repr(device).split("'")[1]


def build(device: str | None) -> Backend:
    try:
        import array_api_strict as xp
    except ImportError as exc:
        raise BackendUnavailableError(f"array-api-strict is not installed ({exc})") from exc

    devices = {_device_name(d): d for d in xp.__array_namespace_info__().devices()}
    # The selector lowers device names (they ignore case); the library's own names are mixed case.
    name = next((n for n in devices if n.lower() == (device or "CPU_DEVICE").lower()), None)
    if name is None:
        raise BackendUnavailableError(
            f"array-api-strict has no device {device!r}; its devices are {sorted(devices)}"
        )
    dev = devices[name]

    def native_asarray(obj, dtype):
        return xp.asarray(obj, dtype=dtype, device=dev)

    def to_numpy(array):
        import numpy as np

        # The standard's way out of a library: DLPack (only from the CPU device).
        return np.from_dlpack(xp.asarray(array, device=xp.Device("CPU_DEVICE")))

    return Backend(
        name="array_api_strict",
        spec="array_api_strict" if name == "CPU_DEVICE" else f"array_api_strict:{name}",
        device=dev,
        xp=xp,
        _native_asarray=native_asarray,
        _to_numpy=to_numpy,
        _scatter_add=lambda target, indices, values: scatter_add_standard(xp, target, indices, values),
        _owns=is_array,
    )


def scatter_add_standard(xp: Any, target: Any, indices: Any, values: Any) -> Any:
    """Scatter-add written on the standard alone, which has no scatter and no item assignment.

    Sort the values by index, so that each index's values form one run; sum within the runs by a
    segmented scan (log-step doubling: at step k every value adds the partial sum k places back
    if that one belongs to the same run), so each run's total ends at its last element; then
    every target position *gathers* its run's total, found by binary search. Sums never cross
    runs, so a NaN, an Inf or a large value at one index reaches no other.
    """
    if indices.shape[0] == 0:
        return target
    dev = target.device
    order = xp.argsort(indices, stable=True)
    sorted_indices = xp.take(indices, order)
    sums = xp.take(values, order)
    zero = xp.zeros((), dtype=sums.dtype, device=dev)
    step = 1
    while step < sums.shape[0]:
        same_run = sorted_indices[step:] == sorted_indices[:-step]
        if not bool(xp.any(same_run)):  # no run is longer than `step`: every total is complete
            break
        carried = xp.where(same_run, sums[:-step], zero)
        sums = xp.concat([sums[:step], sums[step:] + carried])
        step *= 2
    positions = xp.arange(target.shape[0], dtype=sorted_indices.dtype, device=dev)
    start = xp.searchsorted(sorted_indices, positions, side="left")
    stop = xp.searchsorted(sorted_indices, positions, side="right")
    last = xp.take(sums, xp.clip(stop - 1, 0, None))  # the run's last element holds its total
    return target + xp.where(stop > start, last, zero)
