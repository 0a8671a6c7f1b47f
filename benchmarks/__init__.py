"""The copy-up cost harness: cowfs beside native ext4, kernel overlayfs and fuse-overlayfs.

Run it from the repository root with `.venv/bin/python -m benchmarks --quick` (or `--full`,
`--smoke`). cowfs is used only through its command line, as a user would: this package imports
nothing from `cowfs`.
"""
