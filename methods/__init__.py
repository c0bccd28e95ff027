"""Methods: one file per method, each a registered subclass of methods.base.Method."""
