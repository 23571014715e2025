"""gunicorn settings for `OPENIMIS_GC_FREEZE=1` (tests/openimis/harness.py): each worker freezes the objects
it inherited from the preloading master (Python's `gc.freeze()`), so its garbage collector no longer walks
openIMIS's ~420,000 module-level objects on every full collection (~180 ms each on the benchmark box,
0.3-0.6 s under load: the stalls the web users of bench/openimis_load.py meet). Off by default: the harness
runs openIMIS as it ships; this is what an openIMIS deployment can add."""

import gc


def post_fork(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    gc.freeze()
