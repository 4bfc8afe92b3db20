"""Task bodies: load by id, call the domain, commit. Nothing else lives here."""
