"""The neural run: encoder model and head, batching, the training loop, its state and resume, fit_fold, hardware
and processes. Imports the shared modules, comp.tables and comp.classical (the wide path's linear start)."""
