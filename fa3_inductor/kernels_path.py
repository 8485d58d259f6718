"""Where the template sources are: inside the wheel (fa3_inductor/kernels) or, in a source
checkout used without installing, the repository's kernels/ folder."""
from __future__ import annotations

import pathlib


def kernels_dir() -> pathlib.Path:
    here = pathlib.Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):
        if (cand / "triton").is_dir() or (cand / "cuda").is_dir():
            return cand
    raise FileNotFoundError("fa3_inductor: template sources (kernels/) not found next to the package")


def read_template(relpath: str) -> str:
    return (kernels_dir() / relpath).read_text()
