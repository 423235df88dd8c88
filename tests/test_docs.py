"""The repository is self-contained and its documents say what the code does."""

import re
from pathlib import Path

import numpy as np

import spectra

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("docs", "analyses", "benchmarks", "tests", "spectra", "figures", "examples", ".ci")
# a path under one of those folders, with an extension; braces as in figures/demo-{gpt,mlp}-ranks.png
CITED_PATH = re.compile(r"(?<![\w/.-])((?:%s)/(?:[\w./-]|\{[\w.,-]*\})*\.(?:md|py|png|csv|json|toml))"
                        % "|".join(map(re.escape, TOP_LEVEL)))
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)")
OUTSIDE_DOCUMENT = "DES" "IGN"  # the design notes the docs once cited (split: not a citation)
SKIPPED = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache"}


def _text_files():
    """The repository's sources, documents and tables (not stores, caches or environments)."""
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if (path.is_file() and not SKIPPED.intersection(parts)
                and not any(p.endswith((".egg-info", ".zarr")) for p in parts)
                and (path.suffix in {".py", ".md", ".toml", ".csv", ".json"} or path.name == "run")):
            yield path


def test_every_file_the_repository_cites_is_in_it():
    missing = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8")
        for cited in CITED_PATH.findall(text):
            missing += [f"{path.relative_to(ROOT)}: {name}" for name in _expand(cited)
                        if not (ROOT / name).exists()]
        if path.suffix == ".md":
            for link in MARKDOWN_LINK.findall(text):
                if "://" not in link and not (path.parent / link).exists():
                    missing.append(f"{path.relative_to(ROOT)}: link {link}")
        if re.search(rf"\b{OUTSIDE_DOCUMENT}\b", text):
            missing.append(f"{path.relative_to(ROOT)}: cites {OUTSIDE_DOCUMENT}, a document "
                           "outside the repository")
    assert not missing, "\n".join(missing)


def _expand(pattern: str) -> list[str]:
    """Shell brace expansion: figures/demo-{gpt,mlp}-ranks.png → figures/demo-gpt-ranks.png, …"""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    return [name for choice in match.group(1).split(",")
            for name in _expand(pattern[:match.start()] + choice + pattern[match.end():])]


def test_the_store_docs_xarray_recipe_gives_snapshot_row_col_weights(tmp_path, tiny):
    model, optimizer, generator = tiny
    from conftest import train_steps
    path = tmp_path / "run.zarr"
    with spectra.Recorder(model, path) as rec:
        train_steps(model, optimizer, 3, generator, on_step=lambda k, loss: rec.step(loss=loss))
    doc = (ROOT / "docs" / "store.md").read_text(encoding="utf-8")
    recipe = doc.split("## Reading without spectra")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(recipe.replace("runs/demo-gpt.zarr", str(path)), scope)
    run = spectra.open_run(path)
    name = run.params[0]
    assert scope["weights"].dims == ("snapshot", "row", "col")
    expected = run.weights(name, list(range(len(run))))
    np.testing.assert_array_equal(scope["weights"].values, expected)
    np.testing.assert_array_equal(scope["w_last"],
                                  model.get_parameter(name).detach().reshape(run.shape(name)))
