"""JAX arrays (``jax`` for JAX's default device, ``jax:cpu``, ``jax:gpu``, ``jax:gpu:1``)."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_jax_array

from ._base import Backend, BackendUnavailableError

LIBRARY = "jax"
INSTALL_HINT = "pip install 'conv2d[jax]'"


def is_array(obj: Any) -> bool:
    return is_jax_array(obj)


def device_spec(array: Any) -> str | None:
    device = array.device
    return f"{device.platform}:{device.id}"


def build(device: str | None) -> Backend:
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
    except ImportError as exc:
        raise BackendUnavailableError(f"JAX is not installed ({exc})") from exc

    if device is None:
        dev = jax.devices()[0]
    else:
        platform, _, number = device.partition(":")
        try:
            candidates = jax.devices(platform)
        except RuntimeError as exc:
            gpu_hint = "" if platform == "cpu" else "; for an NVIDIA GPU install JAX's CUDA build: pip install 'jax[cuda12]'"
            raise BackendUnavailableError(f"JAX has no {platform!r} devices ({exc}){gpu_hint}") from exc
        matches = [d for d in candidates if not number or str(d.id) == number]
        if not matches:
            raise BackendUnavailableError(
                f"JAX has no device {device!r}; it has {[f'{d.platform}:{d.id}' for d in candidates]}"
            )
        dev = matches[0]

    def native_asarray(obj, dtype):
        if dtype is None and hasattr(obj, "dtype"):
            dtype = obj.dtype
        wide = dtype is not None and np.dtype(dtype).name in ("float64", "int64", "uint64")
        if wide and not jax.config.jax_enable_x64:
            # JAX would silently give 32 bits instead.
            raise TypeError(
                f"JAX has 64-bit types disabled, so {np.dtype(dtype)} would silently become 32-bit; "
                "set JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True)) or use float32"
            )
        return jax.device_put(jnp.asarray(obj, dtype=dtype), dev)

    def scatter_add(target, indices, values):
        return target.at[indices].add(values)  # functional update; duplicates accumulate

    def dtype_hint(name):
        if name.endswith("64") and not jax.config.jax_enable_x64:
            return "JAX has 64-bit types disabled: set JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True))"
        return ""

    return Backend(
        name="jax",
        spec=f"jax:{dev.platform}:{dev.id}",
        device=dev,
        xp=jnp,
        _native_asarray=native_asarray,
        _to_numpy=np.asarray,
        _scatter_add=scatter_add,
        _owns=is_array,
        # JAX arrays are immutable. A slice names each element once: saying so lets XLA's GPU
        # scatter skip atomics, so the slice additions stay deterministic there.
        _dtype_hint=dtype_hint,
        _slice_add=lambda target, key, values: target.at[key].add(values, unique_indices=True, indices_are_sorted=True),
        deterministic_scatter=dev.platform == "cpu",  # XLA's GPU scatter-add uses atomics
    )
