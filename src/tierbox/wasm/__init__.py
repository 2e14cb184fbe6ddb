"""WebAssembly machinery behind the ``wasm`` tier.

* :mod:`tierbox.wasm.engine`: the one wasmtime Engine of the process, its epoch
  ticker, the precompiled-module cache and module loading/linking.
* :mod:`tierbox.wasm.runner`: one WASI run (fresh Store + instantiate), output
  capture and the mapping of traps to :class:`~tierbox.spec.Termination`.
* :mod:`tierbox.wasm.images`: Wasm OCI images (entrypoint is a ``.wasm``), the
  built-in ``python`` and ``micropython`` images and ``import_wasm``.
"""
