"""The floor every other package stands on: errors, paths, files, configs, the manifest, base models, the encoder.

It imports nothing from guardtune's other packages."""

__version__ = "0.1.0"  # the one place: pyproject, both CLIs and the API read it
