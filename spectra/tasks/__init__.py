"""Demo tasks: offline data (data), small models (models), plain training loops (loops),
recorded runs of any method on them (runs) and `spectra demo` (demo). Needs the ``[demo]``
extra for the datasets."""
