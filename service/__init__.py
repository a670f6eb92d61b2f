"""The SDB service: thin HTTP over sdb_core (settings, store, auth, hosted models, routes, jobs); never imports the SDK or the CLI."""
