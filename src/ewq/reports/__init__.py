"""Serialise and render result records: JSON documents and terminal tables. No computation."""
