"""The feddem server: the DEM workflow as a Flower ServerApp, the merge, the report and the CLI."""
