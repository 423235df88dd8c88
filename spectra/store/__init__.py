"""The run store: one zarr v3 group per training run (schema in docs/store.md).

Modules: format (schema, MatrixSpec, zarr helpers), location (paths and fsspec URLs), lock
(StoreLock: one holder at a time), reader (Run), writer (RunWriter).

Layout::

    <run>.zarr/                 attrs["spectra"] = {schema, created, params, model, ...}
      steps    int64 (T,)       training step of each committed snapshot (written LAST: the commit)
      time     float64 (T,)     seconds since the store was created (wall clock)
      scalars/<name> (T,)       per-snapshot scalars (loss, lr, ...); NaN where not given
      params/<name>/            one group per recorded matrix
        init     (m, n)         W_0, float32 (float64 for float64 parameters)
        updates  (T, m, n)      ΔW_t = W_t − W_0, float64 by default, one snapshot per chunk
      analysis/...              derived results (spectra.analysis.analyzer); safe to delete

Commit protocol. zarr grows an array's metadata before it writes the new chunk, and nothing is
transactional across arrays. So a snapshot writes every matrix's row, then its scalars and time,
and appends to ``steps`` last. ``steps`` has fill value −1: a row whose chunk never landed reads
as −1 and is not committed. Readers trust the committed length; a writer that resumes cuts every
longer array back to it. A process killed at any instant therefore leaves a store whose committed
snapshots are all intact (LocalStore writes each file atomically, by rename).

Exactness of ``weights = init + updates``. For float32 (and lower-precision) parameters the update
is stored as the float64 difference, which is exact whenever |W_t| > 2^-29·|W_0| or W_t = 0, so
``weights`` reproduces W_t bitwise in practice; the error is always below
2^-53·|W_t − W_0| + ulp(W_t)/2. With ``update_dtype="float32"`` (half the bytes) the error grows to
about ulp(max(|W_0|, |W_t|)).
"""

from spectra.store.format import (MATRIX_COMPRESSORS, SCHEMA_VERSION, UNCOMMITTED_STEP,
                                  MatrixSpec, StoreError, committed_length, is_run_store)
from spectra.store.location import Location
from spectra.store.lock import StoreLock, StoreLocked, StoreReadOnly
from spectra.store.reader import Run, open_run
from spectra.store.writer import RunWriter, annotate_run, create_run, resume_run

__all__ = ["MATRIX_COMPRESSORS", "SCHEMA_VERSION", "UNCOMMITTED_STEP", "Location", "MatrixSpec",
           "Run", "RunWriter", "StoreError", "StoreLock", "StoreLocked", "StoreReadOnly",
           "annotate_run", "committed_length", "create_run", "is_run_store", "open_run",
           "resume_run"]
