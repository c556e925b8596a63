"""The run: settings, the session they build, the exploration stages, the run store and every output."""
