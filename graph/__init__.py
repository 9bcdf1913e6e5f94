"""polydiff graph domain package (see ../shared/DESIGN.md)."""
