"""What folds leave behind: training a fold and writing its artifacts, reading and checking them back, decision
rules, bundles. Imports the shared modules, comp.tables, comp.classical and comp.nn; never a command."""
