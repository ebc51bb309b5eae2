"""API role: gRPC servicer, interceptors and server assembly."""
