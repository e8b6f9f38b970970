"""The patch file and its I/O: format and validation, loading into pipelines, the Hub, export."""
