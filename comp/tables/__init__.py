"""The competition's tables: reading and checking them, the folds and their fingerprints, the metadata encoders,
the demos. Imports only comp's shared modules (config, errors, metrics, artifacts)."""
