"""The shipped run configs, paper recipes and sweeps: package data of `mmbalance.configs`,
read through mmbalance.bench.resources (this file makes the folder a regular package, so that
`importlib.resources` gives one folder for it)."""
