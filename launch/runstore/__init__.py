"""The run store on any fsspec URL: roots, manifest and stage records, the ledger, code snapshots, results table."""
