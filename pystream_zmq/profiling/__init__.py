"""Profile records: their wire format, the SQLite store and its writer process, and the
reports read back from it."""
