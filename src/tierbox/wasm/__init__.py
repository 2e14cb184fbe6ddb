"""WebAssembly machinery behind the ``wasm`` tier, in layers (each imports only
those above it):

* :mod:`tierbox.wasm.wasmtime_private`: every use of wasmtime-py's private API.
* :mod:`tierbox.wasm.growtrack`: counting refused ``memory.grow`` (a module rewrite).
* :mod:`tierbox.wasm.engine`: the one wasmtime Engine of the process and its settings.
* :mod:`tierbox.wasm.scratch`: per-thread stdout/stderr/stdin files and one-shot roots.
* :mod:`tierbox.wasm.control`: run control: the epoch ticker and per-Store callback,
  signals inside callbacks, interpreter exit with live runs.
* :mod:`tierbox.wasm.wasi`: the WASI functions tierbox implements itself.
* :mod:`tierbox.wasm.modules`: checking, compiling (cached) and linking modules.
* :mod:`tierbox.wasm.runner`: one WASI run (fresh Store + instantiate), output
  capture and the mapping of traps to :class:`~tierbox.spec.Termination`.
* :mod:`tierbox.wasm.images`: Wasm OCI images, image names and program names,
  the built-in ``python:wasi`` and ``micropython:wasi``, ``import_wasm``.
* :mod:`tierbox.wasm.toolchain`: C to WASI with clang (test guests, probes).
"""
