"""Packaging: everything installs under the one `netferry` namespace.

The repository keeps hostd/, guestd/ and clients/python/netferry/ as top-level folders (the
layout of DESIGN.md); installed they are `netferry.hostd`, `netferry.guestd` and `netferry`, so
no generic top-level `hostd` or `guestd` lands in site-packages. The metadata is in
pyproject.toml; this file only maps the folders, which pyproject.toml cannot compute.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "netferry": "clients/python/netferry",
    "netferry.hostd": "hostd",
    "netferry.guestd": "guestd",
}
packages = find_packages("clients/python", include=["netferry", "netferry.*"])
for name, folder in PACKAGE_DIRS.items():
    if name != "netferry":
        packages += [f"netferry.{p}" for p in find_packages(".", include=[folder, f"{folder}.*"])]

setup(package_dir=PACKAGE_DIRS, packages=packages)
