"""Store role: SQLite behind the repository :class:`vault.store.Store`, by concern."""
