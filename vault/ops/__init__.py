"""One module per operation, each a set of functions of a :class:`vault.core.Core`."""
