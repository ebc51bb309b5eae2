"""What the vault is about, with no I/O and no transport: errors, records, job states."""
