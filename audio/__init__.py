"""polydiff audio domain package (see ../shared/DESIGN.md)."""
