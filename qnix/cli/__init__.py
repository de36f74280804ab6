"""The thin command line over the library."""
