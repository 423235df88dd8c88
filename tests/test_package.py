"""The package's face: a light import, the public names, and the deprecated module path."""

import subprocess
import sys
import warnings

import spectra


def test_import_spectra_loads_no_layer():
    code = ("import sys, spectra; heavy = [m for m in ('torch', 'zarr', 'pandas', "
            "'spectra.store', 'spectra.capture') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_are_the_functions_and_classes():
    from spectra.analysis.analyzer import analyze
    from spectra.capture.recorder import Recorder
    from spectra.store.reader import open_run
    assert spectra.analyze is analyze and spectra.Recorder is Recorder
    assert spectra.open_run is open_run


def test_the_old_module_path_still_imports_with_a_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from spectra.analyze import analyze, singular_values
    from spectra.analysis import analyzer
    assert analyze is analyzer.analyze and singular_values is analyzer.singular_values
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]
    assert "spectra.analyze is deprecated" in str(caught[0].message)
    assert callable(spectra.analyze)  # the attribute stays the function
