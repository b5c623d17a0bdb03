"""The `strata` command: a client of the public API and the local developer tools."""
