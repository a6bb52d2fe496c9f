"""Package discovery only; all metadata lives in pyproject.toml.

`widgets/` sits at the top level (DESIGN §1) but is imported as `mossvl_lab.widgets`, so it is
mapped explicitly. pyproject.toml cannot express "find packages automatically, plus one mapped
folder", hence this shim. Works for both `pip install .` and `pip install -e .`.
"""

from setuptools import find_packages, setup

widgets = ["mossvl_lab.widgets"] + ["mossvl_lab.widgets." + p for p in find_packages("widgets")]

setup(
    packages=find_packages(include=["mossvl_lab", "mossvl_lab.*"]) + widgets,
    package_dir={"mossvl_lab.widgets": "widgets"},
)
