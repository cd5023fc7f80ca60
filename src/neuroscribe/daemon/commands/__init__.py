"""Sub-commands of ``neuroscribe`` that belong to the service (see ``neuroscribe.cli``)."""
