"""Datasets: one file per dataset, each a registered subclass of datasets.base.Dataset."""
