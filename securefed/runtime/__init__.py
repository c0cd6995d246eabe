"""Runtimes move encoded messages between the server and clients."""
