"""The floor every other package stands on: errors, paths, files, configs, the manifest, base models, the encoder.

It imports nothing from guardtune's other packages."""
