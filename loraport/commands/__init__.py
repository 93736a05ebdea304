"""One module per CLI command (or family); each defines `register(group: click.Group)`."""
