"""Command lines: parse, validate, call the library, print. Nothing in the library imports them."""
