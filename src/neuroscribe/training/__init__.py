"""Training: synthetic site data, CVIT model, metrics, export and registry (the ``train`` extra).

The running service imports nothing from here except the registry and the metrics.
"""
