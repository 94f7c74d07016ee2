"""What pyproject.toml cannot say: the repository's top-level ``conf/`` ships inside the package as
``ddpm.conf``, so an installed package composes its configs from ``pkg://ddpm.conf`` (a checkout
reads ``conf/`` itself: :mod:`ddpm.project`). Each config directory is a package of YAML files
(``conf/model/base/`` is ``ddpm.conf.model.base``); ``conf/local/``, a checkout's own
machine-specific overrides (git-ignored), stays out."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = [
    "ddpm.conf",
    *(f"ddpm.conf.{p}" for p in find_namespace_packages("conf", exclude=["local"])),
]

setup(
    packages=[*find_packages("src"), *CONF],
    package_dir={"": "src", "ddpm.conf": "conf"},
    package_data={p: ["*.yaml"] for p in CONF},
)
