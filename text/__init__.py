"""polydiff text domain package (see ../shared/DESIGN.md)."""
