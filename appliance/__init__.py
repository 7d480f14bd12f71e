"""Circles core library: the bus, the service runtime, config and logging."""
