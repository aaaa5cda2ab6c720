"""The HTTP edge: content negotiation, problem details, routes. Thin: decode, call the registry, encode."""
