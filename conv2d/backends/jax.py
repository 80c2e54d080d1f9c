"""JAX arrays (``jax`` for JAX's default device, ``jax:cpu``, ``jax:gpu``, ``jax:gpu:1``)."""

from __future__ import annotations

from typing import Any

from array_api_compat import is_jax_array

from ._base import Backend, BackendUnavailableError

LIBRARY = "jax"
INSTALL_HINT = "pip install 'conv2d[jax]'"


def is_array(obj: Any) -> bool:
    return is_jax_array(obj)


def is_tracer(array: Any) -> bool:
    import jax  # loaded: the array is JAX's

    return isinstance(array, jax.core.Tracer)


def device_spec(array: Any) -> str | None:
    if is_tracer(array):
        # Inside jit, grad or vmap an array is an abstract value with no device yet; the traced
        # program runs on JAX's default device unless the caller places it, so that is the backend.
        return None
    device = array.device
    return f"{device.platform}:{device.id}"


class JaxNative:
    """``algorithm="native"``: ``jax.lax.conv_general_dilated``, and its VJP for the backward pass.

    At ``Precision.HIGHEST``: on a GPU, JAX's default would let float32 run as TF32.
    """

    def __init__(self, jax: Any, on_gpu: bool) -> None:
        self.jax = jax
        self.on_gpu = on_gpu
        # Whether deterministic=True can be honoured (``_conv.auto_algorithm`` reads it).
        self.deterministic = not on_gpu

    def prefers(self, geom: Any) -> bool:
        """Whether ``auto`` should run this for `geom`: XLA's CPU convolution measured 1.3x to 17x
        faster than ``slices`` on the cpu preset's layers, but slower on its 1x1, 3-channel and
        depthwise ones (docs/benchmarks.md)."""
        return not (geom.kernel_h == geom.kernel_w == 1 or geom.channels_per_group <= 4)

    def _conv(self, geom: Any) -> Any:
        lax = self.jax.lax
        top, bottom, left, right = geom.padding

        def conv(x: Any, weight: Any) -> Any:
            return lax.conv_general_dilated(
                x, weight, window_strides=geom.stride, padding=((top, bottom), (left, right)),
                rhs_dilation=geom.dilation, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                feature_group_count=geom.groups, precision=lax.Precision.HIGHEST,
            )

        return conv

    def _check(self, deterministic: bool) -> None:
        if deterministic and self.on_gpu:
            # XLA's GPU convolution gradients may sum with atomics, and only a process-wide flag
            # (XLA_FLAGS=--xla_gpu_deterministic_ops=true) changes that: refuse rather than be silently unreproducible.
            raise ValueError(
                "algorithm 'native' on a JAX GPU is not bitwise reproducible: with deterministic=True use "
                "algorithm='auto' or 'slices' (or set XLA_FLAGS=--xla_gpu_deterministic_ops=true and deterministic=False)"
            )

    def forward(self, x: Any, weight: Any, bias: Any, geom: Any, deterministic: bool = False) -> Any:
        y = self._conv(geom)(x, weight)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)

    def backward(self, grad_out: Any, x: Any, weight: Any, geom: Any, deterministic: bool = False,
                 needs: tuple[str, ...] = ("x", "weight")) -> tuple[Any, Any, Any]:
        """The three gradients, those of x and weight only where `needs` names them (else None); without
        "weight", `x` is read for its shape only."""
        self._check(deterministic)
        conv = self._conv(geom)
        if "weight" not in needs:
            _, pullback = self.jax.vjp(lambda x: conv(x, weight), x)
            (grad_x,) = pullback(grad_out)
            return grad_x, None, grad_out.sum(axis=(0, 2, 3))
        if "x" not in needs:
            _, pullback = self.jax.vjp(lambda weight: conv(x, weight), weight)
            (grad_w,) = pullback(grad_out)
            return None, grad_w, grad_out.sum(axis=(0, 2, 3))
        _, pullback = self.jax.vjp(conv, x, weight)
        grad_x, grad_w = pullback(grad_out)
        return grad_x, grad_w, grad_out.sum(axis=(0, 2, 3))


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
        name = None if dtype is None else np.dtype(dtype).name
        # JAX would silently give 32 bits (complex64 for complex128: 32-bit parts) instead.
        narrow = {"float64": "float32", "complex128": "complex64", "int64": "int32", "uint64": "uint32"}.get(name or "")
        if narrow and not jax.config.jax_enable_x64:
            raise TypeError(
                f"JAX has 64-bit types disabled, so {name} would silently become {narrow}; "
                f"set JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True)) or use {narrow}"
            )
        return jax.device_put(jnp.asarray(obj, dtype=dtype), dev)

    def constant_asarray(host):
        # Concrete even under jit/grad/vmap: the cached plan outlives the trace that asked for it.
        with jax.ensure_compile_time_eval():
            return native_asarray(host, None)

    def scatter_add(target, indices, values):
        return target.at[indices].add(values)  # functional update; duplicates accumulate

    def dtype_hint(name):
        if name in ("float64", "complex128", "int64", "uint64") and not jax.config.jax_enable_x64:
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
        _constant_asarray=constant_asarray,
        _traced=is_tracer,
        native=JaxNative(jax, dev.platform != "cpu"),
    )
