"""Request handlers: the work behind each route, kept apart from the HTTP plumbing."""
