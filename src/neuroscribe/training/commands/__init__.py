"""``neuroscribe train`` and ``neuroscribe models``: one module each (add_arguments, run)."""
