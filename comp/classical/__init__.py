"""Classical runs on the same folds: TF-IDF + metadata linear models, gradient boosting, level-2 stacks.
Imports the shared modules and comp.tables."""
