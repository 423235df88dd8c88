"""The run store: one zarr v3 group per training run (schema in docs/store.md).

Modules: location (paths and fsspec URLs), format (schema, MatrixSpec, errors, open_root),
lock (StoreLock: one holder at a time), chunks (whole-chunk writes, checked reads), reader (Run,
committed_steps), writer (RunWriter: the commit protocol), creation (create_run, atomic),
verify (verify_run, repair_run).

Layout (schema 2)::

    <run>.zarr/                 attrs["spectra"] = {schema, created, params, committed, ...}
      locks/writer/             the writer lock (a zarr group; attrs: who holds or last held it)
      steps    int64 (T,)       training step of each committed snapshot (written LAST: the commit)
      time     float64 (T,)     seconds since the store was created (wall clock)
      digests  uint32 (T, P)    CRC-32 of each recorded W_t, as the trainer had it
      scalars/<name> (T,)       per-snapshot scalars (loss, lr, ...); NaN where not given
      params/<name>/            one group per recorded matrix
        init     (m, n)         W_0, float32 (float64 for float64 parameters)
        updates  (T, m, n)      ΔW_t = W_t − W_0, float64 by default, one snapshot per chunk
      analysis/...              derived results (spectra.analysis); safe to delete

Every chunk ends with a crc32c checksum (zarr's ``crc32c`` codec). Arrays may be longer than
T (grown ahead while a writer runs, or left by a crash): readers trust the committed length.

Commit protocol. zarr grows an array's metadata before it writes the new chunk, and nothing is
transactional across arrays. So snapshots write every matrix's row, then (at a commit) their
scalars, time and digests, then ``steps``, then the lower bound attrs["committed"]. ``steps``
has fill value −1: a row whose chunk never landed reads as −1 and is not committed. Readers
trust the committed prefix of ``steps``; a writer never deletes anything on resume, it writes
over uncommitted rows. A process killed at any instant therefore leaves a store whose
committed snapshots are all intact (LocalStore writes each file atomically, by rename).

Exactness of ``weights = init + updates``. For float32 (and lower-precision) parameters the update
is stored as the float64 difference, which is exact whenever |W_t| > 2^-29·|W_0| or W_t = 0, so
``weights`` reproduces W_t bitwise in practice; the error is always below
2^-53·|W_t − W_0| + ulp(W_t)/2. With ``update_dtype="float32"`` (half the bytes) the error grows to
about ulp(max(|W_0|, |W_t|)).
"""

from spectra.store.creation import CreatedElsewhere, create_run, existing
from spectra.store.format import (MATRIX_COMPRESSORS, SCHEMA_VERSION, UNCOMMITTED_STEP,
                                  MatrixSpec, StoreDamaged, StoreError, StoreVanished, digest,
                                  is_run_store, open_root, open_zarr)
from spectra.store.location import Location
from spectra.store.lock import ANALYSIS_LOCK, WRITER_LOCK, StoreLock, StoreLocked, StoreReadOnly
from spectra.store.reader import Run, committed_steps, open_run
from spectra.store.verify import Report, repair_run, verify_run
from spectra.store.writer import RunWriter, annotate_run, resume_run

__all__ = ["ANALYSIS_LOCK", "MATRIX_COMPRESSORS", "SCHEMA_VERSION", "UNCOMMITTED_STEP",
           "WRITER_LOCK", "CreatedElsewhere", "Location", "MatrixSpec", "Run", "RunWriter",
           "StoreDamaged", "StoreError", "StoreLock", "StoreLocked", "StoreReadOnly",
           "StoreVanished", "annotate_run", "committed_steps", "create_run", "digest",
           "existing", "is_run_store", "open_root", "open_run", "open_zarr", "repair_run",
           "resume_run", "verify_run"]
