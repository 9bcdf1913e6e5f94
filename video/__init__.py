"""polydiff video domain package (see ../shared/DESIGN.md)."""
